"""Limits on the request head, and a deadline for it, that uvicorn's httptools protocol lacks.

uvicorn with httptools (what ``blametrail ingest`` runs) accepts any number of headers of any size
and waits for a request head forever; h11 stops at 16 KiB but has no header count limit either. So:

- :class:`IngestHttpProtocol` (uvicorn's httptools protocol) counts the request line and headers as
  they are parsed and answers 431 once there are more than :data:`MAX_HEADERS` headers or more than
  :data:`MAX_HEAD_BYTES` bytes of head (a header that never ends is cut off at that size too), and
  408 when a head has not arrived within ``BLAMETRAIL_INGEST_READ_TIMEOUT_SECONDS``; both close the
  connection. Memory per connection stays bounded.
- :class:`HeadLimits` applies the same two limits in the ASGI app, for any other server.

Both answer in the JSON error shape.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import orjson
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from shared import metrics
from shared.errors import error_body
from shared.settings import get_settings

MAX_HEADERS = 100
MAX_HEAD_BYTES = 16 * 1024  # request target and header lines, as h11's default limit
LINE_OVERHEAD = 4  # ": " and CRLF of a header line


# struct tcp_info (linux/tcp.h): tcpi_last_data_recv, a __u32 of milliseconds, at byte 52.
_LAST_DATA_RECV = slice(52, 56)


def accept_wait(transport: asyncio.BaseTransport) -> float | None:
    """Seconds a just-accepted TCP connection waited in the kernel for the server to accept it.

    The kernel's ``tcpi_last_data_recv``: milliseconds since the connection last received data, or
    since its handshake when it has sent nothing yet. Sentry, like any HTTP client, sends its request
    right after connecting, so at accept time this is how long the request has waited in the listen
    queue. None where there is no TCP_INFO (not Linux, a Unix socket).
    """
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _LAST_DATA_RECV.stop)
    except (AttributeError, OSError):
        return None
    if len(info) < _LAST_DATA_RECV.stop:
        return None
    return int.from_bytes(info[_LAST_DATA_RECV], sys.byteorder) / 1000


def head_problem(count: int, size: int) -> str | None:
    """Why a request head of ``count`` headers and ``size`` bytes is refused, or None."""
    if count > MAX_HEADERS:
        return f"more than {MAX_HEADERS} request headers"
    if size > MAX_HEAD_BYTES:
        return f"request line and headers are larger than {MAX_HEAD_BYTES} bytes"
    return None


def _count(outcome: str) -> None:
    metrics.INGEST_REQUESTS.labels(resource="other", outcome=outcome).inc()


def head_refusal(scope: Scope) -> str | None:
    """Why the head of an ASGI ``http`` request is over the limits, or None."""
    headers = scope["headers"]
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    size += sum(len(name) + len(value) + LINE_OVERHEAD for name, value in headers)
    problem = head_problem(len(headers), size)
    if problem is not None:
        _count("headers_too_large")
    return problem


class HeadLimits:
    """ASGI middleware: 431 for a head over the limits (behind a server that does not enforce them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = head_refusal(scope)
            if problem is not None:
                response = JSONResponse(
                    error_body("headers_too_large", problem), status_code=431, headers={"Connection": "close"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class IngestHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and a deadline to receive it.

    ``blametrail ingest`` runs uvicorn with ``http="ingest.http_limits:IngestHttpProtocol"``.
    """

    # Seconds a request head may take to arrive; None: BLAMETRAIL_INGEST_READ_TIMEOUT_SECONDS.
    read_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timeout = self.read_timeout or get_settings().ingest_read_timeout_seconds
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline: float | None = None  # loop time the awaited head must be complete by
        self._refused = False
        self._awaiting_head = True  # between messages, every byte received belongs to the next head
        self._messages = 0
        self._head_count = 0
        self._head_bytes = 0  # parsed: request target and complete header lines
        self._head_raw = 0  # received while the head is incomplete (bounds a header that never ends)

    # The deadline of a head: from the connection, or from a message's first byte, to its end.
    # One timer a connection, moved lazily: a head that completes only clears the deadline, and a
    # timer that fires early (its head completed, a later one began) sleeps on to the current
    # deadline. A keep-alive connection creates a timer every read timeout, not one per request
    # (call_later + cancel was ~1 % of ingest's CPU at saturation).
    def _arm_head_timer(self) -> None:
        self._head_deadline = deadline = self.loop.time() + self._read_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)

    def _cancel_head_timer(self) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # no head is awaited: the next one arms a timer again
        if self.loop.time() < deadline:
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)
            return
        self._head_deadline = None
        if self.cycle is None or self.cycle.response_complete:
            _count("timeout")
            self._refuse(408, "timeout", f"request head not received within {self._read_timeout:g} s")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` in the JSON error shape, then close; ignore everything after."""
        self._refused = True
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined head: an answer now would interleave with the current one
            return
        body = orjson.dumps(error_body(code, message))
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _check_head(self) -> None:
        problem = head_problem(self._head_count, max(self._head_bytes, self._head_raw))
        if problem is not None:
            _count("headers_too_large")
            self._refuse(431, "headers_too_large", problem)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()
        waited = accept_wait(transport)
        if waited is not None:
            metrics.INGEST_ACCEPT_WAIT_SECONDS.observe(waited)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        awaiting, messages = self._awaiting_head, self._messages
        super().data_received(data)
        # Only a chunk that began and ended inside one head is all head bytes.
        if not self._refused and awaiting and self._awaiting_head and messages == self._messages:
            self._head_raw += len(data)
            self._check_head()

    def on_message_begin(self) -> None:
        self._head_count = self._head_bytes = self._head_raw = 0
        self._arm_head_timer()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        self._head_bytes += len(url)
        self._check_head()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._head_count += 1
        self._head_bytes += len(name) + len(value) + LINE_OVERHEAD
        if self._head_count > MAX_HEADERS or self._head_bytes > MAX_HEAD_BYTES:
            self._check_head()
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_head = False
        self._head_deadline = None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_head = True
        self._messages += 1
        super().on_message_complete()
