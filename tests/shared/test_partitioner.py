"""The producers' partitioner: the partition aiokafka's default partitioner (the Java client's
murmur2) would pick, for every key, the first time and when the key's hash is remembered."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.kafka import key_hash, partition_for, partitioner

DEFAULT = DefaultPartitioner()


@settings(max_examples=300, deadline=None)
@given(key=st.binary(max_size=80), count=st.integers(min_value=1, max_value=64))
def test_a_keyed_record_goes_where_the_default_partitioner_sends_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DEFAULT(key, partitions, partitions)
    assert partitioner(key, partitions, partitions) == expected
    assert partitioner(key, partitions, partitions) == expected  # remembered hash, same answer
    assert partition_for(key, partitions) == expected


def test_partition_ids_are_taken_from_the_list_not_the_index() -> None:
    partitions = [3, 5, 8]
    assert partitioner(b"issue-1", partitions, partitions) == partitions[key_hash(b"issue-1") % 3]


def test_an_unkeyed_record_goes_to_an_available_partition() -> None:
    for _ in range(50):
        assert partitioner(None, [0, 1, 2, 3], [2]) == 2
        assert partitioner(None, [0, 1], []) in (0, 1)


def test_the_remembered_hashes_are_bounded() -> None:
    key_hash.cache_clear()
    for n in range(70_000):
        key_hash(b"k%d" % n)
    info = key_hash.cache_info()
    assert info.maxsize is not None
    assert info.currsize == info.maxsize < 70_000
