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

import logging
import sys
import time
from datetime import UTC, datetime

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

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        return text + "".join(f" {k}={v}" for k, v in extras.items()) if extras else text


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
