"""Every service's log output: JSON lines (or text for humans), one webhook followable by its
``delivery_id``, and failures without the flood during an outage.

- ``BLAMETRAIL_LOG_FORMAT=json`` (default): one JSON object a line with ``ts``, ``level``,
  ``service``, ``logger``, ``event`` (the message) and every ``extra`` field a call passes —
  ``delivery_id`` wherever one exists (ingest accept/spool, router decision, writer write and dead
  letter), so ``grep <delivery_id> .run/logs/*`` shows one webhook's path through the services.
  ``text``: ``time level logger: message key=value …``.
- Outages: aiokafka and our own code log every failed reconnect (hundreds of lines a second while a
  broker is down); the repeat filter lets one warning-or-worse record per logger and message
  template through per interval and says how many it held back. Per-webhook info lines are never
  held back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

import orjson

from shared.settings import Settings, get_settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RepeatFilter(logging.Filter):
    """Pass a record only if no record of the same logger, level and template passed in ``interval`` s."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.msg = f"{record.msg} [{last[1]} similar messages suppressed in {self._interval:.0f}s]"
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = (now, 0)
        return True


# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._stamp: tuple[int, str] = (-1, "")  # the last millisecond formatted, and its text

    def _ts(self, created: float) -> str:
        """``created`` as ISO 8601 to the millisecond; a batch of lines shares a millisecond or a
        few, so the text is made once per millisecond (a datetime and its isoformat: ~1.5 µs)."""
        ms = round(created * 1_000_000) // 1000
        stamp = self._stamp
        if stamp[0] != ms:
            stamp = self._stamp = (ms, datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"))
        return stamp[1]

    def line(self, created: float, level: str, logger: str, event: str, fields: dict[str, object]) -> str:
        """The one shape of a JSON log line (``format`` and :class:`EventLog` both use it)."""
        line: dict[str, object] = {
            "ts": self._ts(created),
            "level": level.lower(),
            "service": self.service,
            "logger": logger,
            "event": event,
            **fields,
        }
        return orjson.dumps(line, default=str).decode()

    def format(self, record: logging.LogRecord) -> str:
        fields = _extras(record)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return self.line(record.created, record.levelname, record.name, record.getMessage(), fields)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(FORMAT)

    def line(self, created: float, level: str, logger: str, event: str, fields: dict[str, object]) -> str:
        stamp = datetime.fromtimestamp(created).isoformat(sep=" ", timespec="milliseconds").replace(".", ",")
        return f"{stamp} {level} {logger}: {event}" + "".join(f" {k}={v}" for k, v in fields.items())

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        return text + "".join(f" {k}={v}" for k, v in extras.items()) if extras else text


class EventLog:
    """Info lines about single webhooks, written several at a time.

    ``add(event, **fields)`` keeps a line (only when ``logger`` is enabled for INFO), ``flush()``
    formats the kept lines with the formatter of the handler ``setup_logging`` installed — the same
    shape a ``logger.info(event, extra=fields)`` line has — and writes them in one call. Fields whose
    value is None are left out. Without that handler (a library use, tests), lines go through
    ``logger.info`` one by one.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._pending: list[tuple[float, str, dict[str, object]]] = []

    def add(self, event: str, **fields: object) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self._pending.append((time.time(), event, {k: v for k, v in fields.items() if v is not None}))

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        handler = _our_handler(self.logger)
        formatter = handler.formatter if handler is not None else None
        if handler is None or not isinstance(formatter, (JsonFormatter, TextFormatter)):
            for _, event, fields in pending:
                self.logger.info(event, extra=fields)
            return
        name = self.logger.name
        text = "".join(
            formatter.line(created, "INFO", name, event, fields) + "\n" for created, event, fields in pending
        )
        with handler.lock or _NO_LOCK:
            handler.stream.write(text)
            handler.flush()


_NO_LOCK = contextlib.nullcontext()


def _our_handler(logger: logging.Logger) -> logging.StreamHandler[TextIO] | None:
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if getattr(handler, "_blametrail", False) and isinstance(handler, logging.StreamHandler):
                return handler
        current = current.parent if current.propagate else None
    return None


def setup_logging(level: str | int = logging.INFO, *, service: str = "blametrail", fmt: str | None = None) -> None:
    """Send ``blametrail.*`` (at ``level``) and ``aiokafka`` (warnings) records to stderr, as JSON
    lines or text (``fmt``; default ``BLAMETRAIL_LOG_FORMAT``), through the repeat filter.
    Idempotent: a second call changes the level and the format."""
    formatter: logging.Formatter = (
        TextFormatter() if (fmt or get_settings().log_format) == "text" else JsonFormatter(service)
    )
    for name, lvl in (("blametrail", level), ("aiokafka", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        ours = [h for h in logger.handlers if getattr(h, "_blametrail", False)]
        if ours:
            for handler in ours:
                handler.setFormatter(formatter)
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        handler.addFilter(RepeatFilter())
        handler._blametrail = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def log_settings(service: str, settings: Settings) -> None:
    """One line at startup with the effective settings, secrets left out (``Settings.public``)."""
    logging.getLogger(f"blametrail.{service}").info("settings", extra={"settings": settings.public()})
