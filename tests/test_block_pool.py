"""Block pool and KV manager: reference counts, copy-on-write forks, hash-chained prefix cache."""

import pytest

from counterpoint.serving.engine.block_pool import BlockPool
from counterpoint.serving.engine.kv_manager import KVManager
from counterpoint.serving.engine.request import Sequence


def make(num_blocks=8, block_size=4, caching=True):
    return KVManager(BlockPool(num_blocks, block_size, caching))


def test_allocate_grows_by_blocks_and_free_returns_them():
    kv = make()
    seq = Sequence("main", list(range(10)))
    assert kv.num_blocks_needed(seq, 10) == 3
    assert kv.allocate(seq, 10) == []
    assert len(seq.block_table) == 3 and kv.pool.num_free_blocks == 5
    kv.free(seq)
    assert kv.pool.num_free_blocks == 8 and seq.block_table == []


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    kv = make()
    parent = Sequence("main", list(range(6)))
    kv.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork()
    kv.fork(child)
    assert child.block_table == parent.block_table
    assert [kv.pool.ref_counts[b] for b in parent.block_table] == [2, 2]
    parent.token_ids.append(100)
    child.token_ids.append(200)
    assert kv.num_blocks_needed(parent, 1) == 1  # the partial block must be copied first
    copies = kv.allocate(parent, 1)
    assert copies == [(child.block_table[1], parent.block_table[1])]
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    assert kv.allocate(child, 1) == []  # the last holder writes in place
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_free_blocks == 8


def test_prefix_cache_hits_full_blocks_only_and_confirms_tokens():
    kv = make()
    first = Sequence("main", list(range(11)))
    kv.allocate(first, 11)
    kv.free(first)
    second = Sequence("main", list(range(9)) + [99, 98])
    assert kv.match_prefix(second) == 8  # two full blocks of 4; the third differs
    kv.free(second)
    other = Sequence("main", [7] + list(range(1, 11)))
    assert kv.match_prefix(other) == 0  # the chain breaks at the first block


def test_last_token_is_never_served_from_cache():
    kv = make()
    first = Sequence("main", list(range(8)))
    kv.allocate(first, 8)
    kv.free(first)
    again = Sequence("main", list(range(8)))
    assert kv.match_prefix(again) == 4  # not 8: the last token must be computed for its logits


def test_eviction_reuses_least_recently_freed_blocks():
    kv = make(num_blocks=2, block_size=4)
    seq = Sequence("main", list(range(8)))
    kv.allocate(seq, 8)
    kv.free(seq)
    fresh = Sequence("main", [50, 51, 52, 53, 54])
    kv.allocate(fresh, 5)  # takes both blocks, evicting the cached prefix
    kv.free(fresh)
    assert kv.match_prefix(Sequence("main", list(range(8)) + [1])) == 0


def test_disabled_cache_never_hits():
    kv = make(caching=False)
    seq = Sequence("main", list(range(9)))
    kv.allocate(seq, 9)
    kv.free(seq)
    assert kv.match_prefix(Sequence("main", list(range(9)))) == 0


def test_double_free_is_caught():
    pool = BlockPool(2, 4)
    block = pool.allocate()
    pool.decref(block)
    with pytest.raises(AssertionError):
        pool.decref(block)
