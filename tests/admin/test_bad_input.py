"""Bad input never answers 5xx: each class of it answers 4xx in the API's JSON error shape.

Integers beyond PostgreSQL's bigint (in a path, a query string, a body), NUL characters, invalid
UTF-8, bodies over the size limit or nested too deep, and values of the wrong type (which the
OpenAPI document forbids) — plus a bug's 500, which is JSON too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from admin.api import MAX_BODY_BYTES
from admin.schemas import BIGINT_MAX
from shared import mappings
from tests.admin.conftest import Org, error

pytestmark = pytest.mark.integration

TOO_BIG = BIGINT_MAX + 1  # int64 + 1
HUGE = "9" * 30
MAPPINGS = "/api/v1/integrations/sentry/mappings"


@pytest.mark.parametrize("value", [str(TOO_BIG), HUGE, "0", "-1", "1.0", "1e3", " 1", "abc", "%00", "1%002"])
@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("GET", "/api/v1/incidents/{}/events", "incident_id"),
        ("DELETE", "/api/v1/services/{}", "service_id"),
        ("DELETE", MAPPINGS + "/{}", "mapping_id"),
        ("PATCH", MAPPINGS + "/{}", "mapping_id"),
    ],
)
async def test_bad_path_ids_are_422(org: Org, method: str, path: str, field: str, value: str) -> None:
    body = {"active": False} if method == "PATCH" else None
    error(await org.client.request(method, path.format(value), json=body), 422, field)


async def test_largest_bigint_id_is_a_plain_404(org: Org) -> None:
    error(await org.client.get(f"/api/v1/incidents/{BIGINT_MAX}/events"), 404)
    error(await org.client.patch(f"{MAPPINGS}/{BIGINT_MAX}", json={"active": False}), 404)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (f"cursor={TOO_BIG}", "cursor"),
        (f"cursor={HUGE}", "cursor"),
        (f"service_id={TOO_BIG}", "service_id"),
        (f"service_id={HUGE}", "service_id"),
        (f"limit={HUGE}", "limit"),
        ("cursor=" + "9" * 5000, "cursor"),  # more digits than int() converts by default
        ("limit=5.0", "limit"),  # the OpenAPI says integer: no float spelling, ...
        ("limit=1_0", "limit"),
        ("limit=%2010", "limit"),  # ... no padding
        ("limit=", "limit"),
        ("limit=1&limit=2", "limit"),  # a parameter once
        ("status=open%00", "status"),
        ("unknown=1", "unknown"),
    ],
)
async def test_bad_incident_queries_are_422(org: Org, query: str, field: str) -> None:
    error(await org.client.get(f"/api/v1/incidents?{query}"), 422, field)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("project=a%00b", "project"),
        ("reason=%00", "reason"),
        (f"cursor={TOO_BIG}", "cursor"),
        ("since=0.5", "since"),  # the OpenAPI says date-time: not a Unix timestamp, ...
        ("since=1714550400", "since"),
        ("since=2024-05-01", "since"),  # ... not a bare date, ...
        ("since=2024-05-01T12:00:00", "since"),  # ... not without an offset
        ("since=2024-13-01T12:00:00Z", "since"),
        ("since=0000-01-01T00:00:00Z", "since"),
        ("outcome=yes", "outcome"),
    ],
)
async def test_bad_audit_queries_are_422(org: Org, query: str, field: str) -> None:
    error(await org.client.get(f"/api/v1/integrations/sentry/audit?{query}"), 422, field)


@pytest.mark.parametrize("days", ["0", "91", "7.0", HUGE, "seven", "%00"])
async def test_bad_unmapped_days_are_422(org: Org, days: str) -> None:
    error(await org.client.get(f"/api/v1/integrations/sentry/unmapped-projects?days={days}"), 422, "days")


@pytest.mark.parametrize(
    "since", ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00.123456789%2B02:00", "2024-05-01t12:00:00z"]
)
async def test_rfc3339_since_is_accepted(org: Org, since: str) -> None:
    response = await org.client.get(f"/api/v1/integrations/sentry/audit?since={since}")
    assert response.status_code == 200, response.text


async def service(org: Org) -> int:
    response = await org.client.post("/api/v1/services", json={"name": "Web App"})
    assert response.status_code == 201, response.text
    service_id: int = response.json()["id"]
    return service_id


async def post_raw(org: Org, path: str, body: bytes | AsyncIterator[bytes]) -> Any:
    return await org.client.post(path, content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"sentry_project_slug": "web", "service_id": %d}' % TOO_BIG, "service_id"),
        (b'{"sentry_project_slug": "web", "service_id": %s}' % HUGE.encode(), "service_id"),  # a float to orjson
        (b'{"sentry_project_slug": "web", "service_id": -%s}' % HUGE.encode(), "service_id"),
        (b'{"sentry_project_slug": "web", "service_id": 0}', "service_id"),
        (b'{"sentry_project_slug": "web", "service_id": "1"}', "service_id"),  # wrong JSON types
        (b'{"sentry_project_slug": "web", "service_id": 1.5}', "service_id"),
        (b'{"sentry_project_slug": "web", "service_id": true}', "service_id"),
        (b'{"sentry_project_slug": "web", "service_id": 1, "active": "yes"}', "active"),
        (b'{"sentry_project_slug": "web", "service_id": 1, "active": 1}', "active"),
        (b'{"sentry_project_slug": "w\\u0000b", "service_id": 1}', "sentry_project_slug"),
        (b'{"sentry_project_slug": ["web"], "service_id": 1}', "sentry_project_slug"),
    ],
)
async def test_bad_mapping_bodies_are_422(org: Org, raw: bytes, field: str) -> None:
    error(await post_raw(org, MAPPINGS, raw), 422, field)


async def test_bad_patch_bodies_are_422(org: Org) -> None:
    web = await service(org)
    created = await org.client.post(MAPPINGS, json={"sentry_project_slug": "web", "service_id": web})
    path = f"{MAPPINGS}/{created.json()['id']}"
    for body, field in (
        ({"active": "no"}, "active"),
        ({"service_id": TOO_BIG}, "service_id"),
        ({"service_id": str(web)}, "service_id"),
    ):
        error(await org.client.patch(path, json=body), 422, field)
    # JSON Schema counts 1.0 as an integer, so it is one here too.
    moved = await org.client.patch(path, json={"service_id": float(web), "active": False})
    assert moved.status_code == 200 and moved.json()["active"] is False, moved.text


@pytest.mark.parametrize(
    "name", ["a\u0000b", "\u0000", "x" * 201, 5, None, True, ["x"], {"x": 1}], ids=lambda v: repr(v)[:12]
)
async def test_bad_service_names_are_422(org: Org, name: object) -> None:
    error(await org.client.post("/api/v1/services", json={"name": name}), 422, "name")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "a\xffb"}',  # invalid UTF-8
        b'{"name": "\xc3"}',  # truncated UTF-8
        b'{"name": "a\xed\xa0\x80b"}',  # an encoded surrogate
        b'{"name": "a\\ud800b"}',  # a lone surrogate escape: not text PostgreSQL can hold
        b"\xef\xbb\xbf" + b'{"name": "bom"}',
        b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nested deeper than 1024
        b"[" * 10_000 + b"]" * 10_000,
        b"",
        b'{"name": "x"',
    ],
    ids=["invalid-utf8", "truncated-utf8", "surrogate-utf8", "surrogate-escape", "bom", "deep", "deep-top", "empty",
         "truncated"],
)  # fmt: skip
async def test_bodies_that_are_not_json_are_400(org: Org, raw: bytes) -> None:
    assert error(await post_raw(org, "/api/v1/services", raw), 400)["code"] == "malformed_json"


async def test_nested_but_parsable_bodies_are_422(org: Org) -> None:
    nested = b'{"name": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    error(await post_raw(org, "/api/v1/services", nested), 422, "name")


async def test_bodies_over_the_limit_are_413(org: Org) -> None:
    def padded(size: int) -> bytes:
        body = b'{"name": "' + b"x" * (size - 12) + b'"}'
        assert len(body) == size
        return body

    # At the limit the body is read (and its name is too long); one byte more is 413 unread.
    error(await post_raw(org, "/api/v1/services", padded(MAX_BODY_BYTES)), 422, "name")
    assert error(await post_raw(org, "/api/v1/services", padded(MAX_BODY_BYTES + 1)), 413)["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while it streams
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b" " * 1024

    error(await post_raw(org, MAPPINGS, chunks()), 413)
    huge_declared = await org.client.post(
        "/api/v1/services", content=b"{}", headers={"Content-Type": "application/json", "Content-Length": "9" * 30}
    )
    error(huge_declared, 413)


async def test_unexpected_errors_are_a_logged_json_500(
    org: Org, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(mappings, "list_services", broken)  # as admin.api calls it
    with caplog.at_level(logging.ERROR, logger="blametrail.admin"):
        detail = error(await org.client.get("/api/v1/services"), 500)
    assert detail["code"] == "internal" and "a bug" not in detail["message"]
    assert any("GET /api/v1/services" in r.getMessage() and r.exc_info for r in caplog.records), caplog.text


async def test_405_lists_every_method_of_the_path(org: Org) -> None:
    response = await org.client.put("/api/v1/services")
    error(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    response = await org.client.get(f"{MAPPINGS}/1")
    error(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"PATCH", "DELETE"}


async def test_openapi_states_the_limits(org: Org) -> None:
    document = (await org.client.get("/api/v1/openapi.json")).json()
    assert str(MAX_BODY_BYTES) in document["info"]["description"]
    for path, ops in document["paths"].items():
        for op in ops.values():
            assert {"401", "500", "503"} <= set(op["responses"]), (path, op)
            assert "Retry-After" in op["responses"]["503"]["headers"]
            if "requestBody" in op:
                assert str(MAX_BODY_BYTES) in op["requestBody"]["description"]
                assert {"400", "413", "422"} <= set(op["responses"])
            for parameter in op["parameters"]:
                schema = parameter["schema"]
                assert "anyOf" not in schema, parameter  # no null in a query string
                if parameter["in"] == "path" or parameter["name"] in ("cursor", "service_id"):
                    assert (schema["type"], schema["minimum"], schema["maximum"]) == ("integer", 1, BIGINT_MAX)
    since = next(p for p in document["paths"]["/api/v1/integrations/sentry/audit"]["get"]["parameters"]
                 if p["name"] == "since")  # fmt: skip
    assert since["schema"] == {"type": "string", "format": "date-time"}
