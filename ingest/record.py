"""What ingest makes durable: one record for the raw topic, as Kafka or the spool receives it."""

from __future__ import annotations

from dataclasses import dataclass

ROW_OVERHEAD = 64  # bytes counted per record against the spool's limit, besides its payload

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """The record of one webhook (key, exact body, headers) and when it arrived (Unix seconds)."""

    key: bytes
    value: bytes
    headers: Headers
    received_at: float

    @property
    def size(self) -> int:
        """Payload bytes as the spool counts them: key, value, headers and ``ROW_OVERHEAD``."""
        return len(self.key) + len(self.value) + sum(len(k) + len(v) for k, v in self.headers) + ROW_OVERHEAD

    @property
    def timestamp_ms(self) -> int:
        return int(self.received_at * 1000)
