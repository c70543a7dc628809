"""A real Prometheus for tests (``scripts/prometheus.sh`` in a run directory of the test's own),
scraping a stack's services, and its HTTP API."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import Settings

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prometheus.sh"


def require_prometheus() -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus not found: install Debian's prometheus package (scripts/test.sh does)")


def _script(action: str, run_dir: Path, env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run(
        ["bash", str(SCRIPT), action],
        env={**os.environ, **env, "BLAMETRAIL_RUN_DIR": str(run_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"prometheus.sh {action} failed:\n{done.stdout}\n{done.stderr}"
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


@dataclass
class Prometheus:
    url: str
    client: httpx.AsyncClient

    async def api(self, path: str, **params: str) -> Any:
        response = await self.client.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"/api/v1/{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) of ``expr`` now."""
        data = await self.api("query", query=expr)
        if data["resultType"] in ("vector", "matrix"):
            result: list[dict[str, Any]] = data["result"]
            return result
        return [{"metric": {}, "value": data["result"]}]

    async def families(self) -> dict[str, str]:
        """Every metric family the scraped targets announce (``# TYPE``, with or without samples) → type."""
        data: dict[str, list[dict[str, str]]] = await self.api("metadata")
        return {name: entries[0]["type"] for name, entries in data.items()}

    async def targets_up(self) -> dict[str, float]:
        """job → ``up`` of its target."""
        return {s["metric"]["job"]: float(s["value"][1]) for s in await self.query("up")}


@contextlib.asynccontextmanager
async def running_prometheus(
    settings: Settings, run_dir: Path, scrape_interval: str = "1s"
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping the ingest, router and writer of ``settings`` on 127.0.0.1 (no admin),
    with deploy/alerts.yml loaded; stopped at the end."""
    require_prometheus()
    env = {
        "BLAMETRAIL_INGEST_PORT": str(settings.ingest_port),
        "BLAMETRAIL_ROUTER_METRICS_PORT": str(settings.router_metrics_port),
        "BLAMETRAIL_WRITER_METRICS_PORT": str(settings.writer_metrics_port),
        "BLAMETRAIL_ADMIN_PORT": "0",
        "BLAMETRAIL_PROMETHEUS_PORT": "0",
        "BLAMETRAIL_PROMETHEUS_SCRAPE_INTERVAL": scrape_interval,
    }
    started = _script("start", run_dir, env)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            yield Prometheus(started["PROMETHEUS_URL"], client)
    finally:
        _script("stop", run_dir, env)
