"""The router against the real broker and database: routing rules, live mapping changes, DLQ, crashes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from router.consumer import Router
from router.routing import OrgMappings
from shared import events
from shared.consumer import OffsetOutOfRange
from shared.kafka import create_topics
from shared.mappings import add_mapping, create_service, delete_mapping, edit_mapping
from shared.orgs import create_org
from shared.sentry import parse_webhook, partition_key
from shared.settings import Settings
from shared.topics import Topics
from tests.support import PRODUCT_PAGE_EXAMPLE, ServiceProcess, free_port, settings_env, wait_until
from tests.support.kafka import TopicReader
from tests.support.metrics import scrape, scrape_all
from tests.support.sentry import issue_body, payloads_dir

pytestmark = pytest.mark.integration

EXAMPLE = PRODUCT_PAGE_EXAMPLE


@dataclass
class Env:
    settings: Settings
    topics: Topics
    org: str
    org_id: int
    services: dict[str, int]
    mappings: dict[str, int]
    producer: AIOKafkaProducer
    outputs: dict[str, list[tuple[dict[str, str], dict[str, Any], bytes | None]]] = field(default_factory=dict)


async def make_env(base: Settings, sessions: async_sessionmaker[AsyncSession], **overrides: Any) -> Env:
    prefix = f"rt-{uuid.uuid4().hex[:8]}."
    settings = base.model_copy(
        update={"topic_prefix": prefix, "router_group": prefix + "router", "router_metrics_port": 0, **overrides}
    )
    await create_topics(settings)
    org = f"org-{uuid.uuid4().hex[:8]}"
    async with sessions() as session, session.begin():
        created = await create_org(session, org)
        services = {}
        mappings = {}
        for project, name, active in EXAMPLE:
            services[name] = (await create_service(session, created.org_id, name)).id
            view = await add_mapping(session, created.org_id, project, services[name], active=active)
            mappings[project] = view.id
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    return Env(settings, Topics.from_settings(settings), org, created.org_id, services, mappings, producer)


@pytest.fixture
async def env(topics: Settings, sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[Env]:
    env = await make_env(topics, sessions)
    yield env
    await env.producer.stop()


@pytest.fixture
async def router(env: Env) -> AsyncIterator[Router]:
    router = Router(env.settings)
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    await wait_until(lambda: _ready(router, task), within=30, what="router consuming")
    yield router
    stop.set()
    await asyncio.wait_for(task, 30)


async def _ready(router: Router, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
    return bool(router.consumer.assignment()) and router.cache.listening.is_set()


async def send_raw(env: Env, body: bytes, resource: str = "issue", org: str | None = None) -> str:
    """Publish like ingest does; returns the delivery id."""
    org = org or env.org
    delivery = events.delivery_id(org, resource, body)
    try:
        key = partition_key(org, parse_webhook(resource, orjson.loads(body))).encode()
    except orjson.JSONDecodeError:
        key = org.encode()
    headers = [
        (events.H_ORG, org.encode()),
        (events.H_RESOURCE, resource.encode()),
        (events.H_DELIVERY_ID, delivery.encode()),
        (events.H_RECEIVED_AT, events.rfc3339(events.utc_now()).encode()),
    ]
    await env.producer.send_and_wait(env.topics.raw, value=body, key=key, headers=headers)
    return delivery


def outputs(env: Env) -> TopicReader:
    """Reads routed, ignored and dlq from the beginning, without a consumer group."""
    return TopicReader(env.settings.kafka_bootstrap, (env.topics.routed, env.topics.ignored, env.topics.dlq))


async def test_product_page_example_routes_as_the_page_says(env: Env, router: Router) -> None:
    sent = {p: await send_raw(env, issue_body(f"1{i}", project=p)) for i, p in enumerate(
        ["frontend", "payments-api", "email-worker", "internal-tools", "marketing-site"]
    )}  # fmt: skip
    async with outputs(env) as out:
        await out.wait_for_count(5)
        routed = {e["project_slug"]: e for e in out.events(env.topics.routed)}
        ignored = {e["project_slug"]: e for e in out.events(env.topics.ignored)}
    assert set(routed) == {"frontend", "payments-api", "email-worker"}
    for project, name, _ in EXAMPLE[:3]:
        event = routed[project]
        assert event["service_id"] == env.services[name] and event["mapping_id"] == env.mappings[project]
        assert event["delivery_id"] == sent[project] and event["incident_key"] == event["sentry_issue_id"].join(
            ["issue:", ""]
        )
        assert event["raw"]["topic"] == env.topics.raw
    assert {p: e["reason"] for p, e in ignored.items()} == {
        "internal-tools": "mapping_inactive",
        "marketing-site": "unmapped",
    }
    assert ignored["internal-tools"]["service_id"] == env.services["Internal Tools"]


async def test_outputs_keep_the_raw_key(env: Env, router: Router) -> None:
    await send_raw(env, issue_body("777", project="frontend"))
    async with outputs(env) as out:
        await out.wait_for_count(1)
        [record] = out.records
    headers, key = record.headers, record.key
    assert key == f"{env.org}/777".encode() and headers[events.H_ORG] == env.org


async def test_every_resource_is_classified(env: Env, router: Router) -> None:
    cases = {
        "error": ("error.created.json", "ignored", "unmapped"),  # front-end is not mapped
        "metric_alert": ("metric_alert.resolved.json", "ignored", "unmapped"),
        "seer": ("seer.root_cause_started.json", "ignored", "no_project"),
        "installation": ("installation.created.json", "ignored", "no_project"),
        "brand_new": ("issue.created.json", "ignored", "unsupported_resource"),
    }
    for resource, (name, _, _) in cases.items():
        await send_raw(env, (payloads_dir() / name).read_bytes(), resource)
    await send_raw(env, issue_body("5", project="frontend"), org="no-such-org-anywhere")
    async with outputs(env) as out:
        await out.wait_for_count(6)
        got = {(e["resource"], e["org"]): e.get("reason") for e in out.events(env.topics.ignored)}
    for resource, (_, _, reason) in cases.items():
        assert got[(resource, env.org)] == reason, resource
    assert got[("issue", "no-such-org-anywhere")] == "unknown_org"


async def test_metric_alert_with_several_projects_routes_each(env: Env, router: Router) -> None:
    body = json.loads((payloads_dir() / "metric_alert.resolved.json").read_bytes())
    body["action"] = "critical"
    body["data"]["metric_alert"]["projects"] = ["frontend", "payments-api", "internal-tools", "nowhere"]
    delivery = await send_raw(env, orjson.dumps(body), "metric_alert")
    async with outputs(env) as out:
        await out.wait_for_count(4)
        routed = out.events(env.topics.routed)
        ignored = out.events(env.topics.ignored)
    assert sorted(e["project_slug"] for e in routed) == ["frontend", "payments-api"]
    assert {e["project_slug"]: e["reason"] for e in ignored} == {
        "internal-tools": "mapping_inactive",
        "nowhere": "unmapped",
    }
    assert {e["delivery_id"] for e in routed + ignored} == {delivery}
    assert {e["incident_key"] for e in routed} == {"metric_alert:1"}


async def test_poison_message_goes_to_dlq_and_the_next_is_routed(env: Env, router: Router) -> None:
    poison = b"\x00\xffnot json at all"
    await env.producer.send_and_wait(
        env.topics.raw, value=poison, key=b"k", headers=[(events.H_ORG, env.org.encode()), ("x-extra", b"kept")]
    )
    await env.producer.send_and_wait(env.topics.raw, value=b"{}", key=b"k")  # no org header at all
    await send_raw(env, issue_body("42", project="frontend"))
    async with outputs(env) as out:
        await out.wait_for_count(3)
        dlq = [(r.headers, r.value) for r in out.on(env.topics.dlq)]
        routed = out.events(env.topics.routed)
    assert [v for _, v in dlq] == [poison, b"{}"]
    headers = dlq[0][0]
    assert headers["x-extra"] == "kept" and headers["stage"] == "router.decode"
    assert headers["original_topic"] == env.topics.raw and headers["original_offset"].isdigit()
    assert "not JSON" in headers["error"]
    assert [e["sentry_issue_id"] for e in routed] == ["42"]


async def latency_until(router: Router, org: str, project: str, expect: tuple[int, bool] | None) -> float:
    started = time.perf_counter()

    async def applied() -> bool:
        entry = (router.cache.lookup(org) or OrgMappings()).get(project)
        now = None if entry is None else (entry.service_id, entry.active)
        return now == expect

    await wait_until(applied, within=5, what=f"mapping of {project} to become {expect}")
    return time.perf_counter() - started


async def test_mapping_changes_take_effect_while_running(
    env: Env, router: Router, sessions: async_sessionmaker[AsyncSession]
) -> None:
    web, payments = env.services["Web App"], env.services["Payments API"]
    timings = []
    changes: list[tuple[str, tuple[int, bool] | None]] = [("disable", (web, False)), ("enable", (web, True)),
                                                          ("repoint", (payments, True)), ("delete", None)]  # fmt: skip
    async with outputs(env) as out:
        for change, expect in changes:
            async with sessions() as session, session.begin():
                if change == "delete":
                    await delete_mapping(session, env.org_id, env.mappings["frontend"])
                elif change == "repoint":
                    await edit_mapping(session, env.org_id, env.mappings["frontend"], service_id=payments)
                else:
                    await edit_mapping(session, env.org_id, env.mappings["frontend"], active=change == "enable")
            timings.append(await latency_until(router, env.org, "frontend", expect))
            await send_raw(env, issue_body(f"9{len(timings)}", project="frontend"))
            # Routed with the mapping in force when the router takes it: wait before the next change.
            await out.wait_for_count(len(timings))
        assert max(timings) < 1.0, timings
        seen = sorted(
            (e["sentry_issue_id"], e.get("reason"), e.get("service_id"))
            for e in out.events(env.topics.routed) + out.events(env.topics.ignored)
        )
    assert seen == [
        ("91", "mapping_inactive", web),
        ("92", None, web),
        ("93", None, payments),
        ("94", "unmapped", None),
    ]


async def test_dead_letter_budget_stops_the_router_loudly(
    topics: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A systemic failure: undecodable records of several organizations."""
    env = await make_env(topics, sessions, router_dlq_window=10, router_dlq_max_ratio=0.3)
    try:
        router = Router(env.settings)
        task = asyncio.create_task(router.run(asyncio.Event()))
        for n in range(5):
            await env.producer.send_and_wait(env.topics.raw, value=b"garbage", headers=[("org", f"org-{n}".encode())])
        with pytest.raises(RuntimeError, match="dead-lettered"):
            await asyncio.wait_for(task, 30)
    finally:
        await env.producer.stop()


async def test_one_organizations_bad_records_never_stop_the_router(
    topics: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    env = await make_env(topics, sessions, router_dlq_window=10, router_dlq_max_ratio=0.3)
    try:
        router = Router(env.settings)
        stop = asyncio.Event()
        task = asyncio.create_task(router.run(stop))
        for _ in range(20):
            await env.producer.send_and_wait(env.topics.raw, value=b"garbage", headers=[("org", b"careless")])
        await send_raw(env, issue_body("81", project="frontend"))
        async with outputs(env) as out:
            await out.wait_for_count(1, [env.topics.routed])
            await out.wait_for_count(20, [env.topics.dlq])
        assert not task.done(), task.exception() if task.done() else None
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        await env.producer.stop()


def router_process(env: Env, log_dir: Path, port: int) -> ServiceProcess:
    return ServiceProcess("router", settings_env(env.settings, BLAMETRAIL_ROUTER_METRICS_PORT=str(port)), log_dir)


async def test_router_killed_mid_batch_loses_nothing(env: Env, tmp_path: Path) -> None:
    total = 3000
    sends = []
    for i in range(total):
        body = issue_body(str(100000 + i), project=EXAMPLE[i % 4][0])
        sends.append(
            await env.producer.send(
                env.topics.raw,
                value=body,
                key=f"{env.org}/{100000 + i}".encode(),
                headers=[(events.H_ORG, env.org.encode()), (events.H_RESOURCE, b"issue"),
                         (events.H_DELIVERY_ID, events.delivery_id(env.org, "issue", body).encode())],
            )
        )  # fmt: skip
    await asyncio.gather(*sends)
    async with outputs(env) as out:
        first = router_process(env, tmp_path, free_port())
        try:
            await out.wait_for_count(300, within=60)  # mid-stream
        finally:
            first.kill()
        assert len(out.records) < total, "the router finished before it could be killed: send more"
        second = router_process(env, tmp_path, free_port())
        expected = {str(100000 + i) for i in range(total)}

        def seen() -> set[str]:
            return {r.json()["sentry_issue_id"] for r in out.records if r.topic != env.topics.dlq}

        async def all_seen() -> bool:
            return seen() >= expected

        try:
            # Counting records is not enough: the replayed part of the stream appears twice.
            await wait_until(all_seen, within=90, what="every raw message downstream")
        finally:
            assert second.stop() == 0, second.output()
    assert seen() == expected
    assert len(out.records) >= total


async def test_two_routers_share_the_partitions(env: Env, tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    procs = [router_process(env, tmp_path, port) for port in ports]
    try:
        async with httpx.AsyncClient() as client:

            async def both_assigned() -> bool:
                owned = []
                for port in ports:
                    try:
                        n = await scrape(
                            port, "blametrail_consumer_assigned_partitions", client, group=env.settings.router_group
                        )
                    except httpx.TransportError:
                        return False
                    owned.append(n)
                return all(n >= 1 for n in owned) and sum(owned) == env.settings.topic_partitions

            await wait_until(both_assigned, within=60, what="both routers assigned")
            total = 600
            for i in range(total):
                await send_raw(env, issue_body(str(200000 + i), project=EXAMPLE[i % 3][0]))
            async with outputs(env) as out:
                await out.wait_for_count(total, within=60)
            routed_by = []
            for port in ports:
                samples = await scrape_all(port, client)
                routed_by.append(
                    sum(v for (name, labels), v in samples.items()
                        if name == "blametrail_router_events_total" and ("outcome", "routed") in labels)
                )  # fmt: skip
        assert sum(routed_by) >= total and all(n > 0 for n in routed_by), routed_by
    finally:
        for p in procs:
            p.stop()


async def test_an_out_of_range_committed_offset_stops_the_router_loudly(env: Env) -> None:
    """Records past the committed offset are gone (retention, a recreated topic): never rewind silently."""
    await send_raw(env, issue_body("1", project="frontend"))
    committer = AIOKafkaConsumer(
        bootstrap_servers=env.settings.kafka_bootstrap, group_id=env.settings.router_group, enable_auto_commit=False
    )
    await committer.start()
    try:
        parts = [TopicPartition(env.topics.raw, p) for p in range(env.settings.topic_partitions)]
        committer.assign(parts)
        await committer.commit({tp: 10**9 for tp in parts})
    finally:
        await committer.stop()
    with pytest.raises(OffsetOutOfRange, match="reset-offsets"):
        await asyncio.wait_for(Router(env.settings).run(asyncio.Event()), 60)
