"""Every service's log output: its own messages, and aiokafka's without the flood during an outage.

aiokafka logs every failed reconnect (hundreds of lines a second while the broker is down); the
repeat filter lets one record per logger, level and message template through per interval and
says how many it held back.
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RepeatFilter(logging.Filter):
    """Pass a record only if no record of the same logger, level and template passed in ``interval`` s."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
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


def setup_logging(level: str | int = logging.INFO) -> None:
    """Send ``blametrail.*`` (at ``level``) and ``aiokafka`` (warnings) records to stderr through the
    repeat filter. Idempotent: a second call only changes the level."""
    for name, lvl in (("blametrail", level), ("aiokafka", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        if any(getattr(h, "_blametrail", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(RepeatFilter())
        handler._blametrail = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
