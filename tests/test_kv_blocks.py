"""BlockAllocator: plain-Python free list of KV blocks."""
import pytest
from hypothesis import given, settings, strategies as st

from loramux.server.engine.kv_cache import BlockAllocator, OutOfBlocks


def test_allocate_and_free_counts():
    a = BlockAllocator(num_blocks=8, block_size=16)
    assert (a.num_blocks, a.block_size, a.num_free, a.usage) == (8, 16, 8, 0.0)
    x = a.allocate(3)
    y = a.allocate(5)
    assert len(x) == 3 and len(y) == 5
    assert sorted(x + y) == list(range(8))
    assert a.num_free == 0 and a.usage == 1.0
    a.free(x)
    assert a.num_free == 3 and a.usage == pytest.approx(5 / 8)
    z = a.allocate(3)
    assert sorted(z) == sorted(x)
    a.free(y)
    a.free(z)
    assert a.num_free == 8 and a.usage == 0.0
    assert a.allocate(0) == []


def test_allocate_too_many_raises_and_changes_nothing():
    a = BlockAllocator(4, 4)
    a.allocate(3)
    with pytest.raises(OutOfBlocks):
        a.allocate(2)
    assert a.num_free == 1
    assert len(a.allocate(1)) == 1
    with pytest.raises(OutOfBlocks):
        a.allocate(1)
    with pytest.raises(ValueError):
        a.allocate(-1)


def test_double_free_raises_and_frees_nothing():
    a = BlockAllocator(4, 4)
    x = a.allocate(2)
    a.free(x[:1])
    with pytest.raises(ValueError):
        a.free(x)  # x[0] is free already: x[1] must stay allocated
    assert a.num_free == 3
    with pytest.raises(ValueError):
        a.free([x[1], x[1]])  # listed twice in one call
    assert a.num_free == 3
    a.free([x[1]])
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.free([x[1]])


def test_unknown_block_raises():
    a = BlockAllocator(4, 4)
    for bad in (-1, 4, 100):
        with pytest.raises(ValueError):
            a.free([bad])
    with pytest.raises(ValueError):
        a.free([0])  # never allocated
    assert a.num_free == 4


@pytest.mark.parametrize("tokens,blocks", [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3)])
def test_blocks_needed_is_ceil(tokens, blocks):
    assert BlockAllocator(10, 16).blocks_needed(tokens) == blocks


def test_bad_construction():
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)
    with pytest.raises(ValueError):
        BlockAllocator(-1, 16)
    empty = BlockAllocator(0, 16)
    assert empty.num_free == 0 and empty.usage == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24), st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=60))
def test_random_ops_match_a_model(num_blocks, ops):
    """Against a set model: owners' blocks stay disjoint, counts agree, and a
    failed call changes nothing."""
    a = BlockAllocator(num_blocks, 8)
    owned: list[list[int]] = []
    for is_alloc, k in ops:
        held = sum(len(o) for o in owned)
        if is_alloc:
            if k <= num_blocks - held:
                owned.append(a.allocate(k))
            else:
                with pytest.raises(OutOfBlocks):
                    a.allocate(k)
        elif owned:
            a.free(owned.pop(k % len(owned)))
        flat = [b for o in owned for b in o]
        assert len(flat) == len(set(flat))
        assert all(0 <= b < num_blocks for b in flat)
        assert a.num_free == num_blocks - len(flat)
    for o in owned:
        a.free(o)
    assert a.num_free == num_blocks
    assert sorted(a.allocate(num_blocks)) == list(range(num_blocks))
