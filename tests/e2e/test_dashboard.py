"""The Grafana dashboard (deploy/grafana/dashboards/blametrail.json): provisioned by docker-compose.yml,
and every panel's PromQL answers with data from a real Prometheus scraping the running pipeline, which
has deploy/alerts.yml loaded."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import wait_until
from tests.support.prometheus import Prometheus, running_prometheus
from tests.support.sentry import issue_body
from tests.support.stack import Stack, post

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "blametrail.json"
RULES = ROOT / "deploy" / "alerts.yml"
# Grafana's variables in the queries, as Grafana would fill them in for a 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}
# What the operations issue asks the dashboard to show (each must be queried by some panel).
REQUIRED_METRICS = {
    "blametrail_ingest_requests_total",
    "blametrail_ingest_request_seconds_bucket",
    "blametrail_ingest_spool_depth",
    "blametrail_ingest_spool_oldest_age_seconds",
    "blametrail_router_events_total",
    "blametrail_router_mapping_cache_age_seconds",
    "blametrail_router_mapping_cache_entries",
    "blametrail_writer_events_total",
    "blametrail_writer_batch_seconds_bucket",
    "blametrail_writer_incidents_total",
    "blametrail_consumer_lag",
    "blametrail_dlq_messages_total",
    "blametrail_replay_records_total",
    "blametrail_router_flagged_events_total",
    "blametrail_router_renamed_projects_total",
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel but the rows (also those inside collapsed rows)."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return found


def queries() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL with Grafana's variables filled in) of every target."""
    out = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a Grafana variable the test cannot fill in: {expr}"
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bblametrail_[a-z0-9_]+", expr))


def test_dashboard_is_provisioned_with_the_prometheus_datasource() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["services"]["grafana"]["volumes"] if ":" in volume)
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "blametrail.yml").read_text())
    paths = [p["options"]["path"] for p in provider["providers"]]
    assert mounts.get("./deploy/grafana/dashboards") in paths, f"dashboards not mounted where provided: {mounts}"
    assert mounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"

    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"] if d["type"] == "prometheus"}
    ids = [p["id"] for p in dashboard()["panels"]] + [p["id"] for p in panels() if p not in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels():
        assert panel["targets"], f"{panel['title']}: no query"
        for source in (panel["datasource"], *(t["datasource"] for t in panel["targets"])):
            assert source["type"] == "prometheus" and source["uid"] in uids, f"{panel['title']}: datasource {source}"
    queried = set().union(*(metric_names(expr) for _, expr in queries()))
    assert REQUIRED_METRICS <= queried, f"no panel shows {sorted(REQUIRED_METRICS - queried)}"


async def test_every_panel_query_answers_from_a_real_prometheus(stack: Stack, tmp_path: Path) -> None:
    # Projects and issues no other test of the shared stack counts the audit records of.
    issue = str(9_700_000 + uuid.uuid4().int % 100_000)
    for action in ("created", "resolved", "ignored"):  # opened, resolved, archived
        response = await post(stack, issue_body(issue, project="email-worker", action=action))
        assert response.status_code == 200, response.text
    response = await post(stack, issue_body(issue + "1", project="dashboard-unmapped"))
    assert response.status_code == 200, response.text

    async with running_prometheus(stack.settings, tmp_path) as prometheus:
        await wait_until(lambda: all_up(prometheus), within=20, what="Prometheus scraping ingest, router, writer")

        async def empty_queries() -> list[str]:
            empty = [title for title, expr in queries() if not await prometheus.query(expr)]
            changes = {s["metric"].get("change") for s in await prometheus.query("blametrail_writer_incidents_total")}
            if {"opened", "resolved", "archived"} - changes:
                empty.append(f"incident changes so far: {sorted(c for c in changes if c)}")
            return empty

        await until_none(empty_queries, within=20, what="data for every panel")

        # A panel that falls back to 0 (`or vector(0)`) still names a metric the services must announce:
        # a renamed or removed metric fails here.
        families = await prometheus.families()
        for title, expr in queries():
            for name in metric_names(expr):
                family = name if name in families else re.sub(r"_(bucket|sum|count)$", "", name)
                assert family in families, f"{title}: {name} is not a metric the services expose ({expr})"

        rules = await wait_until(lambda: evaluated_rules(prometheus), within=20, what="the alert rules evaluated")
        expected = yaml.safe_load(RULES.read_text())
        assert {g["name"]: [r["alert"] for r in g["rules"]] for g in expected["groups"]} == rules


async def all_up(prometheus: Prometheus) -> bool:
    up = await prometheus.targets_up()
    return up == {"ingest": 1.0, "router": 1.0, "writer": 1.0}


async def until_none(probe: Callable[[], Awaitable[list[str]]], *, within: float, what: str) -> None:
    """Poll ``probe`` until it finds nothing missing; fail with what was still missing after ``within`` s."""
    deadline = time.monotonic() + within
    while missing := await probe():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}; no data yet: {missing}"
        await asyncio.sleep(0.2)


async def evaluated_rules(prometheus: Prometheus) -> dict[str, list[str]] | None:
    """group → alert names of the loaded rules of deploy/alerts.yml, once every rule evaluated cleanly."""
    groups = (await prometheus.api("rules"))["groups"]
    assert groups and all(g["file"] == str(RULES) for g in groups), groups
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    if bad:
        return None
    return {g["name"]: [r["name"] for r in g["rules"]] for g in groups}
