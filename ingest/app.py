"""The ingest service: verify a Sentry webhook, make it durable, answer 200.

Thin by design: no mapping logic here. The body goes to ``sentry.webhooks.raw`` byte for byte,
keyed by its Sentry issue (or project) so one issue's events stay in order, through Kafka's
acknowledgement or the local spool (``ingest/publish.py``).

Answers (every one counted in ``blametrail_ingest_requests_total`` by resource and outcome):

- 200 ``accepted`` (Kafka acknowledged) or ``spooled`` (fsync'd in the local spool);
- 401 ``bad_signature``: missing/invalid signature, unknown org, wrong or disabled legacy token —
  one body for all, so org slugs cannot be enumerated;
- 400 ``bad_json``: the body is not JSON (the message says why);
- 408 ``timeout``: the body did not arrive within ``BLAMETRAIL_INGEST_READ_TIMEOUT_SECONDS``;
- 413 ``too_large``: over ``BLAMETRAIL_MAX_BODY_BYTES`` (declared or counted while streaming);
- 431 ``headers_too_large``: over 100 headers or 16 KiB of head (``ingest/http_limits.py``);
- 503 ``unavailable`` with ``Retry-After``: the event could not be made durable (or the database
  holding the secrets is down and nothing is cached);
- 503 ``overloaded`` with ``Retry-After``: the event loop runs late with a queue, recent answers are
  all slow, or too many requests are in flight (``LoadMonitor``), so the webhook is refused before
  any work rather than answered late.

Never a 3xx: Sentry counts a redirect as delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias, TypeVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest, multiprocess
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ingest.async_spool import AsyncSpool
from ingest.http_limits import HeadLimits, head_refusal
from ingest.kafka import ingest_producer
from ingest.publish import Outcome, Publisher, Unavailable
from ingest.record import RawRecord
from ingest.secrets import LegacyTokenCache, OrgCache, SecretCache, invalidator
from ingest.spool_files import SpoolError
from shared import events, metrics
from shared.credentials import Connections
from shared.db.conninfo import MAPPINGS_CHANNEL, libpq_url
from shared.db.listen import Listener
from shared.errors import error_body
from shared.logs import EventLog, setup_logging
from shared.producer import Producer
from shared.runtime import tune_gc
from shared.security import hash_token, signature_matches
from shared.sentry import KNOWN_RESOURCES, LEGACY, is_valid_slug, raw_record_key
from shared.settings import Settings, get_settings
from shared.topics import Topics

log = logging.getLogger("blametrail.ingest")
C = TypeVar("C")  # an org's credentials as the cache holds them

INGEST_VERSION = "1"
RESOURCE_HEADER = "sentry-hook-resource"
SIGNATURE_HEADER = "sentry-hook-signature"
RETRY_AFTER = "5"
OVERLOAD_RETRY_AFTER = "1"
LAG_TICK_SECONDS = 0.05
MIN_ANSWERS = 3  # answers in a tick interval before their fastest one counts as queueing
QUEUEING_HOLD = 0.5  # seconds a queueing measurement holds without a newer one


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


@dataclass
class IngestState:
    settings: Settings
    topics: Topics
    secrets: SecretCache
    legacy_tokens: LegacyTokenCache
    publisher: Publisher
    lines: EventLog = field(default_factory=lambda: EventLog(log))  # per-webhook lines, flushed each tick


class LoadMonitor:
    """How loaded this process is: the event loop's lag, queueing inside ingest, requests in flight.

    A ticker wakes every ``interval`` seconds; how late it woke is the loop's lag (CPU starvation, a
    long callback, a burst of ready connections). While the loop is stuck the ticker cannot run, so
    ``current_lag`` also counts how overdue the next tick is right now: requests served right after
    a stall see it, before the ticker does.

    Queueing (CoDel's signal): the *fastest* webhook answered during the last tick interval. When even
    that one took long, every request is waiting behind others (a starved spool thread, a CPU share
    too small for the rate) although the loop itself keeps ticking; one slow request does not count.
    A measurement holds for ``QUEUEING_HOLD`` seconds while no new one replaces it (shed requests are
    not answers), so shedding stops by itself once the backlog is gone.
    """

    def __init__(self, interval: float = LAG_TICK_SECONDS) -> None:
        self.interval = interval
        self.inflight = 0
        self._queueing = 0.0  # the fastest answer of the last interval with MIN_ANSWERS answers
        self._queueing_at = -math.inf
        self._lag = 0.0
        self._due = math.inf  # no tick scheduled: nothing overdue
        self._fastest = math.inf
        self._answers = 0

    def current_lag(self) -> float:
        return max(self._lag, time.monotonic() - self._due)

    @property
    def queueing(self) -> float:
        return self._queueing if time.monotonic() - self._queueing_at < QUEUEING_HOLD else 0.0

    def answered(self, seconds: float) -> None:
        """A webhook was answered (not shed) after ``seconds`` inside ingest."""
        self._answers += 1
        self._fastest = min(self._fastest, seconds)

    def _close_interval(self) -> None:
        if self._answers >= MIN_ANSWERS:
            self._queueing, self._queueing_at = self._fastest, time.monotonic()
        self._fastest, self._answers = math.inf, 0

    async def run(self, on_tick: Callable[[], None] | None = None) -> None:
        """The ticker (calling ``on_tick`` after each tick); runs until cancelled."""
        try:
            while True:
                self._due = time.monotonic() + self.interval
                await asyncio.sleep(self.interval)
                self._lag = max(0.0, time.monotonic() - self._due)
                self._close_interval()
                metrics.INGEST_LOOP_LAG.set(self._lag)
                if on_tick is not None:
                    on_tick()
        finally:
            self._due = math.inf


@dataclass(frozen=True)
class Answer:
    """One answer to a webhook: status, JSON body, extra headers; written straight to ASGI ``send``."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()

    async def send(self, send: Send) -> None:
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body)), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": head})
        await send({"type": "http.response.body", "body": self.body})


@dataclass
class Incoming:
    """What a webhook handler reads of an ASGI request: the headers it needs, and the body stream."""

    headers: dict[str, str]
    receive: Receive

    @classmethod
    def of(cls, scope: Scope, receive: Receive) -> Incoming:
        wanted = _WANTED_HEADERS
        headers = {}
        for name, value in scope["headers"]:
            if name in wanted:
                headers[name.decode("latin-1")] = value.decode("latin-1")
        return cls(headers, receive)


_WANTED_HEADERS = frozenset(
    name.encode()
    for name in (
        RESOURCE_HEADER,
        SIGNATURE_HEADER,
        "content-length",
        "content-type",
        "request-id",
        "sentry-hook-timestamp",
    )
)
# An endpoint body: the answer and its outcome label.
Handler = Callable[[IngestState, Incoming], Awaitable[tuple[Answer, str]]]
Lifespan: TypeAlias = Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]
# Answers after which the rest of the body is not read: the connection is closed, freeing its slot.
CLOSE = {"Connection": "close"}
_OK = {outcome: Answer(200, orjson.dumps({"status": outcome.value})) for outcome in Outcome}


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _fail(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Answer:
    """The JSON error shape (``shared.errors``) as an :class:`Answer`."""
    extra = tuple((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())
    return Answer(status, orjson.dumps(error_body(code, message)), extra)


def _unauthorized() -> tuple[Answer, str]:
    # Same answer for an unknown org, a bad signature and a bad legacy token: no org enumeration.
    return _fail(401, "bad_signature", "missing or invalid Sentry-Hook-Signature"), "bad_signature"


def _unavailable(message: str) -> tuple[Answer, str]:
    return _fail(503, "unavailable", message, {"Retry-After": RETRY_AFTER}), "unavailable"


async def read_body(incoming: Incoming, limit: int, within: float) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (Content-Length first, then counted bytes)
    and a body still incomplete after ``within`` seconds (stalled or trickling sender).

    A body that came with its head (the usual webhook) is read without arming a timer."""
    declared = incoming.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    message = await incoming.receive()
    first = _body_of(message)
    if len(first) > limit:
        raise BodyTooLarge
    if not message.get("more_body", False):
        return first
    chunks = [first]
    size = len(first)
    try:
        async with asyncio.timeout(within):
            while message.get("more_body", False):
                message = await incoming.receive()
                chunk = _body_of(message)
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout from None
    return b"".join(chunks)


def _body_of(message: Message) -> bytes:
    if message["type"] == "http.disconnect":
        raise ClientDisconnect
    body: bytes = message.get("body", b"")
    return body


def _resource_label(resource: str) -> str:
    return resource if resource in KNOWN_RESOURCES else "other"


def _overloaded(settings: Settings, load: LoadMonitor) -> tuple[Answer, str] | None:
    """503 ``overloaded`` when the loop lags while other requests are in flight (a queue: one request
    alone is served, whatever the loop did before), when even the fastest recent answers took twice
    the lag limit (queueing), or when too many requests are in flight (this one counted)."""
    lag = load.current_lag()
    limit = settings.ingest_overload_lag_seconds
    lagging = lag >= limit and load.inflight > 1
    if not lagging and load.queueing < 2 * limit and load.inflight <= settings.ingest_overload_max_requests:
        return None
    log.warning(
        "overloaded (event loop lag %.3f s, fastest recent answer %.3f s, %d requests in flight): webhook refused",
        lag,
        load.queueing,
        load.inflight,
    )
    message = "ingest is overloaded and could not answer within Sentry's budget; retry"
    return _fail(503, "overloaded", message, {"Retry-After": OVERLOAD_RETRY_AFTER}), "overloaded"


class RequestCounts:
    """``blametrail_ingest_requests_total`` children by (resource label, outcome), kept: ``labels()``
    is a locked lookup a request would otherwise pay."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str], Counter] = {}

    def inc(self, resource: str, outcome: str) -> None:
        key = (_resource_label(resource), outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metrics.INGEST_REQUESTS.labels(resource=key[0], outcome=outcome)
        child.inc()


async def _answer(app: IngestApp, incoming: Incoming, resource: str, handle: Handler) -> Answer:
    """Run ``handle`` unless the process is overloaded; count the outcome and latency."""
    state: IngestState = app.state.ingest
    load = app.load
    started = time.perf_counter()
    outcome = "error"
    load.inflight += 1
    try:
        answer, outcome = _overloaded(state.settings, load) or await handle(state, incoming)
        return answer
    finally:
        load.inflight -= 1
        elapsed = time.perf_counter() - started
        if outcome in ("accepted", "spooled"):  # not a shed request, nor a slow sender's 408
            load.answered(elapsed)
        app.counts.inc(resource, outcome)
        metrics.INGEST_REQUEST_SECONDS.observe(elapsed)


async def _receive(
    state: IngestState,
    incoming: Incoming,
    org: str,
    resource: str,
    credentials: OrgCache[C | None],
    verify: Callable[[bytes, C], bool],
) -> tuple[Answer, str]:
    """Read the body within the size limit, check it against the org's cached credentials, publish.

    An unknown org, an invalid slug and a failed check all get the same 401 (no org enumeration).
    """
    settings = state.settings
    try:
        body = await read_body(incoming, settings.max_body_bytes, settings.ingest_read_timeout_seconds)
    except BodyTooLarge:
        return _too_large(state)
    except BodyTimeout:
        message = f"body not received within {settings.ingest_read_timeout_seconds:g} s"
        return _fail(408, "timeout", message, CLOSE), "timeout"
    except ClientDisconnect:  # nobody reads this answer
        return _fail(400, "disconnected", "the client disconnected"), "disconnected"
    metrics.INGEST_BODY_BYTES.observe(len(body))
    try:
        known = await credentials.get(org) if is_valid_slug(org) else None
    except Exception as exc:
        log.error("cannot load the credentials of org %s: %r", org, exc)
        return _unavailable("credentials cannot be checked right now; retry")
    if known is None or not verify(body, known):
        return _unauthorized()
    return await _publish(state, incoming, org, resource, body)


async def webhook(app: IngestApp, incoming: Incoming, org: str) -> Answer:
    """``POST /webhooks/sentry/{org}``: a signed Sentry Integration Platform webhook."""
    resource = (incoming.headers.get(RESOURCE_HEADER) or "").strip().lower()[:64] or "unknown"
    signature = incoming.headers.get(SIGNATURE_HEADER)

    def verify(body: bytes, secrets: tuple[str, ...]) -> bool:
        return signature_matches(signature, body, secrets)

    async def handle(state: IngestState, incoming: Incoming) -> tuple[Answer, str]:
        return await _receive(state, incoming, org, resource, state.secrets, verify)

    return await _answer(app, incoming, resource, handle)


async def legacy_webhook(app: IngestApp, incoming: Incoming, org: str, token: str) -> Answer:
    """``POST /webhooks/sentry-legacy/{org}/{token}``: Sentry's legacy WebHooks plugin (unsigned).

    Accepted only when the org turned it on (``blametrail org legacy-plugin SLUG on``) and the URL
    token hashes to the stored one (constant-time compare). Published with resource ``legacy_webhook``.
    """
    given = hash_token(token).hex().encode()

    def verify(body: bytes, expected: str) -> bool:
        return hmac.compare_digest(given, expected.strip().lower().encode())

    async def handle(state: IngestState, incoming: Incoming) -> tuple[Answer, str]:
        return await _receive(state, incoming, org, LEGACY, state.legacy_tokens, verify)

    return await _answer(app, incoming, LEGACY, handle)


def _too_large(state: IngestState) -> tuple[Answer, str]:
    limit = state.settings.max_body_bytes
    return _fail(413, "too_large", f"body is larger than {limit} bytes", CLOSE), "too_large"


async def _publish(state: IngestState, incoming: Incoming, org: str, resource: str, body: bytes) -> tuple[Answer, str]:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _fail(400, "bad_json", f"body is not valid JSON: {exc}"), "bad_json"

    received_at = events.utc_now()
    delivery = events.delivery_id(org, resource, body)
    get = incoming.headers.get
    headers = (
        (events.H_ORG, org.encode()),
        (events.H_RESOURCE, resource.encode()),
        (events.H_REQUEST_ID, (get("request-id") or os.urandom(16).hex())[:64].encode()),
        (events.H_HOOK_TIMESTAMP, (get("sentry-hook-timestamp") or "")[:32].encode()),
        (events.H_RECEIVED_AT, events.rfc3339(received_at).encode()),
        (events.H_DELIVERY_ID, delivery.encode()),
        (events.H_CONTENT_TYPE, (get("content-type") or "")[:100].encode()),
        (events.H_INGEST_VERSION, INGEST_VERSION.encode()),
    )
    record = RawRecord(
        key=raw_record_key(org, resource, decoded).encode(),
        value=body,
        headers=headers,
        received_at=received_at.timestamp(),
    )
    try:
        outcome = await state.publisher.publish(record)
    except Unavailable as exc:
        log.error("webhook of org %s could not be made durable: %s", org, exc, extra={"delivery_id": delivery})
        return _unavailable("event could not be made durable; retry")
    state.lines.add(outcome.value, delivery_id=delivery, org=org, resource=resource)
    return _OK[outcome], outcome.value


def _webhook_target(path: str) -> tuple[str, ...] | None:
    """``(org,)`` for ``/webhooks/sentry/{org}[/]``, ``(org, token)`` for the legacy path, else None.

    Sentry counts a 3xx as success and does not follow it: the slash variant is served, never redirected.
    """
    if path.startswith(SIGNED_PREFIX):
        parts = path[len(SIGNED_PREFIX) :].removesuffix("/").split("/")
        return (parts[0],) if len(parts) == 1 and parts[0] else None
    if path.startswith(LEGACY_PREFIX):
        parts = path[len(LEGACY_PREFIX) :].removesuffix("/").split("/")
        return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None
    return None


SIGNED_PREFIX = "/webhooks/sentry/"
LEGACY_PREFIX = "/webhooks/sentry-legacy/"


class IngestApp(Starlette):
    """Starlette for health, readiness, metrics, the lifespan and the 404/405 answers; the webhook
    POSTs as plain ASGI, in front of it.

    The webhook path is the hot one: Starlette's exception middlewares, router, ``Request`` and
    ``Response`` objects cost about as much CPU as the webhook's own work. Served here, a webhook
    gets the same head limits (``HeadLimits``), the same answers in the same JSON shape, and an
    unexpected exception still becomes a logged 500 in that shape.
    """

    load: LoadMonitor
    counts: RequestCounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = _webhook_target(scope["path"])
            if target is not None:
                await self._webhook(scope, receive, send, target)
                return
        await super().__call__(scope, receive, send)

    async def _webhook(self, scope: Scope, receive: Receive, send: Send, target: tuple[str, ...]) -> None:
        refused = head_refusal(scope)
        if refused is not None:
            await _fail(431, "headers_too_large", refused, CLOSE).send(send)
            return
        incoming = Incoming.of(scope, receive)
        try:
            if len(target) == 1:
                answer = await webhook(self, incoming, target[0])
            else:
                answer = await legacy_webhook(self, incoming, target[0], target[1])
        except Exception:
            log.exception("webhook failed")
            answer = _fail(500, "internal_error", "internal error")
        await answer.send(send)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own answers (no such path, wrong method) in the JSON error shape too."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return _error(exc.status_code, code, exc.detail, exc.headers)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    """200 while webhooks can be made durable: the producer is connected or the spool is writable."""
    publisher: Publisher = request.app.state.ingest.publisher
    kafka = "connected" if publisher.producer_connected else "not connected"
    spool = "writable" if publisher.spool_writable else "not writable"
    text = f"kafka producer {kafka}; spool {spool} ({publisher.spool.depth} waiting)"
    status = 200 if publisher.producer_connected or publisher.spool_writable else 503
    return PlainTextResponse(text, status_code=status)


async def metrics_endpoint(request: Request) -> Response:
    """This process's metrics; with several workers (``PROMETHEUS_MULTIPROC_DIR`` set), all of theirs."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None) -> Starlette:
    """The ingest ASGI app. Its lifespan opens the spool (startup fails if ``spool_dir`` is not
    usable: ingest must not run without its durability net), starts the publisher and the LISTEN
    connection that keeps the credential caches current and, on shutdown,
    stops draining, flushes the producer and leaves unsent rows in the spool for the next start."""
    settings = settings or get_settings()
    setup_logging(service="ingest", fmt=settings.log_format)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connections = Connections(libpq_url(settings), size=2)
        topics = Topics.from_settings(settings)
        try:
            spool = await AsyncSpool.open(
                Path(settings.spool_dir), topics.raw, settings.spool_max_bytes, headroom=settings.max_body_bytes
            )
        except SpoolError:
            await connections.close()
            raise
        log.info("spool %s (%d waiting)", spool.path, spool.depth)

        def new_producer() -> Producer:
            return ingest_producer(settings)

        publisher = Publisher(
            spool,
            new_producer,
            topic=topics.raw,
            publish_timeout=settings.publish_timeout_ms / 1000,
            max_inflight=settings.ingest_max_inflight,
            bootstrap=settings.kafka_bootstrap,
        )
        secrets = SecretCache(connections, settings.secret_cache_ttl_seconds)
        legacy_tokens = LegacyTokenCache(connections, settings.secret_cache_ttl_seconds)
        # Org and secret changes reach the caches by NOTIFY at once; the TTL is the fallback.
        listener = Listener(
            libpq_url(settings), MAPPINGS_CHANNEL, invalidator([secrets, legacy_tokens]), name="credentials"
        )
        app.state.ingest = IngestState(
            settings=settings, topics=topics, secrets=secrets, legacy_tokens=legacy_tokens, publisher=publisher
        )
        await publisher.start()
        try:
            async with listener.running():
                tune_gc()  # started: what startup built is never scanned again
                yield
        finally:
            await publisher.close()
            await connections.close()

    return build_app(lifespan)


async def _webhook_method(request: Request) -> Response:
    """Never called: ``IngestApp`` serves the webhook POSTs; these routes give other methods a 405."""
    raise HTTPException(405)


def build_app(lifespan: Lifespan) -> IngestApp:
    """Ingest's endpoints behind the head limits; ``lifespan`` sets ``app.state.ingest``. The
    ``LoadMonitor`` (``app.state.load``) ticks while the app runs, whatever ``lifespan`` is, and each
    tick writes the webhooks' log lines of the interval."""
    load = LoadMonitor()

    @contextlib.asynccontextmanager
    async def monitored(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(app):
            lines: EventLog = app.state.ingest.lines
            ticker = asyncio.create_task(load.run(on_tick=lines.flush), name="ingest-loop-lag")
            try:
                yield
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                lines.flush()

    routes = [
        Route("/webhooks/sentry/{org}", _webhook_method, methods=["POST"]),
        Route("/webhooks/sentry/{org}/", _webhook_method, methods=["POST"]),
        Route("/webhooks/sentry-legacy/{org}/{token}", _webhook_method, methods=["POST"]),
        Route("/webhooks/sentry-legacy/{org}/{token}/", _webhook_method, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]
    app = IngestApp(
        routes=routes,
        lifespan=monitored,
        middleware=[Middleware(HeadLimits)],
        exception_handlers={HTTPException: _http_error},
    )
    app.router.redirect_slashes = False
    app.state.load = app.load = load
    app.counts = RequestCounts()
    return app
