"""Process plumbing for the services: signals, the metrics endpoint, garbage collection."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from prometheus_client import start_http_server

log = logging.getLogger(__name__)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` (0 disables it)."""
    if port:
        start_http_server(port, addr=host)


def lower_priority(increment: int) -> int:
    """Raise this process's niceness by ``increment`` (0: leave it), before it starts threads (they
    inherit it); returns the niceness now. The consumers call it: at 2,000 webhooks/s on two cores,
    router and writer at nice 10 left fewer than half as many answers over Sentry's 1 s as at
    nice 0 (docs/benchmarks.md, eighth session), and they catch up from Kafka once the burst is over."""
    now = os.nice(0)
    if increment > 0 and now < 19:
        now = os.nice(min(increment, 19 - now))
    return now


# CPython collects its youngest generation every 700 net container allocations by default. Every
# webhook allocates hundreds (header lists, dicts, futures, pydantic models), so at 1,000/s ingest
# and the writer spent 7 to 19 % of their CPU in the collector (measured with ``gc.callbacks``), and a
# full collection walked every object alive since startup, a pause in the ack path. Almost all of
# that garbage is freed by reference counting anyway; the collector is only there for cycles.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Call once per process, after its imports (the consumers: before ``main``; ingest: once its
    lifespan has started): what was built by then (modules, settings, clients) is frozen out of every
    later collection, and the youngest generation is collected every ``GC_THRESHOLDS[0]``
    net allocations instead of 700. Cyclic garbage still goes, in fewer, larger collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def dump_tasks() -> str:
    """Every task of the running loop and where it awaits: what a stuck service is waiting for."""
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    out.write(f"{len(tasks)} asyncio tasks\n")
    for task in sorted(tasks, key=lambda t: t.get_name()):
        task.print_stack(limit=12, file=out)
    return out.getvalue()


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` where ``stop`` is set on SIGTERM or SIGINT, so the service can finish cleanly.
    SIGUSR1 logs every asyncio task's stack (``kill -USR1 <pid>``: what is it waiting for?)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.warning("task dump (SIGUSR1)\n%s", dump_tasks()))
        tune_gc()
        await main(stop)

    asyncio.run(runner())
