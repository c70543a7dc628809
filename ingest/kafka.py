"""Ingest's producer and bootstrap addresses (the producer's interface, its factory type, and closing
one now, are ``shared.producer``'s: the router and the writer replace broken producers too)."""

from __future__ import annotations

from shared.kafka import make_producer
from shared.producer import Producer
from shared.settings import Settings


def ingest_producer(settings: Settings, client_id: str = "blametrail-ingest") -> Producer:
    """The producer of ``sentry.webhooks.raw``: every BlameTrail producer's settings, with ingest's
    linger (``BLAMETRAIL_INGEST_LINGER_MS``)."""
    producer: Producer = make_producer(settings, client_id=client_id, linger_ms=settings.ingest_linger_ms)
    return producer


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """``host:port`` pairs of a bootstrap string (``[v6]:port`` allowed; port 9092 by default)."""
    out: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or "]" in port:
            host, port = item, "9092"
        out.append((host.strip("[]"), int(port)))
    return out
