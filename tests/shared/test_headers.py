"""``header_value`` reads one header exactly as ``header_map`` would (last value wins, bad bytes replaced)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.kafka import header_map, header_value

NAMES = st.sampled_from(["org", "delivery_id", "replay_id", "x"])
HEADERS = st.lists(st.tuples(NAMES, st.none() | st.binary(max_size=8)), max_size=6)


@given(HEADERS, NAMES)
def test_header_value_agrees_with_header_map(headers: list[tuple[str, bytes | None]], name: str) -> None:
    assert header_value(headers, name) == header_map(headers).get(name)


def test_the_last_value_wins_and_absent_is_none() -> None:
    headers: list[tuple[str, bytes | None]] = [("org", b"a"), ("org", b"\xffb"), ("empty", None)]
    assert header_value(headers, "org") == "\ufffdb"
    assert header_value(headers, "empty") == ""
    assert header_value(headers, "missing") is None
