"""Process plumbing for the consumer services: signals and the metrics endpoint."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from collections.abc import Awaitable, Callable

from prometheus_client import start_http_server

log = logging.getLogger(__name__)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` (0 disables it)."""
    if port:
        start_http_server(port, addr=host)


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
        await main(stop)

    asyncio.run(runner())
