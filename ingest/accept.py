"""uvloop, accepting every waiting connection when the listening socket is ready.

libuv (1.45 on, bundled with uvloop since 0.18) accepts **one connection per event-loop iteration**
("unix: don't accept() connections in a loop"): the rest wait in the kernel's accept queue for the
next iterations. An idle loop iterates at once, so nobody notices; a busy one (hundreds of
requests' callbacks an iteration) accepts a few hundred connections a second, while the requests
behind them wait in the kernel, where neither ingest's histograms nor its load shedding see them.
Sentry opens a connection per webhook. Measured with the whole stack at 2,000 webhooks/s
(docs/benchmarks.md, tenth session): 70-95 % of the connections vegeta opened in a burst waited
0.25-5 s to be accepted, and the answers over Sentry's 1 s budget were theirs; stock asyncio, which
accepts up to the backlog at once, had none over 1 s.

:class:`GreedyAcceptLoop` keeps uvloop and adds, for every listening TCP socket its
``create_server`` makes, a reader on a duplicate of the socket that accepts all waiting connections
(up to the backlog) each time it is ready and hands each to the same protocol factory through
``connect_accepted_socket``. libuv's own single accept goes on beside it. ``close()`` of the returned
server closes the duplicates first, so nothing is accepted after uvicorn stops listening.

``blametrail ingest`` runs uvicorn with ``loop="ingest.accept:GreedyAcceptLoop"`` (uvicorn's custom
loop factory).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvloop

log = logging.getLogger(__name__)

PAUSE_SECONDS = 0.1  # after an accept failed for want of resources (EMFILE, ENFILE, ENOBUFS)


class _Acceptor:
    """Accepts what waits on one listening socket (through its own duplicate of it)."""

    def __init__(self, loop: GreedyAcceptLoop, protocol_factory: Any, listening: Any, backlog: int) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._sock = socket.socket(fileno=socket.dup(listening.fileno()))
        self._sock.setblocking(False)
        self._most = max(1, backlog)
        self._opening: set[asyncio.Task[Any]] = set()
        self._resume: asyncio.TimerHandle | None = None
        loop.add_reader(self._sock.fileno(), self._accept_waiting)

    def _accept_waiting(self) -> None:
        for _ in range(self._most):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing more is waiting
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of file descriptors, say: libuv's own accept meets it too
                log.warning("accepting a connection failed (%s): pausing this acceptor for %g s", exc, PAUSE_SECONDS)
                self._pause()
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._opening.add(task)
            task.add_done_callback(self._opened)

    def _pause(self) -> None:
        """Stop watching the socket for a while: it stays ready, and every loop iteration would fail
        (and log) again."""
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        self._resume = self._loop.call_later(PAUSE_SECONDS, self._loop.add_reader, fd, self._accept_waiting)

    def _opened(self, task: asyncio.Task[Any]) -> None:
        self._opening.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("an accepted connection could not be opened: %r", task.exception())

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        if self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


class _GreedyServer:
    """uvloop's server, whose ``close()`` first stops the acceptors; everything else is the server's."""

    def __init__(self, server: asyncio.AbstractServer, acceptors: list[_Acceptor]) -> None:
        self._server = server
        self._acceptors = acceptors

    def close(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._server.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class GreedyAcceptLoop(uvloop.Loop):
    """uvloop whose TCP servers accept every waiting connection at once (see the module's text)."""

    async def create_server(self, protocol_factory: Any, *args: Any, **kwargs: Any) -> Any:
        server: Any = await super().create_server(protocol_factory, *args, **kwargs)
        if kwargs.get("ssl") is not None:
            return server  # a TLS server stays uvloop's alone
        backlog = kwargs.get("backlog", 100)
        acceptors = [
            _Acceptor(self, protocol_factory, sock, backlog)
            for sock in server.sockets
            if sock.family in (socket.AF_INET, socket.AF_INET6)
        ]
        return _GreedyServer(server, acceptors)
