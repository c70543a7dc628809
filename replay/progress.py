"""What a replay shows while it runs: a progress bar on a terminal, a plain line every few seconds
otherwise (both on standard error, so ``--json`` keeps standard output to itself)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol, TextIO


@dataclass
class Counts:
    scanned: int = 0
    selected: int = 0
    republished: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Records selected (and republished unless a dry run) a second so far."""
        return self.selected / self.elapsed if self.elapsed > 0 else 0.0

    def eta(self, estimate: int) -> float | None:
        """Seconds left by the scanning speed so far (``estimate``: records in the window)."""
        if not self.scanned:
            return None
        return max(0, estimate - self.scanned) * self.elapsed / self.scanned


class Progress(Protocol):
    def update(self, counts: Counts) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line every ``every`` seconds (and a last one at the end)."""

    def __init__(self, replay_id: str, estimate: int, stream: TextIO, every: float = 5.0) -> None:
        self._prefix, self._estimate, self._stream, self._every = f"replay {replay_id}", estimate, stream, every
        self._last = time.monotonic()
        self._counts: Counts | None = None

    def update(self, counts: Counts) -> None:
        self._counts = counts
        if time.monotonic() - self._last >= self._every:
            self._write(counts)

    def _write(self, c: Counts) -> None:
        self._last = time.monotonic()
        eta = c.eta(self._estimate)
        print(
            f"{self._prefix}: scanned {c.scanned}/~{self._estimate}, selected {c.selected}, "
            f"republished {c.republished}, {c.rate:.0f}/s, ETA {'?' if eta is None else f'{eta:.0f}s'}",
            file=self._stream,
            flush=True,
        )

    def close(self) -> None:
        if self._counts is not None:
            self._write(self._counts)


class BarProgress:
    """A ``rich`` progress bar over the records scanned (the window's estimated size)."""

    def __init__(self, replay_id: str, estimate: int, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn(f"replay {replay_id[:8]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("scanned · selected {task.fields[selected]} · republished {task.fields[republished]}"),
            TextColumn("· {task.fields[rate]:.0f}/s"),
            TimeRemainingColumn(),
            console=Console(file=stream),
        )
        self._task = self._bar.add_task("replay", total=estimate, selected=0, republished=0, rate=0.0)
        self._bar.start()

    def update(self, counts: Counts) -> None:
        self._bar.update(
            self._task,
            completed=counts.scanned,
            selected=counts.selected,
            republished=counts.republished,
            rate=counts.rate,
        )

    def close(self) -> None:
        self._bar.stop()


def progress_for(replay_id: str, estimate: int, stream: TextIO = sys.stderr) -> Progress:
    """A bar on a terminal, plain lines otherwise."""
    return BarProgress(replay_id, estimate, stream) if stream.isatty() else PlainProgress(replay_id, estimate, stream)
