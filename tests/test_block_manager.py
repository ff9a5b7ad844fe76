"""The C++ page manager: unit tests, and random operation sequences checked against a
Python model of who owns which block."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citer._C import BlockManager


def test_append_allocates_blocks_lazily():
    bm = BlockManager(8, 4)
    h = bm.create_sequence()
    assert bm.block_table(h) == [] and bm.num_tokens(h) == 0
    assert bm.blocks_needed(h, 5) == 2
    bm.append_slots(h, 5)
    assert len(bm.block_table(h)) == 2 and bm.num_free_blocks == 6
    assert bm.blocks_needed(h, 3) == 0  # fills the second block
    bm.append_slots(h, 3)
    assert len(bm.block_table(h)) == 2
    bm.append_slots(h, 1)
    assert len(bm.block_table(h)) == 3
    bm.free_sequence(h)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_full_cache_changes_nothing():
    bm = BlockManager(3, 4)
    a, b = bm.create_sequence(), bm.create_sequence()
    bm.append_slots(a, 8)
    bm.append_slots(b, 2)
    table, free = bm.block_table(b), bm.num_free_blocks
    assert not bm.can_append(b, 10)
    with pytest.raises(RuntimeError, match="KV cache full: need 2 blocks, 0 free"):
        bm.append_slots(b, 10)
    assert bm.block_table(b) == table and bm.num_tokens(b) == 2 and bm.num_free_blocks == free
    bm.check_invariants()


def test_stale_and_unknown_handles_rejected():
    bm = BlockManager(4, 4)
    h = bm.create_sequence()
    bm.free_sequence(h)
    h2 = bm.create_sequence()  # reuses the slot with a new generation
    for bad in (h, 12345, -1):
        with pytest.raises(ValueError, match="stale or unknown sequence handle"):
            bm.append_slots(bad, 1)
    with pytest.raises(ValueError, match="stale"):
        bm.free_sequence(h)
    bm.append_slots(h2, 1)
    bm.check_invariants()


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(8, 4)
    a = bm.create_sequence()
    bm.append_slots(a, 6)  # blocks: one full, one half-filled
    b = bm.fork(a)
    assert bm.block_table(b) == bm.block_table(a)
    assert [bm.ref_count(x) for x in bm.block_table(a)] == [2, 2]
    assert bm.blocks_needed(b, 1) == 1  # the shared half block must be copied first
    bm.append_slots(b, 1)
    full, half = bm.block_table(a)
    assert bm.block_table(b)[0] == full and bm.block_table(b)[1] != half
    assert bm.take_copy_ops() == [(half, bm.block_table(b)[1])]
    assert bm.take_copy_ops() == []
    bm.free_sequence(a)
    assert bm.ref_count(full) == 1 and bm.ref_count(half) == 0
    bm.free_sequence(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_truncate_frees_the_blocks_past_the_new_end():
    bm = BlockManager(8, 4)
    a = bm.create_sequence()
    bm.append_slots(a, 10)  # 3 blocks
    first = bm.block_table(a)
    assert bm.truncate(a, 5) == 1 and bm.block_table(a) == first[:2] and bm.num_free_blocks == 6
    assert bm.truncate(a, 5) == 0 and bm.truncate(a, 4) == 1 and bm.num_tokens(a) == 4
    bm.append_slots(a, 3)  # grows again into a fresh block
    assert len(bm.block_table(a)) == 2 and bm.num_free_blocks == 6
    b = bm.fork(a)  # shared blocks survive the other's truncate
    assert bm.truncate(a, 0) == 2 and bm.block_table(a) == [] and bm.num_free_blocks == 6
    assert [bm.ref_count(x) for x in bm.block_table(b)] == [1, 1]
    with pytest.raises(ValueError, match="cannot truncate a sequence of 7 tokens to 9"):
        bm.truncate(b, 9)
    bm.check_invariants()


def test_counters():
    bm = BlockManager(6, 2)
    a, b = bm.create_sequence(), bm.create_sequence()
    bm.append_slots(a, 5)
    bm.append_slots(b, 2)
    bm.free_sequence(a)
    s = bm.stats()
    assert s["allocations"] == 4 and s["frees"] == 3 and s["peak_used_blocks"] == 4 and s["num_sequences"] == 1


def test_fill_block_tables_and_slot_mapping_match_python():
    bm = BlockManager(32, 4)
    rng = np.random.default_rng(0)
    handles, lens = [], []
    for n in (1, 7, 13, 4):
        h = bm.create_sequence()
        # interleave growth so tables are not contiguous
        for chunk in np.array_split(np.arange(n), 3):
            if len(chunk):
                bm.append_slots(h, len(chunk))
        handles.append(h)
        lens.append(n)
    out = np.full((4, 5), -7, dtype=np.int32)
    bm.fill_block_tables(handles, out, 99)
    for i, h in enumerate(handles):
        t = bm.block_table(h)
        assert out[i, : len(t)].tolist() == t and (out[i, len(t):] == 99).all()
    starts = np.array([rng.integers(0, n) for n in lens], dtype=np.int64)
    ends = np.array(lens, dtype=np.int64)
    slots = np.empty(int((ends - starts).sum()), dtype=np.int64)
    bm.fill_slot_mapping(handles, starts, ends, slots)
    expect = [bm.block_table(h)[p // 4] * 4 + p % 4 for h, a, b in zip(handles, starts, ends) for p in range(a, b)]
    assert slots.tolist() == expect


def test_fill_rejects_bad_arrays():
    bm = BlockManager(8, 4)
    h = bm.create_sequence()
    bm.append_slots(h, 9)
    with pytest.raises(ValueError, match="int32"):
        bm.fill_block_tables([h], np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="does not fit"):
        bm.fill_block_tables([h], np.zeros((1, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="rows"):
        bm.fill_block_tables([h], np.zeros((2, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="C-contiguous"):
        bm.fill_block_tables([h], np.zeros((1, 8), dtype=np.int32)[:, ::2])
    one = np.array([0], dtype=np.int64)
    with pytest.raises(ValueError, match="entries"):
        bm.fill_slot_mapping([h], one, np.array([9]), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="has no block"):
        bm.fill_slot_mapping([h], one, np.array([13]), np.zeros(13, dtype=np.int64))
    with pytest.raises(ValueError, match="int64"):
        bm.fill_slot_mapping([h], one.astype(np.int32), np.array([9]), np.zeros(9, dtype=np.int64))


ops = st.lists(st.tuples(st.sampled_from(["create", "append", "fork", "truncate", "free"]), st.integers(0, 1000),
                         st.integers(0, 40)), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 16]))
def test_random_operation_sequences_keep_invariants(ops, num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    live = {}  # handle -> token count (the Python model)
    for op, pick, n in ops:
        handles = sorted(live)
        h = handles[pick % len(handles)] if handles else None
        if op == "create" or h is None:
            live[bm.create_sequence()] = 0
        elif op == "append":
            before = bm.num_free_blocks
            need = bm.blocks_needed(h, n)
            if need <= before:
                bm.append_slots(h, n)
                live[h] += n
                assert bm.num_free_blocks == before - need
            else:
                with pytest.raises(RuntimeError, match="KV cache full"):
                    bm.append_slots(h, n)
                assert bm.num_free_blocks == before
        elif op == "fork":
            live[bm.fork(h)] = live[h]
        elif op == "truncate":
            keep = n % (live[h] + 1)
            before, blocks = bm.num_free_blocks, len(bm.block_table(h))
            shared = sum(bm.ref_count(b) > 1 for b in bm.block_table(h)[-(-keep // block_size):])
            assert bm.truncate(h, keep) == blocks - -(-keep // block_size)
            live[h] = keep
            assert bm.num_free_blocks == before + (blocks - -(-keep // block_size)) - shared
        else:
            bm.free_sequence(h)
            del live[h]
        bm.check_invariants()
        # independent count: distinct blocks referenced by live tables are exactly the used ones
        used = {b for x in live for b in bm.block_table(x)}
        assert len(used) == num_blocks - bm.num_free_blocks
        for x, count in live.items():
            assert bm.num_tokens(x) == count and len(bm.block_table(x)) == -(-count // block_size)
        owners = {}
        for x in live:
            for b in bm.block_table(x):
                owners[b] = owners.get(b, 0) + 1
        assert all(bm.ref_count(b) == c for b, c in owners.items())
    for x in list(live):
        bm.free_sequence(x)
    assert bm.num_free_blocks == num_blocks and bm.num_sequences == 0
    bm.take_copy_ops()
    bm.check_invariants()
