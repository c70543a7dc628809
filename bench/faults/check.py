"""What a fault soak must leave behind, checked from what was sent and what PostgreSQL holds.

Pure functions over plain rows, so the checker itself is tested on crafted input
(``tests/bench/test_faults_smoke.py``): a checker that cannot fail proves nothing.

- **lost**: a delivery answered 200 without an audit record.
- **duplicated in effect**: an incident counting more occurrences than the audited deliveries of its
  issue imply, or an incident no delivery implies; **undercounted**: fewer.
- an audit record twice for one delivery and project, for a delivery never sent, or with the wrong
  outcome (routed for a mapped project, ignored otherwise); a timeline whose length is not the count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.harness import percentiles

BUDGET = 1.0  # seconds: Sentry's answer budget


@dataclass(frozen=True)
class Sent:
    delivery_id: str
    project: str
    issue_id: str
    status: int = 0  # 0: no answer
    latency: float = 0.0  # seconds from the due time to the answer


@dataclass(frozen=True)
class Audit:
    delivery_id: str
    project: str | None
    outcome: str


@dataclass(frozen=True)
class IncidentRow:
    service_id: int
    incident_key: str
    event_count: int
    timeline: int  # opened + updated + reopened entries


def incident_key(issue_id: str) -> str:
    return f"issue:{issue_id}"


def check(
    sent: Sequence[Sent],
    services: Mapping[str, int | None],
    audit: Iterable[Audit],
    incidents: Iterable[IncidentRow],
) -> dict[str, Any]:
    """The soak's verdict. ``services``: project slug → the service its active mapping routes to
    (None: the project's webhooks are ignored)."""
    by_delivery = {s.delivery_id: s for s in sent}
    audit = list(audit)
    per_key = Counter((a.delivery_id, a.project) for a in audit)
    audited = {a.delivery_id for a in audit}
    acked = [s for s in sent if s.status == 200]
    lost = [s.delivery_id for s in acked if s.delivery_id not in audited]
    unknown = [a.delivery_id for a in audit if a.delivery_id not in by_delivery]
    wrong = [
        a.delivery_id
        for a in audit
        if a.delivery_id in by_delivery
        and a.outcome != ("routed" if services.get(by_delivery[a.delivery_id].project) else "ignored")
    ]

    expected: Counter[tuple[int, str]] = Counter()
    for delivery_id in audited & by_delivery.keys():
        s = by_delivery[delivery_id]
        service = services.get(s.project)
        if service is not None:
            expected[(service, incident_key(s.issue_id))] += 1
    found = {(i.service_id, i.incident_key): i for i in incidents}
    duplicated = sum(max(0, i.event_count - expected.get(key, 0)) for key, i in found.items())
    undercounted = sum(max(0, n - (found[key].event_count if key in found else 0)) for key, n in expected.items())
    timeline_mismatch = sum(1 for i in found.values() if i.timeline != i.event_count)

    latencies = [s.latency for s in acked]
    answers = Counter(s.status for s in sent)
    summary: dict[str, Any] = {
        "sent": len(sent),
        "acked": len(acked),
        "non_200": {str(k): v for k, v in sorted(answers.items()) if k != 200},
        "non_200_total": len(sent) - len(acked),
        "audited": len(audited),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "audit_duplicates": sum(n - 1 for n in per_key.values() if n > 1),
        "audit_unknown": len(unknown),
        "audit_wrong_outcome": len(wrong),
        "incidents": len(found),
        "incidents_expected": len(expected),
        "occurrences": sum(i.event_count for i in found.values()),
        "duplicated_in_effect": duplicated,
        "undercounted": undercounted,
        "timeline_mismatch": timeline_mismatch,
        "ack_ms": percentiles(latencies),
        "acks_over_1s": sum(1 for v in latencies if v > BUDGET),
    }
    return summary


def failures(summary: Mapping[str, Any]) -> list[str]:
    """The guarantees a summary breaks (empty: all held)."""
    zero = [
        "lost",
        "duplicated_in_effect",
        "undercounted",
        "audit_duplicates",
        "audit_unknown",
        "audit_wrong_outcome",
        "timeline_mismatch",
        "acks_over_1s",
        "non_200_total",
    ]
    out = [f"{name}={summary[name]}" for name in zero if summary.get(name)]
    if summary.get("drained") is False:
        out.append("not drained")
    if not summary.get("acked"):
        out.append("nothing acked")
    return out
