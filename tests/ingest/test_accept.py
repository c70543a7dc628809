"""``GreedyAcceptLoop``: a busy event loop accepts every waiting connection at once, serves them, and
accepts nothing once its server is closed. Real sockets on loopback, each test on a loop of its own.

Plain uvloop accepts one connection per loop iteration (libuv 1.45 on): with 1 ms of work an
iteration, 200 waiting connections take 200 iterations. Here they take one or two.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
import uvicorn

from cli.services import INGEST_UVICORN
from ingest.accept import GreedyAcceptLoop
from ingest.http_limits import accept_wait

WAITING = 200


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=GreedyAcceptLoop) as runner:
        runner.run(main())


class Echo(asyncio.Protocol):
    made: list[Echo] = []
    all_made: asyncio.Event | None = None  # set once WAITING connections are made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's TCPTransport is not an asyncio.Transport subclass
        Echo.made.append(self)
        if len(Echo.made) == WAITING and Echo.all_made is not None:
            Echo.all_made.set()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


def connect_waiting(port: int, count: int) -> list[socket.socket]:
    """``count`` connections the kernel completes while nobody accepts them (the loop is not running)."""
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        try:
            client.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        clients.append(client)
    return clients


def test_a_busy_loop_accepts_every_waiting_connection_at_once_and_serves_each() -> None:
    async def main() -> None:
        Echo.made, Echo.all_made = [], None
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        clients = connect_waiting(port, WAITING)
        time.sleep(0.2)  # noqa: ASYNC251 -- the loop blocked: every connection waits in the accept queue
        accepted_by_iteration = []
        done = asyncio.Event()

        def busy() -> None:  # 1 ms of work an iteration, as a loop serving requests has
            accepted_by_iteration.append(len(Echo.made))
            started = time.perf_counter()
            while time.perf_counter() - started < 0.001:
                pass
            if len(accepted_by_iteration) < 20:
                loop.call_soon(busy)
            else:
                done.set()

        loop.call_soon(busy)
        await asyncio.wait_for(done.wait(), 5)
        # greedy: [0, 1, 200, ...] (accepted, then each connection's task opens it); plain uvloop:
        # [0, 1, 2, 3, ...], one accept an iteration. Ten iterations leave room for a late handshake.
        assert WAITING in accepted_by_iteration[:10], accepted_by_iteration[:10]
        try:
            for index, client in enumerate(clients):
                await loop.sock_sendall(client, b"hello %d" % index)
                data = b""
                while len(data) < len(b"HELLO %d" % index):
                    data += await asyncio.wait_for(loop.sock_recv(client, 64), 5)
                assert data == b"HELLO %d" % index
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()

    run(main)


def test_a_closed_server_accepts_nothing_more() -> None:
    async def main() -> None:
        Echo.made, Echo.all_made = [], None
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=128)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = socket.socket()
        try:
            with pytest.raises(ConnectionRefusedError):
                client.connect(("127.0.0.1", port))
        finally:
            client.close()
        await asyncio.sleep(0.05)
        assert Echo.made == []

    run(main)


class FailingAccept:
    """A listening socket whose accept fails as out of file descriptors until ``until``."""

    def __init__(self, sock: socket.socket, until: float) -> None:
        self.sock, self.until, self.failures = sock, until, 0

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() < self.until:
            self.failures += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def test_an_acceptor_out_of_descriptors_pauses_instead_of_failing_every_iteration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        Echo.made, Echo.all_made = [], asyncio.Event()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        (acceptor,) = cast(Any, server)._acceptors
        failing = acceptor._sock = FailingAccept(acceptor._sock, time.monotonic() + 0.05)
        clients = connect_waiting(port, WAITING)
        try:
            await asyncio.wait_for(Echo.all_made.wait(), 5)  # libuv's own accept goes on meanwhile
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()
        warnings = [r for r in caplog.records if "accepting a connection failed" in r.getMessage()]
        assert failing.failures == len(warnings) == 1  # paused for 0.1 s: not once a loop iteration

    with caplog.at_level(logging.WARNING, logger="ingest.accept"):
        run(main)


def test_a_connection_reports_how_long_it_waited_to_be_accepted() -> None:
    async def main() -> None:
        waits: asyncio.Queue[float | None] = asyncio.Queue()

        class Waits(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                waits.put_nowait(accept_wait(transport))
                transport.close()

        loop = asyncio.get_running_loop()
        server = await loop.create_server(Waits, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        waited = connect_waiting(port, 1)
        time.sleep(0.3)  # noqa: ASYNC251 -- the loop blocked: nobody accepts meanwhile
        first = await asyncio.wait_for(waits.get(), 5)
        fresh = socket.create_connection(("127.0.0.1", port))
        second = await asyncio.wait_for(waits.get(), 5)
        for client in [*waited, fresh]:
            client.close()
        server.close()
        await server.wait_closed()
        assert first is not None and 0.3 <= first < 5
        assert second is not None and second < 0.2

    run(main)


def test_ingest_is_served_by_the_greedy_loop() -> None:
    config = uvicorn.Config("ingest.app:create_app", **INGEST_UVICORN)
    assert config.get_loop_factory() is GreedyAcceptLoop
