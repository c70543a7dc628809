"""A small open-loop HTTP/1.1 load generator on asyncio, for when vegeta is not installed.

Request ``i`` is due at ``start + i / rate`` whatever happened to the earlier ones (open loop: a
slow server gets more concurrent requests, not fewer), on a kept-alive connection from a pool that
grows as needed. Latency is measured from the *due* time, so a generator that falls behind its
schedule shows as latency instead of hiding it (no coordinated omission). Responses are read by
``Content-Length``; ingest always sends one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

ANSWER_TIMEOUT = 5.0  # seconds; an answer later than this counts as none


@dataclass
class Answer:
    status: int  # 0: no answer (connection error or timeout)
    latency: float  # seconds from the due time to the complete answer (or to the failure)
    error: str = ""


@dataclass
class _Pool:
    host: str
    port: int
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A kept-alive connection the server has not closed meanwhile (uvicorn closes one idle for
        5 s; a request sent on it would fail before reaching the server), or a new one."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def request_bytes(host: str, port: int, path: str, signature: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Sentry-Hook-Resource: issue\r\nSentry-Hook-Signature: {signature}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(pool: _Pool, request: bytes) -> int:
    reader, writer = await pool.get()
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        await reader.readexactly(length)
    except BaseException:
        writer.close()
        raise
    if close:
        writer.close()
    else:
        pool.idle.append((reader, writer))
    return status


async def attack(host: str, port: int, requests: list[bytes], rate: float, seconds: float) -> list[Answer]:
    """Send ``rate * seconds`` requests (cycling through ``requests``) on a fixed schedule."""
    pool = _Pool(host, port)
    total = int(rate * seconds)
    answers: list[Answer] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: bytes, due: float) -> None:
        error = ""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                status = await _exchange(pool, request)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            status, error = 0, type(exc).__name__
        answers.append(Answer(status, time.monotonic() - due, error))

    start = time.monotonic() + 0.05
    sent = 0
    while sent < total:
        now = time.monotonic()
        while sent < total and start + sent / rate <= now:
            task = asyncio.create_task(one(requests[sent % len(requests)], start + sent / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if sent < total:
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    if tasks:
        await asyncio.wait(set(tasks))
    pool.close()
    return answers


def run(host: str, port: int, requests: list[bytes], rate: float, seconds: float) -> list[Answer]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of ingest
        return asyncio.run(attack(host, port, requests, rate, seconds))
    return uvloop.run(attack(host, port, requests, rate, seconds))
