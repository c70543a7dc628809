"""The metrics catalogue of docs/operations.md: every metric of shared/metrics.py, with its type and
labels, nothing extra; and each service's live ``/metrics`` announces the metrics catalogued for it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

import shared.metrics
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
SECTION = "## Metrics catalogue"


@dataclass(frozen=True)
class Entry:
    type: str
    labels: tuple[str, ...]
    services: tuple[str, ...]


def split(cell: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in cell.split(",") if part.strip())


def catalogue() -> dict[str, Entry]:
    """Exposed metric name → its row of the catalogue table."""
    text = OPERATIONS.read_text()
    assert SECTION in text, f"docs/operations.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    entries: dict[str, Entry] = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        assert name not in entries, f"{name} is catalogued twice"
        entries[name] = Entry(cells[1], split(cells[2]), split(cells[3]))
    return entries


def defined() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric of shared/metrics.py: the name ``/metrics`` announces in its ``# TYPE`` line
    (counters with ``_total``) → (type, label names)."""
    out = {}
    for metric in vars(shared.metrics).values():
        if isinstance(metric, MetricWrapperBase):
            kind = str(metric._type)
            out[f"{metric._name}_total" if kind == "counter" else metric._name] = (kind, tuple(metric._labelnames))
    return out


def test_catalogue_lists_every_metric_of_shared_metrics_and_nothing_else() -> None:
    documented = catalogue()
    metrics = defined()
    assert metrics, "no metric found in shared/metrics.py"
    assert sorted(set(metrics) - set(documented)) == [], "defined but not catalogued in docs/operations.md"
    assert sorted(set(documented) - set(metrics)) == [], "catalogued but not defined in shared/metrics.py"
    for name, (kind, labels) in metrics.items():
        entry = documented[name]
        assert (entry.type, entry.labels) == (kind, labels), f"{name}: catalogued as {entry}, defined {kind} {labels}"
        assert entry.services and set(entry.services) <= {"ingest", "router", "writer"}, f"{name}: {entry.services}"


async def test_each_service_announces_its_catalogued_metrics(stack: Stack) -> None:
    ports = {
        "ingest": stack.settings.ingest_port,
        "router": stack.settings.router_metrics_port,
        "writer": stack.settings.writer_metrics_port,
    }
    documented = catalogue()
    async with httpx.AsyncClient(timeout=5) as client:
        for service, port in ports.items():
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            # Labelled families without a sample yet still have their # HELP and # TYPE lines.
            announced = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
            for name, entry in documented.items():
                if service in entry.services:
                    assert announced.get(name) == entry.type, (
                        f"{service} /metrics: {name} catalogued as a {entry.type}, announced {announced.get(name)}"
                    )
