"""One fixed timeout for many concurrent awaits, on one timer: ``asyncio.timeout`` without its timer a use.

Every direct publish of a webhook is bounded by ``publish_timeout_ms``. ``asyncio.timeout`` schedules
a timer on entry and cancels it on exit, and the publish waited on ``asyncio.shield``: with uvloop,
~7.7 µs a webhook against ~2.5 µs for awaiting the future bare, ~3 % of ingest's CPU at saturation
(``Timeout.reschedule`` and ``shield`` in py-spy). Here every bound has the same length, so their
deadlines come in the order they were entered: they wait in a queue, and a single timer, armed at
the oldest open one's deadline, expires what is due and moves on to the next.

A :class:`Deadline` behaves as ``asyncio.timeout(seconds)`` does: when it expires, the task is
cancelled; leaving the block with that cancellation raises ``TimeoutError`` instead, unless the task
was (also) cancelled by someone else, whose ``CancelledError`` goes on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

_OPEN, _EXPIRING, _CLOSED = 0, 1, 2
_EARLY = 0.001  # a timer may run up to a millisecond early (uvloop counts milliseconds): due anyway


class Deadline:
    """One bounded block (``with deadlines.bound():``); see the module docstring."""

    __slots__ = ("_cancelling", "_owner", "_state", "_task", "when")

    def __init__(self, owner: Deadlines, when: float) -> None:
        self._owner = owner
        self.when = when
        self._state = _OPEN
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline is used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._owner._enter(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        expiring, self._state = self._state == _EXPIRING, _CLOSED
        if expiring:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    @property
    def expired(self) -> bool:
        return self._state == _EXPIRING

    def _expire(self) -> None:
        if self._state == _OPEN and self._task is not None:
            self._state = _EXPIRING
            self._task.cancel()


class Deadlines:
    """Bounds of ``seconds`` each, on one timer of the running loop."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._queue: deque[Deadline] = deque()  # entered, in deadline order; closed ones leave lazily
        self._timer: asyncio.TimerHandle | None = None

    def bound(self) -> Deadline:
        return Deadline(self, asyncio.get_running_loop().time() + self.seconds)

    @property
    def waiting(self) -> int:
        """Bounds entered and not yet let go of by the timer (closed ones included until it runs)."""
        return len(self._queue)

    def _enter(self, deadline: Deadline) -> None:
        self._queue.append(deadline)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(deadline.when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        queue = self._queue
        now = asyncio.get_running_loop().time()
        while queue:
            head = queue[0]
            if head._state == _OPEN and head.when > now + _EARLY:
                self._timer = asyncio.get_running_loop().call_at(head.when, self._fire)
                return
            queue.popleft()
            head._expire()  # a closed one is only dropped

    def close(self) -> None:
        """Stop the timer (the loop is going away); open bounds no longer expire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
