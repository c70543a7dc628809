"""A metadata update that reaches no broker waits ``retry_backoff_ms`` before the next one can start.

Without it aiokafka 0.14 retried at once, as often as a sender or fetcher asked: ~1,100 connection
attempts a second per service while the broker was down (``shared.kafka.back_off_failed_metadata_updates``).
"""

from __future__ import annotations

import socket
import time

from aiokafka import AIOKafkaClient

from shared.kafka import back_off_failed_metadata_updates


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there now: connections are refused at once


async def test_failed_metadata_updates_are_spaced_by_the_retry_backoff() -> None:
    back_off_failed_metadata_updates()
    back_off_failed_metadata_updates()  # twice is harmless: still one backoff per failure
    client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{closed_port()}", retry_backoff_ms=200)
    attempts = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < 1.0:
            assert await client._metadata_update(client.cluster, []) is False
            attempts += 1
    finally:
        await client.close()
    # 1 s / 0.2 s: five attempts, six at most (the refusals themselves are immediate); unpatched, hundreds.
    assert 4 <= attempts <= 6, attempts
