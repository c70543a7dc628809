"""Finding the records of a batch that can never be written, without giving up the rest.

A batch is written in one transaction; when the transaction fails because of some record (a
constraint it cannot satisfy, a value the column cannot hold), :func:`write_isolating` bisects the
batch and writes each half in its own transaction, down to the single records that still fail.
Halves are written in order, so the stream order of what is written does not change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Poison(Generic[T]):
    """A record that cannot be written, and why (the database's message)."""

    item: T
    reason: str


async def write_isolating(
    items: Sequence[T],
    write: Callable[[Sequence[T]], Awaitable[R]],
    poison_reason: Callable[[Exception], str | None],
) -> tuple[list[R], list[Poison[T]]]:
    """Write ``items`` with ``write`` (one transaction per call); isolate the records that fail.

    ``poison_reason`` says whether an error of ``write`` is the records' fault (returns the reason)
    or not (returns None): such an error, and anything else ``write`` raises, propagates at once —
    sub-batches written before stay written, which the caller's idempotent writes absorb when it
    retries. Returns the results of the successful ``write`` calls in order and the poison records
    in stream order. A batch with k poison records among n costs about 2·k·log2(n) transactions.
    """
    try:
        return [await write(items)], []
    except Exception as exc:
        reason = poison_reason(exc)
        if reason is None:
            raise
        if len(items) <= 1:
            return [], [Poison(item, reason) for item in items]
    middle = len(items) // 2
    left, left_poison = await write_isolating(items[:middle], write, poison_reason)
    right, right_poison = await write_isolating(items[middle:], write, poison_reason)
    return left + right, left_poison + right_poison
