"""planted_u64: one u64 of guest RAM changed for a block, always put back."""

from __future__ import annotations

import pytest
from ptharness.guestmem import planted_u64
from ptlab.memory import OutOfRange
from ptlab.memory.sparse import SparseMemory


def test_planted_value_is_seen_inside_and_restored_after():
    mem = SparseMemory()
    mem.write_u64(0x2000, 0x8000_0000_0000_0063)
    with planted_u64(mem, 0x2000, 0x63) as old:
        assert old == 0x8000_0000_0000_0063
        assert mem.read_u64(0x2000) == 0x63
        assert mem.read_u64(0x2008) == 0  # the neighbour is untouched
    assert mem.read_u64(0x2000) == 0x8000_0000_0000_0063


def test_restored_when_the_block_raises():
    mem = SparseMemory()
    mem.write_u64(0x3000, 7)
    with pytest.raises(KeyError), planted_u64(mem, 0x3000, 9):
        raise KeyError("boom")
    assert mem.read_u64(0x3000) == 7


@pytest.mark.parametrize("pa, value", [(0x2004, 1), (0x2000, -1), (0x2000, 1 << 64)])
def test_bad_plant_is_refused_before_writing(pa, value):
    mem = SparseMemory()
    mem.write_u64(0x2000, 5)
    with pytest.raises(ValueError, match="aligned u64"), planted_u64(mem, pa, value):
        pass
    assert mem.read_u64(0x2000) == 5


def test_outside_ram_is_out_of_range():
    from ptharness.guestmem import SharedRAM

    with pytest.raises(OutOfRange), planted_u64(SharedRAM(), 0x1000, 1):
        pass
