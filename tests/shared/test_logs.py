"""Log lines: the per-webhook fast path writes what ``logger.info(event, extra=…)`` writes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from shared.logs import EventLog, JsonFormatter, RepeatFilter, setup_logging


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """setup_logging's handler on ``blametrail``, writing into a string for the test."""
    setup_logging(service="router", fmt="json")
    [handler] = [h for h in logging.getLogger("blametrail").handlers if getattr(h, "_blametrail", False)]
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    monkeypatch.setattr(handler, "stream", out)
    yield out


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_event_lines_have_the_shape_of_logger_lines_and_wait_for_flush(stream: io.StringIO) -> None:
    logger = logging.getLogger("blametrail.router")
    logger.info("routed", extra={"delivery_id": "d1", "org": "acme", "service_id": 7})
    events = EventLog(logger)
    events.add("routed", delivery_id="d2", org="acme", service_id=7, reason=None)
    events.add("ignored", delivery_id="d3", org="acme", reason="unmapped")
    assert len(lines(stream)) == 1  # nothing written before the flush
    events.flush()
    first, second, third = lines(stream)
    assert first.keys() == second.keys() and {k: v for k, v in second.items() if k != "ts"} == {
        "level": "info", "service": "router", "logger": "blametrail.router",
        "event": "routed", "delivery_id": "d2", "org": "acme", "service_id": 7,
    }  # fmt: skip
    assert (third["event"], third["reason"]) == ("ignored", "unmapped")
    events.flush()  # nothing pending: nothing written
    assert len(lines(stream)) == 3


def test_event_lines_follow_the_level_and_the_text_format(stream: io.StringIO) -> None:
    logger = logging.getLogger("blametrail.writer")
    events = EventLog(logger)
    setup_logging(logging.WARNING, service="writer", fmt="json")
    events.add("written", delivery_id="quiet")
    events.flush()
    assert stream.getvalue() == ""
    setup_logging(logging.INFO, service="writer", fmt="text")
    events.add("written", delivery_id="d4", org="acme")
    events.flush()
    assert stream.getvalue().rstrip().endswith(" INFO blametrail.writer: written delivery_id=d4 org=acme")
    setup_logging(logging.INFO, service="writer", fmt="json")


def test_repeated_warnings_are_held_back_and_counted() -> None:
    held = RepeatFilter(interval=60)
    record = logging.makeLogRecord({"name": "x", "levelno": logging.WARNING, "msg": "broker down %s"})
    assert held.filter(record)
    assert not held.filter(logging.makeLogRecord({"name": "x", "levelno": logging.WARNING, "msg": "broker down %s"}))
    info = logging.makeLogRecord({"name": "x", "levelno": logging.INFO, "msg": "broker down %s"})
    assert held.filter(info) and held.filter(info)


def test_a_lines_time_is_its_own_millisecond_whatever_came_before() -> None:
    """The formatter remembers the last millisecond it wrote: times on both sides of millisecond
    boundaries, forwards, backwards and repeated, each still print as datetime prints them."""
    formatter = JsonFormatter("router")
    base = 1_796_000_000.0  # 2026-12
    times = [base + n / 10_000 for n in range(-30, 30)]  # ten a millisecond, across six boundaries
    for created in [*times, *reversed(times), *times[::7], *times]:
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert json.loads(formatter.line(created, "INFO", "blametrail.router", "routed", {}))["ts"] == expected
