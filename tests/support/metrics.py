"""Reading Prometheus metrics in tests: a service's ``/metrics`` over HTTP, or this process's registry."""

from __future__ import annotations

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_all(port: int, client: httpx.AsyncClient | None = None) -> Samples:
    """Every sample a service serves on ``127.0.0.1:port/metrics``: (name, sorted labels) → value."""
    if client is None:
        async with httpx.AsyncClient(timeout=5) as own:
            text = (await own.get(f"http://127.0.0.1:{port}/metrics")).text
    else:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(port: int, name: str, client: httpx.AsyncClient | None = None, **labels: str) -> float:
    """One sample of a service's ``/metrics`` (0 when absent)."""
    return (await scrape_all(port, client)).get((name, tuple(sorted(labels.items()))), 0.0)


def local(name: str, **labels: str) -> float:
    """One sample of this test process's own registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
