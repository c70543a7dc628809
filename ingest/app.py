"""The ingest service: verify a Sentry webhook, make it durable in Kafka, answer 200.

Thin by design: no mapping logic here. The body goes to ``sentry.webhooks.raw`` byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ingest.secrets import SecretCache
from shared import events, metrics
from shared.db.session import create_engine, sessionmaker
from shared.kafka import Headers, make_producer
from shared.security import signature_matches
from shared.sentry import KNOWN_RESOURCES, is_valid_slug, parse_webhook, partition_key
from shared.settings import Settings, get_settings
from shared.topics import Topics

log = logging.getLogger("blametrail.ingest")

INGEST_VERSION = "1"
RESOURCE_HEADER = "sentry-hook-resource"
SIGNATURE_HEADER = "sentry-hook-signature"


class BodyTooLarge(Exception):
    pass


@dataclass
class IngestState:
    settings: Settings
    topics: Topics
    secrets: SecretCache
    producer: AIOKafkaProducer
    producer_ready: bool = False


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes: Content-Length first, then counted bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def webhook(request: Request) -> Response:
    state: IngestState = request.app.state.ingest
    started = time.perf_counter()
    org = request.path_params["org"]
    resource = (request.headers.get(RESOURCE_HEADER) or "").strip().lower()[:64] or "unknown"
    outcome = "error"
    try:
        response, outcome = await _handle(state, request, org, resource)
        return response
    finally:
        metrics.INGEST_REQUESTS.labels(resource=_resource_label(resource), outcome=outcome).inc()
        metrics.INGEST_REQUEST_SECONDS.observe(time.perf_counter() - started)


def _resource_label(resource: str) -> str:
    return resource if resource in KNOWN_RESOURCES else "other"


async def _handle(state: IngestState, request: Request, org: str, resource: str) -> tuple[Response, str]:
    settings = state.settings
    try:
        body = await read_body(request, settings.max_body_bytes)
    except BodyTooLarge:
        return _error(413, "too_large", f"body is larger than {settings.max_body_bytes} bytes"), "too_large"
    except ClientDisconnect:
        return Response(status_code=400), "disconnected"
    metrics.INGEST_BODY_BYTES.observe(len(body))

    secrets = await state.secrets.get(org) if is_valid_slug(org) else None
    if secrets is None or not signature_matches(request.headers.get(SIGNATURE_HEADER), body, secrets):
        # Same answer for an unknown org and a bad signature: no org enumeration.
        return _error(401, "bad_signature", "missing or invalid Sentry-Hook-Signature"), "bad_signature"

    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _error(400, "bad_json", f"body is not valid JSON: {exc}"), "bad_json"

    parsed = parse_webhook(resource, decoded)
    received_at = events.utc_now()
    headers: Headers = [
        (events.H_ORG, org.encode()),
        (events.H_RESOURCE, resource.encode()),
        (events.H_REQUEST_ID, (request.headers.get("request-id") or uuid.uuid4().hex)[:64].encode()),
        (events.H_HOOK_TIMESTAMP, (request.headers.get("sentry-hook-timestamp") or "")[:32].encode()),
        (events.H_RECEIVED_AT, events.rfc3339(received_at).encode()),
        (events.H_DELIVERY_ID, events.delivery_id(org, resource, body).encode()),
        (events.H_CONTENT_TYPE, (request.headers.get("content-type") or "")[:100].encode()),
        (events.H_INGEST_VERSION, INGEST_VERSION.encode()),
    ]
    key = partition_key(org, parsed).encode()
    publish_started = time.perf_counter()
    producer = state.producer
    try:
        future = await producer.send(state.topics.raw, value=body, key=key, headers=headers)
        await asyncio.wait_for(asyncio.shield(future), settings.publish_timeout_ms / 1000)
    except Exception as exc:
        log.warning("publish failed for org %s: %r", org, exc)
        return (
            JSONResponse(
                {"error": {"code": "unavailable", "message": "event could not be made durable; retry"}},
                status_code=503,
                headers={"Retry-After": "5"},
            ),
            "unavailable",
        )
    metrics.INGEST_PUBLISH_SECONDS.observe(time.perf_counter() - publish_started)
    return JSONResponse({"status": "accepted"}), "accepted"


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    state: IngestState = request.app.state.ingest
    if state.producer_ready:
        return PlainTextResponse("ready")
    return PlainTextResponse("producer not connected", status_code=503)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = create_engine(settings, pool_size=2)
        producer = make_producer(settings, client_id="blametrail-ingest")
        state = IngestState(
            settings=settings,
            topics=Topics.from_settings(settings),
            secrets=SecretCache(sessionmaker(engine), settings.secret_cache_ttl_seconds),
            producer=producer,
        )
        app.state.ingest = state
        await producer.start()
        state.producer_ready = True
        try:
            yield
        finally:
            state.producer_ready = False
            await producer.stop()  # flushes what is in flight
            await engine.dispose()

    routes = [
        Route("/webhooks/sentry/{org}", webhook, methods=["POST"]),
        # Sentry counts a 3xx as success and does not follow it: the slash variant is served, never redirected.
        Route("/webhooks/sentry/{org}/", webhook, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False
    return app
