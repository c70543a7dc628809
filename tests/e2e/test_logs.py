"""One webhook can be followed through the three services' logs by its delivery id."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.events import delivery_id
from tests.support import wait_until
from tests.support.sentry import issue_body
from tests.support.stack import Stack, audit_for, post

pytestmark = pytest.mark.integration


async def test_grep_for_a_delivery_id_finds_its_path_through_every_service(
    stack: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    body = issue_body("7300001", project="payments-api")
    assert (await post(stack, body)).status_code == 200
    delivery = delivery_id(stack.org, "issue", body)
    await wait_until(lambda: audit_for(sessions, stack.org, "payments-api"), within=60, what="audit")

    async def logged_everywhere() -> dict[str, list[dict[str, object]]] | None:
        lines: dict[str, list[dict[str, object]]] = {}
        for process in stack.processes:
            found = [json.loads(line) for line in process.output().splitlines() if delivery in line]
            lines[process.command] = [line for line in found if line.get("delivery_id") == delivery]
        return lines if all(lines.values()) else None

    lines = await wait_until(logged_everywhere, within=30, what="the delivery id in every service's log")
    assert [(line["service"], line["event"]) for line in lines["ingest"]] == [("ingest", "accepted")]
    assert [(line["service"], line["event"], line["project"]) for line in lines["router"]] == [
        ("router", "routed", "payments-api")
    ]
    assert [(line["service"], line["event"]) for line in lines["writer"]] == [("writer", "written")]


def test_every_service_logs_its_effective_settings_without_secrets(stack: Stack) -> None:
    for process in stack.processes:
        lines = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
        [settings] = [line["settings"] for line in lines if line.get("event") == "settings"]
        assert isinstance(settings, dict) and settings["kafka_bootstrap"] == stack.settings.kafka_bootstrap
        assert settings["secret_keys"].endswith("key(s)"), process.command
        assert stack.secret not in process.output()
