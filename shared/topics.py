"""Kafka topic names: defined once, prefixed by ``BLAMETRAIL_TOPIC_PREFIX``."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import Settings

RAW = "sentry.webhooks.raw"
ROUTED = "sentry.events.routed"
IGNORED = "sentry.events.ignored"
DLQ = "sentry.webhooks.dlq"


@dataclass(frozen=True)
class Topics:
    raw: str
    routed: str
    ignored: str
    dlq: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        p = settings.topic_prefix
        return cls(raw=p + RAW, routed=p + ROUTED, ignored=p + IGNORED, dlq=p + DLQ)

    def all(self) -> tuple[str, ...]:
        return (self.raw, self.routed, self.ignored, self.dlq)
