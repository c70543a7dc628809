"""Outages for tests: a PostgreSQL of a test's own, and a TCP forwarder that can cut or hang a database.

Services reach the database through the :class:`Forwarder` on a fixed local port, as they would
through a service address in production: a restarted ``scripts/postgres.sh`` may come back on
another port, and the forwarder can take the database away (``cut``: every connection dropped and
new ones refused) or make it hang (``hang``: connections accepted, never answered) without touching
the server, which other tests may be using.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench import openloop
from shared.db.session import create_engine, sessionmaker
from shared.settings import Settings

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def postgres(action: str, run_dir: Path) -> dict[str, str]:
    """``scripts/postgres.sh action`` with its own run directory; the env lines it prints."""
    done = subprocess.run(
        ["bash", str(SCRIPTS / "postgres.sh"), action],
        env={**os.environ, "BLAMETRAIL_RUN_DIR": str(run_dir)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"postgres.sh {action} failed:\n{done.stdout}\n{done.stderr}"
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


class Forwarder:
    """Accepts TCP connections on a local port of its own and relays each to ``upstream()``'s current
    port (None: the connection is closed at once, as by a stopped server).

    ``cut()`` drops every relayed connection and closes new ones at once (the database went down);
    ``hang()`` drops them and holds new ones open without a word (a host that stopped answering);
    ``restore()`` relays again.
    """

    def __init__(self, upstream: Callable[[], int | None]) -> None:
        self._upstream = upstream
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._state = "up"
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._drop()

    async def cut(self) -> None:
        self._state = "cut"
        await self._drop()

    async def hang(self) -> None:
        self._state = "hang"
        await self._drop()

    async def restore(self) -> None:
        """Relay again; connections held by :meth:`hang` are dropped (their clients retry)."""
        self._state = "up"
        await self._drop()

    async def _drop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._state == "hang":
                await asyncio.Event().wait()  # until dropped
            port = self._upstream() if self._state == "up" else None
            if port is None:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


class ThreadedForwarder:
    """A :class:`Forwarder` on an event loop of its own thread: it keeps relaying while the test's loop
    is blocked (``subprocess.run`` of a CLI command that connects through it)."""

    def __init__(self, upstream: Callable[[], int | None]) -> None:
        self._forwarder = Forwarder(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forwarder", daemon=True)
        self.port = 0

    async def _on_loop(self, work: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def start(self) -> int:
        self._thread.start()
        self.port = await self._on_loop(self._forwarder.start())
        return self.port

    async def close(self) -> None:
        await self._on_loop(self._forwarder.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)
        self._loop.close()

    async def cut(self) -> None:
        await self._on_loop(self._forwarder.cut())

    async def hang(self) -> None:
        await self._on_loop(self._forwarder.hang())

    async def restore(self) -> None:
        await self._on_loop(self._forwarder.restore())


@asynccontextmanager
async def database(url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(Settings(database_url=url))
    try:
        yield sessionmaker(engine)
    finally:
        await engine.dispose()


def with_port(url: str, port: int) -> str:
    head, _, tail = url.rpartition("@")
    host, _, rest = tail.partition(":")
    return f"{head}@{host}:{port}/{rest.split('/', 1)[1]}"


def open_loop(port: int, requests: list[bytes], rate: float, seconds: float) -> list[openloop.Answer]:
    """``bench.openloop.run`` against ``127.0.0.1:port``; meant for a process of its own
    (``ProcessPoolExecutor``), so the test's own work never delays a request."""
    return openloop.run("127.0.0.1", port, requests, rate, seconds)


class Broker:
    """A Kafka broker of our own, started by ``scripts/kafka.sh`` in ``run_dir``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.bootstrap = ""
        self.port = 0

    def _script(self, action: str) -> str:
        done = subprocess.run(
            ["bash", str(SCRIPTS / "kafka.sh"), action],
            env={**os.environ, "BLAMETRAIL_RUN_DIR": str(self.run_dir), "BLAMETRAIL_KAFKA_HEAP": "384m"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"kafka.sh {action} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def start(self) -> None:
        values = dict(line.split("=", 1) for line in self._script("start").splitlines() if "=" in line)
        self.bootstrap = values["BLAMETRAIL_KAFKA_BOOTSTRAP"]
        self.port = int(values["KAFKA_PORT"])

    def stop(self) -> None:
        """Stop the broker the way an operator would (SIGTERM, wait for exit); its data stays."""
        self._script("stop")

    async def start_again(self) -> None:
        """``kafka.sh start`` after ``stop``: the same ports and data (the script waits until it serves)."""
        port = self.port
        await asyncio.to_thread(self.start)
        assert self.port == port, "kafka.sh start came back on another port"

    def shutdown(self) -> None:
        self._script("stop")
