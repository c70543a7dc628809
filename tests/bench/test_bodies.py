"""The benchmarks' webhook bodies: the router's mix as the issue defines it, and times of now."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.harness import MIX, UNMAPPED, mixed_bodies, read_bodies, write_bodies
from shared.sentry import parse_webhook


def test_mixed_bodies_are_the_issues_mix_with_one_in_five_unmapped_and_times_of_now() -> None:
    started = datetime.now(UTC)
    pairs = mixed_bodies(1000, project="payments-api")
    assert len({body for _, body in pairs}) == 1000  # every one a distinct delivery
    per_resource: Counter[str] = Counter()
    unmapped: Counter[str] = Counter()
    for resource, body in pairs:
        parsed = parse_webhook(resource, json.loads(body))
        assert parsed.known_resource
        slugs = [p.slug for p in parsed.projects]
        assert slugs in (["payments-api"], [UNMAPPED]), (resource, slugs)
        per_resource[resource] += 1
        unmapped[resource] += slugs == [UNMAPPED]
        assert parsed.occurred_at is not None
        assert started - timedelta(seconds=1) <= parsed.occurred_at <= datetime.now(UTC), (resource, parsed.occurred_at)
    weights = {resource: weight for resource, _, weight in MIX}
    assert per_resource == {resource: 1000 * weight // 10 for resource, weight in weights.items()}
    assert unmapped == {resource: count // 5 for resource, count in per_resource.items()}


def test_signed_bodies_for_the_load_generators_are_of_now(tmp_path: Path) -> None:
    path = write_bodies(tmp_path / "bodies.tsv", "secret", 3, project="payments-api")
    for _, body in read_bodies(path):
        parsed = parse_webhook("issue", json.loads(body))
        assert [p.slug for p in parsed.projects] == ["payments-api"]
        assert parsed.occurred_at is not None
        assert datetime.now(UTC) - parsed.occurred_at < timedelta(minutes=1)
