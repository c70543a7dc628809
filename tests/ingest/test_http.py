"""Ingest over HTTP as a process on the real broker and database: every answer and what reaches Kafka."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import events
from shared.kafka import partition_for
from shared.orgs import NewOrg, disable_legacy_plugin, enable_legacy_plugin, rotate_secret
from shared.sentry import LEGACY, parse_webhook, partition_key
from shared.settings import Settings
from shared.topics import Topics
from tests.support import ServiceProcess, free_port, settings_env, signed_headers, wait_until
from tests.support.ingest import new_org, start_ingest
from tests.support.kafka import TopicReader
from tests.support.metrics import scrape
from tests.support.sentry import payloads_dir

pytestmark = pytest.mark.integration

MAX_BODY = 256 * 1024
TTL = 0.2


@dataclass
class Ingest:
    settings: Settings
    port: int
    base: str
    client: httpx.AsyncClient
    raw: TopicReader
    process: ServiceProcess
    sessions: async_sessionmaker[AsyncSession]

    def url(self, org: str) -> str:
        return f"{self.base}/webhooks/sentry/{org}"

    def legacy_url(self, org: str, token: str) -> str:
        return f"{self.base}/webhooks/sentry-legacy/{org}/{token}"

    async def post(
        self, org: NewOrg, body: bytes, resource: str = "issue", secret: str | None = None
    ) -> httpx.Response:
        """POST ``body`` to the org's URL signed with ``secret`` (default: the org's current secret)."""
        headers = signed_headers(secret or org.client_secret, body, resource)
        return await self.client.post(self.url(org.org), content=body, headers=headers)

    async def requests(self, resource: str, outcome: str) -> float:
        return await scrape(
            self.port, "blametrail_ingest_requests_total", self.client, outcome=outcome, resource=resource
        )


@pytest.fixture(scope="module")
async def ingest(
    topics: Settings, sessions: async_sessionmaker[AsyncSession], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Ingest]:
    port = free_port()
    settings = topics.model_copy(
        update={
            "ingest_port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "secret_cache_ttl_seconds": TTL,
            "max_body_bytes": MAX_BODY,
            "spool_dir": str(tmp_path_factory.mktemp("spool")),
        }
    )
    client = httpx.AsyncClient(timeout=5.0)
    raw = TopicReader(settings.kafka_bootstrap, [Topics.from_settings(settings).raw])
    await raw.start()
    process = await start_ingest(settings_env(settings), tmp_path_factory.mktemp("ingest"), port, client)
    try:
        yield Ingest(settings, port, f"http://127.0.0.1:{port}", client, raw, process, sessions)
    finally:
        code = process.stop()
        print(f"----- ingest (exit {code})\n{process.output()[-4000:]}")
        await raw.stop()
        await client.aclose()
        assert code in (0, -15), f"ingest did not shut down cleanly: {code}"


def corpus() -> list[Path]:
    return sorted(payloads_dir().rglob("*.json"))


def resource_of(path: Path) -> str:
    return LEGACY if path.name.startswith("legacy_webhook_plugin") else path.name.split(".")[0]


async def test_every_corpus_payload_is_published_byte_for_byte(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"corpus-{os.urandom(4).hex()}")
    async with ingest.sessions() as session, session.begin():
        token = await enable_legacy_plugin(session, org.org)
    files = corpus()
    assert len(files) >= 30
    sent: dict[str, tuple[Path, str, str]] = {}
    for path in files:
        body = path.read_bytes()
        resource = resource_of(path)
        if resource == LEGACY:  # the plugin sends no Sentry-Hook-* headers
            headers = {"Content-Type": "application/json"}
            response = await ingest.client.post(ingest.legacy_url(org.org, token), content=body, headers=headers)
            request_id = ""
        else:
            headers = signed_headers(org.client_secret, body, resource)
            response = await ingest.client.post(ingest.url(org.org), content=body, headers=headers)
            request_id = headers["Request-ID"]
        assert response.status_code == 200, (path, response.text)
        assert response.json() == {"status": "accepted"}
        sent[events.delivery_id(org.org, resource, body)] = (path, resource, request_id)

    records = await ingest.raw.wait_for(set(sent))
    for delivery, (path, resource, request_id) in sent.items():
        record = records[delivery]
        body = path.read_bytes()
        assert record.value == body, path
        assert record.key == partition_key(org.org, parse_webhook(resource, json.loads(body))).encode()
        assert record.partition == partition_for(
            record.key, range(ingest.settings.topic_partitions)
        )  # the drainer's partitioner agrees
        h = record.headers
        assert (h["org"], h["resource"], h["delivery_id"], h["ingest_version"]) == (org.org, resource, delivery, "1")
        assert h["content_type"] == "application/json"
        assert h["received_at"].endswith("Z")
        if request_id:
            assert h["request_id"] == request_id and h["hook_timestamp"].isdigit()
        else:
            assert len(h["request_id"]) == 32  # generated for the unsigned plugin


async def test_unknown_resource_and_action_are_accepted_and_published(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"unknown-{os.urandom(4).hex()}")
    before = await ingest.requests("other", "accepted")
    body = b'{"action":"materialised","data":{"thing":{"id":"1"}}}'
    response = await ingest.post(org, body, resource="brand_new_resource")
    assert response.status_code == 200, response.text
    records = await ingest.raw.wait_for({events.delivery_id(org.org, "brand_new_resource", body)})
    (record,) = records.values()
    assert record.value == body and record.headers["resource"] == "brand_new_resource"
    assert await ingest.requests("other", "accepted") == before + 1


async def test_signature_failures_and_unknown_orgs_get_one_401(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"sig-{os.urandom(4).hex()}")
    body = b'{"action":"created","data":{}}'
    before = await ingest.requests("issue", "bad_signature")
    good = signed_headers(org.client_secret, body, "issue")
    answers = [
        await ingest.client.post(
            ingest.url(org.org), content=body, headers={**good, "Sentry-Hook-Signature": "0" * 64}
        ),
        await ingest.client.post(
            ingest.url(org.org), content=body, headers={k: v for k, v in good.items() if k != "Sentry-Hook-Signature"}
        ),
        await ingest.post(org, body, secret="another-secret-of-32-characters!"),
        await ingest.client.post(ingest.url(org.org), content=body + b" ", headers=good),  # other bytes
        await ingest.client.post(ingest.url("no-such-org"), content=body, headers=good),
        await ingest.client.post(ingest.url("Not_A_Slug!"), content=body, headers=good),
    ]
    assert [a.status_code for a in answers] == [401] * len(answers)
    assert len({a.text for a in answers}) == 1
    assert answers[0].json()["error"]["code"] == "bad_signature"
    assert await ingest.requests("issue", "bad_signature") == before + len(answers)


async def test_rotated_secret_takes_effect_within_the_ttl_and_the_previous_stays_valid(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"rotate-{os.urandom(4).hex()}")
    first = org.client_secret
    body = b'{"action":"created","data":{"issue":{"id":"42"}}}'
    assert (await ingest.post(org, body, secret=first)).status_code == 200  # cached now

    async with ingest.sessions() as session, session.begin():
        second = await rotate_secret(session, org.org)

    async def accepted_with(secret: str) -> bool:
        return (await ingest.post(org, body, secret=secret)).status_code == 200

    await wait_until(lambda: accepted_with(second), within=5, what="the new secret to be accepted")
    response = await ingest.post(org, body + b"\n", secret=first)  # Sentry still signing with the old one
    assert response.status_code == 200, response.text
    await ingest.raw.wait_for({events.delivery_id(org.org, "issue", body + b"\n")})

    async with ingest.sessions() as session, session.begin():
        third = await rotate_secret(session, org.org)

    async def refused_with(secret: str) -> bool:
        return (await ingest.post(org, body, secret=secret)).status_code == 401

    await wait_until(lambda: refused_with(first), within=5, what="the secret two rotations back to be refused")
    assert (await ingest.post(org, body, secret=second)).status_code == 200
    assert (await ingest.post(org, body, secret=third)).status_code == 200


async def test_legacy_plugin_is_accepted_only_while_enabled(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"legacy-{os.urandom(4).hex()}")
    body = (payloads_dir() / "legacy_webhook_plugin.json").read_bytes()
    signed_401 = await ingest.post(org, body, secret="wrong-secret-wrong-secret-wrong!")
    off = await ingest.client.post(ingest.legacy_url(org.org, "x" * 43), content=body)
    assert off.status_code == 401 and off.text == signed_401.text

    async with ingest.sessions() as session, session.begin():
        token = await enable_legacy_plugin(session, org.org)

    async def status(token: str) -> int:
        return (await ingest.client.post(ingest.legacy_url(org.org, token), content=body)).status_code

    async def answers(expected: int) -> bool:
        return await status(token) == expected

    await wait_until(lambda: answers(200), within=5, what="the legacy plugin to be accepted")
    assert await status(token[:-1] + ("A" if token[-1] != "A" else "B")) == 401
    assert await status("") in (401, 404, 405)  # no token segment: not even the route
    wrong = await ingest.client.post(ingest.legacy_url("no-such-org", token), content=body)
    assert wrong.status_code == 401 and wrong.text == signed_401.text
    slash = await ingest.client.post(ingest.legacy_url(org.org, token) + "/", content=body)
    assert slash.status_code == 200

    (record,) = (await ingest.raw.wait_for({events.delivery_id(org.org, LEGACY, body)})).values()
    assert record.value == body and record.headers["resource"] == LEGACY
    assert record.key == f"{org.org}/{parse_webhook(LEGACY, json.loads(body)).sentry_issue_id}".encode()

    async with ingest.sessions() as session, session.begin():
        await disable_legacy_plugin(session, org.org)
    await wait_until(lambda: answers(401), within=5, what="the legacy plugin to be refused again")


async def test_non_json_is_400_saying_why(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"json-{os.urandom(4).hex()}")
    before = await ingest.requests("issue", "bad_json")
    for body in (b"{not json", b'{"a": "\xff"}', b""):
        response = await ingest.post(org, body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == "bad_json" and error["message"].startswith("body is not valid JSON: ")
        assert len(error["message"]) > len("body is not valid JSON: ")
    assert await ingest.requests("issue", "bad_json") == before + 3


async def test_bodies_over_the_limit_are_413_declared_or_streamed(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"size-{os.urandom(4).hex()}")
    before = await ingest.requests("issue", "too_large")
    exact = b'{"pad":"' + b"x" * (MAX_BODY - 10) + b'"}'
    assert len(exact) == MAX_BODY
    assert (await ingest.post(org, exact)).status_code == 200

    declared = await ingest.post(org, exact + b" ")
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * (MAX_BODY // 4)

    seen: dict[str, str] = {}

    async def record_request(request: httpx.Request) -> None:
        seen.update(request.headers)

    async with httpx.AsyncClient(timeout=5.0, event_hooks={"request": [record_request]}) as client:
        streamed = await client.post(
            ingest.url(org.org), content=chunks(), headers=signed_headers(org.client_secret, b"", "issue")
        )
    assert "content-length" not in seen and seen.get("transfer-encoding") == "chunked"
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "too_large"
    assert await ingest.requests("issue", "too_large") == before + 2


async def test_trailing_slash_is_served_never_redirected(ingest: Ingest) -> None:
    org = await new_org(ingest.sessions, f"slash-{os.urandom(4).hex()}")
    body = b'{"action":"resolved","data":{"issue":{"id":"7"}}}'
    response = await ingest.client.post(
        ingest.url(org.org) + "/", content=body, headers=signed_headers(org.client_secret, body, "issue")
    )
    assert response.status_code == 200 and not response.is_redirect
    await ingest.raw.wait_for({events.delivery_id(org.org, "issue", body)})


async def test_health_readiness_and_metrics(ingest: Ingest) -> None:
    assert (await ingest.client.get(f"{ingest.base}/healthz")).text == "ok"
    ready = await ingest.client.get(f"{ingest.base}/readyz")
    assert ready.status_code == 200 and "kafka producer connected" in ready.text and "spool writable" in ready.text
    text = (await ingest.client.get(f"{ingest.base}/metrics")).text
    for name in (
        "blametrail_ingest_requests_total",
        "blametrail_ingest_request_seconds_bucket",
        "blametrail_ingest_publish_seconds_bucket",
        "blametrail_ingest_spool_depth",
        "blametrail_ingest_spool_bytes",
        "blametrail_ingest_spool_oldest_age_seconds",
        "blametrail_ingest_spool_drained_total",
        "blametrail_ingest_producer_restarts_total",
    ):
        assert name in text, name
    assert await scrape(ingest.port, "blametrail_ingest_spool_depth") == 0
