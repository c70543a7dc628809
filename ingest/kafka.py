"""Ingest's bootstrap addresses (the producer's interface, its factory type, and closing one now, are
``shared.producer``'s: the router and the writer replace broken producers too)."""

from __future__ import annotations


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
