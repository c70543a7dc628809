"""What a replay learns of each record it scans, and whether the filters select it.

Raw records are read as the router reads them (``router.consumer.decode_record``, which parses the
body with ``shared.sentry.parse_webhook``); routed and ignored events by their JSON; a dead letter
as a record of the topic it came from (its ``original_topic`` header).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiokafka.structs import ConsumerRecord

from router.consumer import Delivery, Undecodable, decode_record
from shared import events
from shared.kafka import dead_letter_headers, header_map
from shared.topics import Topics

# The headers the consumer runtime adds to a dead letter, from the one function that adds them.
DEAD_LETTER_HEADERS = frozenset(
    name for name, _ in dead_letter_headers([], error="", stage="", topic="", partition=0, offset=0)
)
ORIGINAL_TOPIC = "original_topic"
UNDECODABLE = "(undecodable)"


@dataclass(frozen=True)
class Filters:
    org: str | None = None
    project: str | None = None
    reason: str | None = None  # ignored topic only


@dataclass(frozen=True)
class Seen:
    """One scanned record: its headers, the projects it names (``None``: no project), the reason of
    an ignored event, the delivery of a raw record (``None`` when undecodable)."""

    record: ConsumerRecord
    headers: dict[str, str]
    projects: tuple[str | None, ...]
    reason: str | None = None
    delivery: Delivery | None = None

    @property
    def org(self) -> str:
        return self.headers.get(events.H_ORG, "")

    def selected_by(self, filters: Filters) -> bool:
        return (
            (filters.org is None or self.org == filters.org)
            and (filters.project is None or filters.project in self.projects)
            and (filters.reason is None or self.reason == filters.reason)
        )


def inspect(record: ConsumerRecord, topics: Topics) -> Seen:
    """Read ``record`` of any of the four topics."""
    headers = header_map(record.headers)
    origin = headers.get(ORIGINAL_TOPIC, record.topic) if record.topic == topics.dlq else record.topic
    if origin == topics.raw:
        try:
            delivery = decode_record(record)
        except Undecodable:
            return Seen(record, headers, (UNDECODABLE,))
        projects = tuple(p.slug for p in delivery.parsed.projects) or (None,)
        return Seen(record, headers, projects, delivery=delivery)
    try:
        event = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        return Seen(record, headers, (UNDECODABLE,))
    if not isinstance(event, dict):
        return Seen(record, headers, (UNDECODABLE,))
    return Seen(record, headers, (event.get("project_slug"),), reason=event.get("reason"))
