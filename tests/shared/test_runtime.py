"""Garbage collection tuning of the services (``shared.runtime.tune_gc``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.runtime import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_startup_objects_are_frozen_and_young_collections_are_rarer(restored_gc: None) -> None:
    survivor = Node()
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # CPython's default
    # What lived at startup is in the permanent generation: no collection scans it again.
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())


def test_cycles_made_after_tuning_are_still_collected(restored_gc: None) -> None:
    tune_gc()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone does not free it
    gc.collect()
    assert gone() is None
