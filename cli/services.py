"""The long-running services (``ingest``, ``admin``, ``router``, ``writer``) and the one-shot setup
commands (``migrate``, ``topics create``). Each command imports only what it runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from typing import Any

from shared.logs import log_settings, setup_logging
from shared.settings import Settings


def _serve_http(
    app_factory: str, args: argparse.Namespace, settings: Settings, host: str, port: int, **options: Any
) -> None:
    import uvicorn

    service = app_factory.split(".", 1)[0]
    setup_logging(args.log_level, service=service, fmt=settings.log_format)
    log_settings(service, settings)

    uvicorn.run(
        app_factory,
        factory=True,
        host=args.host or host,
        port=args.port or port,
        log_level=args.log_level.lower(),
        **options,
    )


# How uvicorn serves ingest (``bench.bare_app``, its benchmark ceiling, is served the same way): uvloop
# accepting every waiting connection at once (``ingest/accept.py``; libuv alone accepts one a loop
# iteration), the httptools protocol with ingest's head limits, no access log, no proxy-header rewriting (ingest
# never uses the client address) and no Server header, both per-request work for nothing.
INGEST_UVICORN: dict[str, Any] = {
    "loop": "ingest.accept:GreedyAcceptLoop",
    "http": "ingest.http_limits:IngestHttpProtocol",
    "access_log": False,
    "proxy_headers": False,
    "server_header": False,
}


def run_ingest(args: argparse.Namespace, settings: Settings) -> None:
    workers = args.workers or settings.ingest_workers
    if workers > 1:
        # One consistent set of metrics across the workers: prometheus_client's multiprocess mode,
        # in a fresh directory (it must start empty), inherited by every worker.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="blametrail-ingest-metrics-")
    _serve_http(
        "ingest.app:create_app",
        args,
        settings,
        settings.ingest_host,
        settings.ingest_port,
        workers=workers,
        timeout_graceful_shutdown=10,
        **INGEST_UVICORN,
    )


def run_admin(args: argparse.Namespace, settings: Settings) -> None:
    _serve_http("admin.app:create_app", args, settings, settings.admin_host, settings.admin_port)


def run_router(args: argparse.Namespace, settings: Settings) -> None:
    from router.consumer import Router
    from shared.runtime import lower_priority, run_until_signalled, serve_metrics

    setup_logging(args.log_level, service="router", fmt=settings.log_format)
    log_settings("router", settings)
    lower_priority(settings.consumer_nice)  # before the metrics thread starts: it inherits it
    serve_metrics(settings.router_metrics_port)
    run_until_signalled(lambda stop: Router(settings).run(stop))


def run_writer(args: argparse.Namespace, settings: Settings) -> None:
    from incident_writer.consumer import IncidentWriter
    from shared.runtime import lower_priority, run_until_signalled, serve_metrics

    setup_logging(args.log_level, service="writer", fmt=settings.log_format)
    log_settings("writer", settings)
    lower_priority(settings.consumer_nice)  # before the metrics thread starts: it inherits it
    serve_metrics(settings.writer_metrics_port)
    run_until_signalled(lambda stop: IncidentWriter(settings).run(stop))


def migrate(args: argparse.Namespace, settings: Settings) -> None:
    from shared.db.migrate import upgrade

    upgrade(settings)
    print("database is at the latest schema")


def create_topics(args: argparse.Namespace, settings: Settings) -> None:
    from shared.kafka import create_topics
    from shared.topics import Topics

    created = asyncio.run(create_topics(settings, args.partitions))
    for name in Topics.from_settings(settings).all():
        print(f"{name}: {'created' if name in created else 'exists'}")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, func in (("ingest", run_ingest), ("admin", run_admin)):
        p = sub.add_parser(name, help=f"run the {name} HTTP service")
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        if name == "ingest":
            p.add_argument("--workers", type=int)
        p.set_defaults(func=func)
    sub.add_parser("router", help="run the router consumer").set_defaults(func=run_router)
    sub.add_parser("writer", help="run the incident writer consumer").set_defaults(func=run_writer)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=migrate)

    topics = sub.add_parser("topics", help="Kafka topics").add_subparsers(dest="action", required=True)
    p = topics.add_parser("create", help="create the four topics if missing")
    p.add_argument("--partitions", type=int)
    p.set_defaults(func=create_topics)
