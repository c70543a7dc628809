"""Prometheus metric definitions: every metric name of BlameTrail, once.

Prefix ``blametrail_``; counters end in ``_total``, durations in ``_seconds``; labels never carry
ids of unbounded sets (no delivery or issue ids; org and project only on the per-mapping counter,
whose label sets are bounded by the mapping table).

Ingest with several workers (``--workers N``) runs prometheus_client's multiprocess mode: every
worker writes its values to ``PROMETHEUS_MULTIPROC_DIR`` and any worker's ``/metrics`` serves the
sum (gauges: ``multiprocess_mode`` below), so a scrape sees one consistent set whichever worker answers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Dense below one second: Sentry's answer budget.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.6,
    0.75,
    0.9,
    1.0,
    2.0,
    5.0,
)
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 524288, 1048576, 2097152, 4194304)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

# Ingest
INGEST_REQUESTS = Counter(
    "blametrail_ingest_requests_total", "Webhook requests by Sentry resource and outcome", ["resource", "outcome"]
)
INGEST_REQUEST_SECONDS = Histogram(
    "blametrail_ingest_request_seconds", "Webhook request latency", buckets=LATENCY_BUCKETS
)
INGEST_PUBLISH_SECONDS = Histogram(
    "blametrail_ingest_publish_seconds", "Time until Kafka acknowledged a webhook", buckets=LATENCY_BUCKETS
)
INGEST_BODY_BYTES = Histogram("blametrail_ingest_body_bytes", "Webhook body sizes", buckets=SIZE_BUCKETS)
INGEST_SPOOL_DEPTH = Gauge(
    "blametrail_ingest_spool_depth", "Webhooks in the local spool waiting for Kafka", multiprocess_mode="livesum"
)
INGEST_SPOOL_BYTES = Gauge(
    "blametrail_ingest_spool_bytes", "Bytes of webhooks in the local spool", multiprocess_mode="livesum"
)
INGEST_SPOOL_OLDEST_AGE = Gauge(
    "blametrail_ingest_spool_oldest_age_seconds",
    "Age of the oldest spooled webhook (0 when empty)",
    multiprocess_mode="livemax",
)
INGEST_SPOOL_DRAINED = Counter("blametrail_ingest_spool_drained_total", "Spooled webhooks delivered to Kafka")
INGEST_PRODUCER_RESTARTS = Counter("blametrail_ingest_producer_restarts_total", "Kafka producer recreations")
INGEST_ACCEPT_WAIT_SECONDS = Histogram(
    "blametrail_ingest_accept_wait_seconds",
    "How long a new connection waited in the kernel before ingest accepted it (the listen queue: before"
    " any request histogram sees it); from TCP_INFO, millisecond resolution",
    buckets=LATENCY_BUCKETS,
)
INGEST_LOOP_LAG = Gauge(
    "blametrail_ingest_event_loop_lag_seconds",
    "How late ingest's event loop last ran a 50 ms ticker (CPU starvation, long callbacks); past"
    " BLAMETRAIL_INGEST_OVERLOAD_LAG_SECONDS webhooks are answered 503 overloaded",
    multiprocess_mode="livemax",
)

# Router
ROUTER_EVENTS = Counter("blametrail_router_events_total", "Events routed or ignored, by reason", ["outcome", "reason"])
ROUTER_MAPPING_EVENTS = Counter(
    "blametrail_router_mapping_events_total",
    "Events of mapped projects by org, project and outcome (routed, or ignored while the mapping is disabled)",
    ["org", "project", "outcome"],
)
ROUTER_FLAGGED = Counter(
    "blametrail_router_flagged_events_total",
    "Events whose values the boundary check replaced (times out of range) or cleaned (unstorable text)",
    ["flag"],
)
ROUTER_RENAMED_PROJECTS = Counter(
    "blametrail_router_renamed_projects_total",
    "Events of a project renamed in Sentry, routed by its project id to the mapping of its old slug",
)
MAPPING_CACHE_ENTRIES = Gauge("blametrail_router_mapping_cache_entries", "Mappings in the router cache")
MAPPING_CACHE_AGE = Gauge(
    "blametrail_router_mapping_cache_age_seconds", "Seconds since the mapping cache was last refreshed"
)
MAPPING_CACHE_REFRESHES = Counter(
    "blametrail_router_mapping_cache_refreshes_total", "Mapping cache refreshes by trigger", ["trigger"]
)
MAPPING_CACHE_REFRESH_SECONDS = Histogram(
    "blametrail_router_mapping_cache_refresh_seconds", "Mapping cache refresh duration", buckets=LATENCY_BUCKETS
)

# Incident writer
WRITER_EVENTS = Counter("blametrail_writer_events_total", "Events written by outcome", ["outcome"])
WRITER_BATCH_SECONDS = Histogram(
    "blametrail_writer_batch_seconds", "Database write time of one batch", buckets=LATENCY_BUCKETS
)
INCIDENTS = Counter("blametrail_writer_incidents_total", "Incident changes", ["change"])
WRITER_DATABASE_UP = Gauge(
    "blametrail_writer_database_up", "1 while the writer can write to Postgres; 0 while it waits, partitions paused"
)
WRITER_RETRIES = Counter(
    "blametrail_writer_retries_total", "Failed batch write attempts that will be retried, by reason", ["reason"]
)
WRITER_TIMELINE_EVENTS = Counter("blametrail_writer_timeline_events_total", "Entries added to incident timelines")

# Replays (``blametrail replay``): republished records as the consumers see them (raw: router;
# routed/ignored: writer).
REPLAYED_RECORDS = Counter("blametrail_replay_records_total", "Records republished by a replay, by topic", ["topic"])

# Consumers (router and writer), labelled by consumer group name (a small fixed set)
CONSUMER_BATCH_SIZE = Histogram(
    "blametrail_consumer_batch_size", "Records per consumed batch", ["group"], buckets=BATCH_BUCKETS
)
CONSUMER_ABANDONED_BATCHES = Counter(
    "blametrail_consumer_abandoned_batches_total",
    "In-flight batches given up at a rebalance (redelivered, not lost)",
    ["group"],
)
CONSUMER_COMMITS = Counter("blametrail_consumer_commits_total", "Offset commits", ["group"])
CONSUMER_PRODUCER_RESTARTS = Counter(
    "blametrail_consumer_producer_restarts_total",
    "Kafka producers of a consumer service replaced because they broke (a fatal idempotence error, a dead sender)",
    ["group"],
)
CONSUMER_REBALANCES = Counter(
    "blametrail_consumer_rebalances_total", "Partition assignments and revocations", ["group", "kind"]
)
CONSUMER_ASSIGNED_PARTITIONS = Gauge(
    "blametrail_consumer_assigned_partitions", "Partitions this process owns in its group", ["group"]
)
CONSUMER_LAG = Gauge(
    "blametrail_consumer_lag", "Records behind the end of the partition", ["group", "topic", "partition"]
)
CONSUMER_PROCESSING_SECONDS = Histogram(
    "blametrail_consumer_processing_seconds",
    "Now minus record timestamp when a record is processed",
    ["group"],
    buckets=LATENCY_BUCKETS,
)
DLQ_MESSAGES = Counter("blametrail_dlq_messages_total", "Records sent to the dead-letter topic", ["stage"])
