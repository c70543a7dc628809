"""schemathesis over every operation of the admin API: no input answers 5xx, every answer is documented.

The live app (``admin.app.create_app`` on the test database, in-process through schemathesis' ASGI
transport) is called with a real org's API token. For each operation schemathesis runs its explicit
and coverage phases (boundary values: bigint ± 1, NUL in text, wrong JSON types, missing and extra
fields) and EXAMPLES generated cases in positive and negative mode, with its standard checks:

- not_a_server_error: no 5xx, whatever the input;
- status_code / content_type / response_headers / response_schema conformance: the answer is one
  the OpenAPI document declares (``admin.openapi``), in the declared shape;
- negative_data_rejection: input the document forbids is rejected (4xx);
- positive_data_acceptance: input the document allows is accepted — except for the two operations
  whose bodies meet business rules no schema can say (a service_id must exist in the org, a service
  name must not be blank), where a 422 for schema-valid input is correct;
- missing_required_header, unsupported_method, allow_header_conformance, ignored_auth.

Hypothesis is derandomized (the same cases every run, no example database) with no deadline and the
health checks that time generation off, so the run neither flakes nor depends on the machine's
speed. ``test_fuzz_ran_enough_cases`` asserts that at least MIN_CASES cases ran and prints the count.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import CheckFunction
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import HttpBearerAuthConfig
from schemathesis.python import asgi
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from admin.app import create_app
from admin.openapi import build_openapi
from shared.db.models import ApiToken
from shared.orgs import create_org
from shared.security import hash_token, new_api_token
from shared.settings import Settings

pytestmark = pytest.mark.integration

EXAMPLES = 90  # generated cases per operation, besides the explicit and coverage phases
MIN_CASES = 1000
CHECK_NAMES = {
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
}
# Schema-valid bodies that business rules reject with 422 (see the module docstring).
BUSINESS_RULES = {"POST /api/v1/services", "POST /api/v1/integrations/sentry/mappings"}

load_all_checks()
CHECKS_ALL: list[CheckFunction] = [c for c in CHECKS.get_all() if not isinstance(c, type) and c.__name__ in CHECK_NAMES]
CHECKS_BUSINESS = [c for c in CHECKS_ALL if c.__name__ != "positive_data_acceptance"]
assert {c.__name__ for c in CHECKS_ALL} == CHECK_NAMES, "a schemathesis check was renamed"

CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()
RUN = {"started": 0.0, "operations": 0}


# The fuzz org's API token. Known at import, because schemathesis builds its coverage-phase cases
# (with their Authorization header) when pytest collects the tests; ``fuzz_org`` makes it an API token of
# a new org in the api_tokens table, as ``blametrail orgs create`` does.
FUZZ_TOKEN = new_api_token()


@pytest.fixture(scope="module")
async def fuzz_org(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session, session.begin():
        created = await create_org(session, f"fuzz-{uuid.uuid4().hex[:10]}")
        session.add(ApiToken(org_id=created.org_id, token_hash=hash_token(FUZZ_TOKEN), name="fuzz"))
    return created.org_id


class LiveApp:
    """The ASGI app schemathesis calls: the admin app that ``live_app`` started (in-process, in
    schemathesis' own event loop thread, the checks' extra requests included)."""

    app: Starlette | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "use the live_app fixture"
        await self.app(scope, receive, send)


LIVE = LiveApp()
# Built at import from the document the app serves (``admin.openapi``), so that pytest names one test
# per operation.
schema = schemathesis.openapi.from_dict(build_openapi())
schema.app = LIVE
schema.config.update(base_url=f"http://{asgi.HOST}")
# Every case carries the org's token (the OpenAPI ``bearer`` scheme's credentials): a case without it would
# only test the 401, which the ignored_auth check covers on every operation with requests of its own.
schema.config.generation.update(with_security_parameters=False)
schema.config.auth.openapi.schemes["bearer"] = HttpBearerAuthConfig(bearer=FUZZ_TOKEN)


@pytest.fixture(scope="module")
def live_app(migrated: Settings, fuzz_org: int) -> Iterator[None]:
    """The admin app behind LIVE, with the fuzz org in the database."""
    RUN["started"], RUN["operations"] = time.monotonic(), len(list(schema.get_all_operations()))
    LIVE.app = create_app(migrated)
    yield
    asgi.shutdown_lifespans()  # the app's lifespan disposes its engine, in the loop that used it
    LIVE.app = None


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_every_operation(case: schemathesis.Case[Any], live_app: None) -> None:
    CASES[case.operation.label] += 1
    checks = CHECKS_BUSINESS if case.operation.label in BUSINESS_RULES else CHECKS_ALL
    STATUSES[case.call_and_validate(checks=checks).status_code] += 1


def test_fuzz_ran_enough_cases(capsys: pytest.CaptureFixture[str]) -> None:
    if not RUN["started"]:
        pytest.skip("test_every_operation did not run in this session")
    total = sum(CASES.values())
    elapsed = time.monotonic() - RUN["started"]
    with capsys.disabled():  # in the test log of every run, not only of a failing one
        print(f"\nschemathesis: {total} cases over {len(CASES)} operations in {elapsed:.1f}s")
        for label, count in sorted(CASES.items()):
            print(f"  {count:5d}  {label}")
        print("  statuses: " + ", ".join(f"{code}: {n}" for code, n in sorted(STATUSES.items())))
    # Every case got past authentication, and some were served rather than all rejected.
    assert STATUSES[401] == 0 and sum(n for code, n in STATUSES.items() if code < 300) > total / 10, STATUSES
    assert len(CASES) == RUN["operations"], f"operations without a case: {RUN['operations']} documented"
    assert total >= MIN_CASES, f"only {total} schemathesis cases ran (want at least {MIN_CASES})"
