"""Block accounting and the prefix cache, with no model: reference counts, hits, LRU eviction."""

from __future__ import annotations

import pytest

from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.sequence import Sequence
from worker_orcd.sampling_params import SamplingParams

BS = 4  # tokens per block


def seq(tokens) -> Sequence:
    return Sequence(list(tokens), SamplingParams())


def computed(manager: BlockManager, tokens) -> Sequence:
    """A sequence whose every token's KV is computed and cached."""
    s = seq(tokens)
    prefix = manager.match_prefix(s.token_ids)
    manager.allocate(s, s.num_tokens, prefix)
    s.num_computed_tokens = s.num_tokens
    manager.cache_blocks(s)
    return s


def test_allocation_and_free_restore_the_free_count():
    manager = BlockManager(8, BS)
    a = seq(range(10))
    manager.allocate(a, 10)
    assert len(a.block_table) == 3 and manager.num_free_blocks == 5
    manager.allocate(a, 13)  # grows by one block
    assert len(a.block_table) == 4 and len(set(a.block_table)) == 4
    manager.free(a)
    assert a.block_table == [] and manager.num_free_blocks == 8


def test_a_shared_prefix_is_computed_once_and_freed_by_its_last_holder():
    manager = BlockManager(16, BS)
    a = computed(manager, range(12))
    b = seq([*range(8), 99, 98, 97])
    prefix = manager.match_prefix(b.token_ids)
    assert prefix == a.block_table[:2]  # two full blocks shared; the third differs
    manager.allocate(b, b.num_tokens, prefix)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert [manager.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    manager.free(a)
    assert [manager.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    manager.free(b)
    assert manager.num_free_blocks == 16


def test_the_last_token_is_never_taken_from_the_cache():
    manager = BlockManager(16, BS)
    computed(manager, range(8))
    assert len(manager.match_prefix(list(range(8)))) == 1  # two full blocks: the last recomputed
    assert len(manager.match_prefix(list(range(9)))) == 2


def test_a_freed_prefix_stays_cached_until_evicted_oldest_first():
    manager = BlockManager(4, BS)
    a = computed(manager, range(8))
    old = list(a.block_table)
    manager.free(a)
    assert manager.num_free_blocks == 4
    assert manager.match_prefix(list(range(9))) == old  # a hit after its holder left
    # Two never-keyed blocks go first, then the LRU's oldest: a's tail before its head.
    c = seq(range(100, 112))
    manager.allocate(c, 12)
    assert manager.match_prefix(list(range(9))) == old[:1]
    manager.free(c)


def test_taking_back_an_evictable_block_counts_against_the_free_blocks():
    manager = BlockManager(3, BS)
    a = computed(manager, range(8))
    manager.free(a)
    b = seq([*range(8), 1, 2, 3, 4, 5])
    prefix = manager.match_prefix(b.token_ids)
    assert len(prefix) == 2
    assert manager.can_allocate(b, 12, prefix)  # two reclaimed + one new = all three
    assert not manager.can_allocate(b, 13, prefix)


def test_the_same_block_tokens_after_a_different_prefix_miss():
    manager = BlockManager(16, BS)
    computed(manager, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert manager.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 0]) == []


def test_a_prefix_computed_twice_keeps_one_cache_entry():
    manager = BlockManager(16, BS)
    a, b = seq(range(9)), seq(range(9))
    for s in (a, b):  # both computed before either is cached, as in one batch
        manager.allocate(s, 9)
        s.num_computed_tokens = 9
    manager.cache_blocks(a)
    manager.cache_blocks(b)
    assert manager.match_prefix(list(range(9))) == a.block_table[:2]
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 16


def test_without_prefix_caching_nothing_is_shared():
    manager = BlockManager(8, BS, enable_prefix_caching=False)
    a = computed(manager, range(8))
    manager.free(a)
    assert manager.match_prefix(list(range(9))) == []


def test_allocating_past_the_pool_is_a_programming_error():
    manager = BlockManager(2, BS)
    a = seq(range(9))
    assert not manager.can_allocate(a, 9)
    with pytest.raises(AssertionError):
        manager.allocate(a, 9)
