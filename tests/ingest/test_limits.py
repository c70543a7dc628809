"""Slow senders and oversized heads, over real sockets: uvicorn with ingest's protocol, in-process.

The app is the real one with fixed credentials and the fake broker (``tests/ingest/fake_app.py``);
requests are written byte by byte where it matters, as a slow or hostile client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import uvicorn

from ingest.http_limits import MAX_HEAD_BYTES, MAX_HEADERS, IngestHttpProtocol
from shared.security import sign
from shared.settings import Settings
from tests.ingest.fake_app import SECRETS, fake_ingest
from tests.ingest.fake_kafka import Harness
from tests.support.metrics import local

TIMEOUT = 0.5  # BLAMETRAIL_INGEST_READ_TIMEOUT_SECONDS of the server under test
BODY = b'{"action":"created","data":{"issue":{"id":"1","project":{"slug":"web"}}}}'


@dataclass
class Server:
    port: int
    harness: Harness


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, read_timeout: float = TIMEOUT) -> AsyncIterator[Server]:
    settings = Settings(spool_dir=str(tmp_path), ingest_read_timeout_seconds=read_timeout, max_body_bytes=64 * 1024)

    class Protocol(IngestHttpProtocol):
        pass

    Protocol.read_timeout = read_timeout

    async with fake_ingest(tmp_path, settings) as (app, harness):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, http=Protocol, lifespan="off", log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                assert not task.done(), task.result()
                await asyncio.sleep(0.01)
            yield Server(sock.getsockname()[1], harness)
        finally:
            server.should_exit = True
            await task
            sock.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str:
        error = orjson.loads(self.body)["error"]
        assert isinstance(error["message"], str)
        code: str = error["code"]
        return code


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (EOF, or a reset of data it did not read)."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


def request_head(path: str = "/webhooks/sentry/acme", *extra: bytes, length: int | None = None) -> bytes:
    lines = [b"POST %s HTTP/1.1" % path.encode(), b"Host: ingest", *extra]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def signed(body: bytes) -> bytes:
    return (
        request_head(
            "/webhooks/sentry/acme",
            b"Sentry-Hook-Resource: issue",
            b"Sentry-Hook-Signature: " + sign(SECRETS["acme"][0], body).encode(),
            length=len(body),
        )
        + body
    )


async def test_a_stalled_body_gets_408_and_the_connection_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        writer.write(signed(BODY)[:-10])  # the last 10 bytes never come
        answer = await read_answer(reader)
        elapsed = time.monotonic() - started
        assert answer.status == 408 and answer.error_code() == "timeout", answer
        assert answer.headers["connection"] == "close"
        assert TIMEOUT <= elapsed < TIMEOUT + 2, elapsed
        assert await closed(reader)
        writer.close()
        assert server.harness.broker.log == []

        # The server is free for the next sender.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(signed(BODY))
        assert (await read_answer(reader)).status == 200
        writer.close()
        assert [value for _, _, value in server.harness.broker.log] == [BODY]


async def test_a_trickling_body_gets_408_at_the_deadline(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        whole = signed(BODY)
        head_end = whole.index(b"\r\n\r\n") + 4
        writer.write(whole[:head_end])
        answer_task = asyncio.create_task(read_answer(reader))
        started = time.monotonic()
        for byte in whole[head_end:]:  # one byte every 50 ms: the body would take ~3.6 s
            if answer_task.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the sender's pace, not a synchronisation
        answer = await answer_task
        assert answer.status == 408 and answer.error_code() == "timeout", answer
        assert time.monotonic() - started < TIMEOUT + 2
        assert await closed(reader)
        writer.close()
        assert server.harness.broker.log == []


async def test_a_stalled_chunked_body_gets_408(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = request_head("/webhooks/sentry/acme", b"Transfer-Encoding: chunked", b"Sentry-Hook-Resource: issue")
        writer.write(head + b'5\r\n{"a":\r\n')  # then nothing
        answer = await read_answer(reader)
        assert answer.status == 408 and answer.error_code() == "timeout"
        assert await closed(reader)
        writer.close()


async def test_a_stalled_head_gets_408_and_an_idle_connection_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /webhooks/sentry/acme HTTP/1.1\r\nHost: ingest\r\nSentry-Hook-Reso")
        started = time.monotonic()
        answer = await read_answer(reader)
        assert answer.status == 408 and answer.error_code() == "timeout"
        assert time.monotonic() - started < TIMEOUT + 2
        assert await closed(reader)
        writer.close()

        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)  # sends nothing
        assert (await read_answer(idle_reader)).status == 408
        assert await closed(idle_reader)
        idle_writer.close()


async def test_each_head_of_a_keep_alive_connection_has_its_own_deadline(tmp_path: Path) -> None:
    """The head timer moves lazily (one timer a connection, not one a request): a head that began
    after an earlier head's deadline was armed still gets its full read timeout, and a stalled one
    still gets 408 — at its own deadline, not an earlier one's. The waits are the scenario (time
    passing on an open connection), not synchronisation."""
    timeout = 1.0
    async with serving(tmp_path, timeout) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        opened = time.monotonic()
        writer.write(signed(BODY))
        assert (await read_answer(reader)).status == 200
        await asyncio.sleep(0.6 * timeout)
        second = signed(BODY.replace(b'"1"', b'"2"'))
        writer.write(second[:20])  # this head's deadline: now + timeout
        await asyncio.sleep(0.6 * timeout)  # past the connection's first deadline, inside this head's
        assert time.monotonic() - opened > timeout
        writer.write(second[20:])
        assert (await read_answer(reader)).status == 200

        writer.write(b"POST /webhooks/sentry/acme HTTP/1.1\r\nHost: ingest\r\n")  # and stall
        begun = time.monotonic()
        answer = await read_answer(reader)
        assert answer.status == 408 and answer.error_code() == "timeout"
        assert time.monotonic() - begun >= timeout - 0.05, "timed out by an earlier head's deadline"
        assert await closed(reader)
        writer.close()


async def test_too_many_headers_get_431(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        # Host, Content-Length and MAX_HEADERS - 2 more: at the limit, served (401: unsigned).
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        extra = [b"X-N%d: 1" % n for n in range(MAX_HEADERS - 2)]
        writer.write(request_head("/webhooks/sentry/acme", *extra, length=2) + b"{}")
        assert (await read_answer(reader)).status == 401
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_head("/webhooks/sentry/acme", *extra, b"X-One-Too-Many: 1", length=2) + b"{}")
        answer = await read_answer(reader)
        assert answer.status == 431 and answer.error_code() == "headers_too_large", answer
        assert answer.headers["connection"] == "close"
        assert await closed(reader)
        writer.close()


async def test_an_oversized_head_gets_431_before_it_is_all_sent(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_head("/webhooks/sentry/acme", b"X-Big: " + b"b" * MAX_HEAD_BYTES, length=2) + b"{}")
        answer = await read_answer(reader)
        assert answer.status == 431 and answer.error_code() == "headers_too_large"
        writer.close()

        # A header that never ends: cut off near the limit, not buffered to the end (64 MiB here).
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /webhooks/sentry/acme HTTP/1.1\r\nHost: ingest\r\nX-Endless: ")
        answer_task = asyncio.create_task(read_answer(reader))
        sent = 0
        with contextlib.suppress(ConnectionError):
            while not answer_task.done() and sent < 64 * 1024 * 1024:
                writer.write(b"e" * 4096)
                sent += 4096
                await writer.drain()
        answer = await answer_task
        assert answer.status == 431 and answer.error_code() == "headers_too_large"
        # Refused long before the end: what was sent meanwhile sat in the socket buffers, unread.
        assert sent < 64 * 1024 * 1024, "the server waited for the end of a 64 MiB header"
        writer.close()


async def test_keep_alive_and_pipelined_requests_are_served(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        bodies = [BODY.replace(b'"1"', b'"%d"' % n) for n in range(4)]
        writer.write(signed(bodies[0]))
        assert (await read_answer(reader)).status == 200
        writer.write(signed(bodies[1]))  # the same connection, after the first answer
        assert (await read_answer(reader)).status == 200
        writer.write(signed(bodies[2]) + signed(bodies[3]))  # pipelined in one write
        assert [(await read_answer(reader)).status for _ in range(2)] == [200, 200]
        writer.close()
        assert [value for _, _, value in server.harness.broker.log] == bodies


async def test_the_wait_to_be_accepted_is_measured(tmp_path: Path) -> None:
    """A connection nobody accepted for 0.3 s (the loop blocked) is counted with its wait."""

    def observed() -> tuple[float, float]:
        return local("blametrail_ingest_accept_wait_seconds_count"), local("blametrail_ingest_accept_wait_seconds_sum")

    async with serving(tmp_path) as server:
        count, total = observed()
        client = socket.create_connection(("127.0.0.1", server.port))  # completed by the kernel
        client.sendall(signed(BODY))
        time.sleep(0.3)  # noqa: ASYNC251 -- this loop serves ingest: nothing is accepted meanwhile
        reader, writer = await asyncio.open_connection(sock=client)
        assert (await read_answer(reader)).status == 200
        writer.close()
        new_count, new_total = observed()
        assert new_count == count + 1
        assert 0.3 <= new_total - total < 5


async def test_100_continue_is_written_before_the_body_arrives(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        signature = sign(SECRETS["acme"][0], BODY).encode()
        extra = (b"Sentry-Hook-Resource: issue", b"Sentry-Hook-Signature: " + signature, b"Expect: 100-continue")
        writer.write(request_head("/webhooks/sentry/acme", *extra, length=len(BODY)))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(BODY)
        assert (await read_answer(reader)).status == 200
        writer.close()


async def test_unknown_paths_and_methods_answer_in_the_error_shape(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_head("/webhooks/nowhere", length=2) + b"{}")
        answer = await read_answer(reader)
        assert (answer.status, answer.error_code()) == (404, "not_found")
        writer.write(b"GET /webhooks/sentry/acme HTTP/1.1\r\nHost: ingest\r\n\r\n")
        answer = await read_answer(reader)
        assert (answer.status, answer.error_code()) == (405, "method_not_allowed")
        writer.close()


async def test_a_body_in_several_parts_is_joined(tmp_path: Path) -> None:
    body = orjson.dumps({"action": "created", "data": {"issue": {"id": "77", "title": "x" * 3000}}})
    async with serving(tmp_path) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = signed(body)
        for start in range(0, len(request), 700):  # head and body over several reads
            writer.write(request[start : start + 700])
            await writer.drain()
        assert (await read_answer(reader)).status == 200
        writer.close()
        assert [value for _, _, value in server.harness.broker.log] == [body]


async def test_an_unexpected_error_is_a_500_in_the_error_shape_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path) as server:

        async def broken(record: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(server.harness.publisher, "publish", broken)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        with caplog.at_level("ERROR", logger="blametrail.ingest"):
            writer.write(signed(b'{"action": "created"}'))
            answer = await read_answer(reader)
        assert (answer.status, answer.error_code()) == (500, "internal_error")
        assert any("a bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)
        monkeypatch.undo()
        writer.write(signed(b'{"action": "resolved"}'))  # the connection still serves
        assert (await read_answer(reader)).status == 200
        writer.close()
