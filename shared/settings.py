"""The one settings class of BlameTrail: every service reads ``BLAMETRAIL_*`` variables through it."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings shared by every service, the CLI and docker-compose.yml (same variable names)."""

    model_config = SettingsConfigDict(env_prefix="BLAMETRAIL_", extra="ignore")

    # Connections
    kafka_bootstrap: str = "127.0.0.1:9092"
    database_url: str = "postgresql+psycopg://blametrail@127.0.0.1:5432/blametrail"
    topic_prefix: str = ""
    public_url: str = "http://127.0.0.1:8000"
    # Service logs: "json" lines (one webhook followable by delivery_id) or "text" for humans.
    log_format: Literal["json", "text"] = "json"
    # Fernet keys (comma-separated, newest first) encrypting the Sentry client secrets at rest: the
    # newest encrypts, any decrypts. Empty: the public development key, with a warning (shared/secrets.py).
    secret_keys: str = Field(default="", repr=False)

    # Topics
    topic_partitions: int = Field(default=6, ge=1)
    topic_replication_factor: int = Field(default=1, ge=1)
    # Sentry error and event-alert bodies embed whole events: hundreds of KB. Leave headroom over the
    # ingest body limit for headers and the routed/ignored envelopes.
    kafka_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024 * 1024)

    # Ingest
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8000
    ingest_workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    publish_timeout_ms: int = Field(default=300, ge=10)
    # How long ingest's producer holds a partition's first record for more to send with it. 20 ms
    # instead of 5: 14-16 % less CPU over the whole pipeline at 1,000 webhooks/s (Kafka and router
    # included) and ~10 ms more on each answer, but a saturated ingest acknowledged 25-35 % fewer
    # webhooks a second (docs/benchmarks.md, ninth session): longer only where CPU is short and
    # bursts are not. At most half of publish_timeout_ms, or webhooks would spool instead.
    ingest_linger_ms: int = Field(default=5, ge=0, le=1000)
    # A sender whose request head, then body, does not arrive within this gets 408 and is disconnected.
    ingest_read_timeout_seconds: float = Field(default=5.0, gt=0)
    secret_cache_ttl_seconds: float = Field(default=5.0, ge=0)
    # Local durable spool for when Kafka cannot acknowledge within publish_timeout_ms.
    spool_dir: str = "/var/tmp/blametrail-spool"
    spool_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024 * 1024)
    ingest_max_inflight: int = Field(default=1000, ge=1)
    # Load shedding: a webhook arriving while the event loop runs this late (or the fastest recent
    # answers took twice this), or while this many requests are already in flight, is answered 503
    # overloaded at once (ingest/app.py, LoadMonitor) rather than answered after Sentry's 1 s budget.
    ingest_overload_lag_seconds: float = Field(default=0.25, gt=0)
    ingest_overload_max_requests: int = Field(default=1000, ge=1)

    # Router
    router_group: str = "blametrail-router"
    router_metrics_port: int = 9101
    mapping_refresh_seconds: float = Field(default=30.0, gt=0)
    # Stop loudly when more than this share of the last dlq_window records went to the DLQ.
    router_dlq_max_ratio: float = Field(default=0.1, gt=0, le=1)
    router_dlq_window: int = Field(default=1000, ge=10)
    # Sentry times further than this before or after the webhook's receipt are replaced by the
    # receipt time (and flagged on the audit record): they cannot be right, and some cannot be read back.
    event_time_before_days: float = Field(default=365, gt=0)
    event_time_after_hours: float = Field(default=24, gt=0)

    # Incident writer
    writer_group: str = "blametrail-writer"
    writer_metrics_port: int = 9102
    # A batch that fails for the database's sake (outage, lost connection, deadlock) is retried after
    # writer_retry_initial_seconds, doubling up to writer_retry_max_seconds, with partitions paused.
    writer_retry_initial_seconds: float = Field(default=0.2, gt=0)
    writer_retry_max_seconds: float = Field(default=5.0, gt=0)
    # One attempt at a batch (its transaction, or the bisection of a poisoned batch) gives up after this.
    writer_write_timeout_seconds: float = Field(default=60.0, gt=0)
    # Stop loudly when more than this share of the last writer_dlq_window records went to the DLQ.
    writer_dlq_max_ratio: float = Field(default=0.1, gt=0, le=1)
    writer_dlq_window: int = Field(default=1000, ge=10)
    # The writer's batches may be larger than consumer_batch_max: its cost is per batch (a handful of
    # round trips, one transaction), so under lag bigger batches drain faster; at low rates a poll
    # returns what is there and batches stay small.
    writer_batch_max: int = Field(default=2000, ge=1)
    # A batch of at least twice writer_split_min_events is written as up to writer_parallel_writes
    # transactions at once, split by Kafka key (an issue's records stay together and in order): the
    # writer's Python and the database work side by side instead of in turn (docs/writer.md).
    writer_parallel_writes: int = Field(default=2, ge=1, le=16)
    writer_split_min_events: int = Field(default=250, ge=1)

    # Consumers
    # Router and writer lower their CPU priority by this much (nice) when they start: on a machine
    # they share with ingest, ingest's answers (Sentry's 1 s budget, no retry) come first and the
    # consumers catch up from Kafka. 0 keeps the priority they were started with.
    consumer_nice: int = Field(default=10, ge=0, le=19)
    consumer_batch_max: int = Field(default=500, ge=1)
    consumer_batch_timeout_ms: int = Field(default=200, ge=1)
    # How long the broker may hold a consumer's fetch for partitions with no new records: a fetch for
    # idle partitions holds back the busy ones this long (why: docs/benchmarks.md, fifth session).
    consumer_fetch_max_wait_ms: int = Field(default=100, ge=1, le=500)
    # The broker answers a fetch once this much is there, or when the wait above is over: fewer,
    # larger batches under load.
    consumer_fetch_min_bytes: int = Field(default=16 * 1024, ge=1)
    # The largest record batch the router (and a dead-letter send) builds for one partition. The
    # idempotent producer has one batch of a partition in flight at a time, and a further batch waits
    # for the one before to be acknowledged: aiokafka's 16 KB cut a router batch of 500 into ~6 round
    # trips a partition. At most kafka_max_message_bytes (our topics' max.message.bytes).
    consumer_produce_batch_bytes: int = Field(default=1024 * 1024, ge=16 * 1024)
    # At a rebalance, how long to let the in-flight batch commit before abandoning it (it is then
    # redelivered). Keep it well below the group's rebalance timeout (aiokafka: the 10 s session timeout).
    consumer_revoke_wait_seconds: float = Field(default=3.0, ge=0)
    # The dead-letter budgets trip only when the dead letters come from at least this many
    # organizations: one tenant's bad records never stop the others.
    consumer_dlq_min_orgs: int = Field(default=3, ge=1)

    # Admin
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001

    @model_validator(mode="after")
    def _batches_fit_the_topics(self) -> Settings:
        if self.consumer_produce_batch_bytes > self.kafka_max_message_bytes:
            raise ValueError("consumer_produce_batch_bytes must not exceed kafka_max_message_bytes")
        return self

    @model_validator(mode="after")
    def _linger_inside_the_publish_timeout(self) -> Settings:
        if self.ingest_linger_ms * 2 > self.publish_timeout_ms:
            raise ValueError("ingest_linger_ms must be at most half of publish_timeout_ms")
        return self

    def public(self) -> dict[str, object]:
        """The effective settings without secrets (logged at startup): keys dropped, passwords masked."""
        values = self.model_dump(exclude={"secret_keys"})
        values["database_url"] = _mask_password(self.database_url)
        values["secret_keys"] = f"{len([k for k in self.secret_keys.split(',') if k.strip()])} key(s)"
        return values

    def webhook_url(self, org_slug: str) -> str:
        return f"{self.public_url.rstrip('/')}/webhooks/sentry/{org_slug}"


def _mask_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not (sep and at) or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
