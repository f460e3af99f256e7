"""Allocators: all-or-nothing reservation, zeroing, double-free detection, accounting."""

from __future__ import annotations

import pytest
from ptlab.alloc import (
    AccountingAllocator,
    AllocError,
    NoAllocAllocator,
    NormalAllocator,
    PhysPool,
    PoolAllocator,
)
from ptlab.memory import SparseMemory

BASE = 1 << 32


def pool(pages: int = 8, page_size: int = 4096) -> PhysPool:
    return PhysPool(SparseMemory(), BASE, pages * page_size, page_size)


def test_pool_pages_are_zeroed_unique_and_all_or_nothing() -> None:
    p = pool(4)
    a = p.alloc(3)
    assert len(set(a)) == 3 and all(p.owns(x) for x in a) and p.allocated == 3
    p.mem.write(a[0], b"\xff" * 4096)
    p.free(a[0])
    with pytest.raises(AllocError, match="3 pages wanted, 2 of 4 free"):
        p.alloc(3)
    assert p.allocated == 2 and p.available == 2
    again = p.alloc(2)
    assert a[0] in again and p.mem.read(a[0], 4096) == bytes(4096)
    assert p.available == 0


def test_pool_rejects_double_and_foreign_frees_and_bad_geometry() -> None:
    p = pool(2)
    (pa,) = p.alloc(1)
    p.free(pa)
    with pytest.raises(AllocError, match="double free"):
        p.free(pa)
    with pytest.raises(AllocError, match="not a page"):
        p.free(pa + 8)
    with pytest.raises(ValueError, match="power of two"):
        PhysPool(SparseMemory(), 0, 4096, 3000)
    with pytest.raises(ValueError, match="aligned"):
        PhysPool(SparseMemory(), 100, 4096)
    with pytest.raises(ValueError, match="outside"):
        PhysPool(SparseMemory(1 << 20), 0, 2 << 20)


def test_big_granule_pool() -> None:
    p = pool(2, 65536)
    a, b = p.alloc(2)
    assert b - a in (65536, -65536)
    p.mem.write(a + 60000, b"x")
    p.free(a)
    assert p.alloc(1) == [a] and p.mem.read(a + 60000, 1) == b"\0"


def test_noalloc_refuses_any_page() -> None:
    na = NoAllocAllocator()
    assert na.reserve(0) == []
    with pytest.raises(AllocError, match="no-allocation"):
        na.reserve(1)
    assert na.refused == 1
    with pytest.raises(AllocError):
        na.free(BASE)


def test_pool_allocator_stash_refill_and_drain() -> None:
    p = pool(8)
    pa = PoolAllocator(p, 3)
    assert p.allocated == 3 and pa.available == 3
    with pytest.raises(AllocError, match="4 wanted, 3 left"):
        pa.reserve(4)
    assert pa.available == 3
    got = pa.reserve(2)
    assert pa.available == 1 and all(pa.owns(x) for x in got)
    pa.free(got[0])
    with pytest.raises(AllocError, match="double free"):
        pa.free(got[0])
    with pytest.raises(AllocError, match="did not come"):
        pa.free(BASE + 7 * 4096)
    pa.refill(2)
    assert pa.available == 4 and p.allocated == 5
    pa.drain()
    assert pa.available == 0 and p.allocated == 1  # got[1] is still out
    chained = PoolAllocator(NormalAllocator(p), 2)
    assert chained.available == 2 and p.allocated == 3


def test_accounting_per_owner() -> None:
    p = pool(8)
    owner = ["a"]
    acct = AccountingAllocator(NormalAllocator(p), owner_fn=lambda: owner[0])
    x = acct.reserve(2)
    owner[0] = "b"
    y = acct.reserve(3)
    assert acct.totals() == {"a": 2, "b": 3} and acct.charged("a") == 2
    with pytest.raises(AllocError):
        acct.reserve(4)  # inner refuses: nothing charged
    assert acct.totals() == {"a": 2, "b": 3}
    for pa in x + y[:1]:
        acct.free(pa)
    assert acct.totals() == {"b": 2} and acct.charged("a") == 0
    with pytest.raises(AllocError):
        acct.free(x[0])  # double free reaches the pool and charges stay right
    assert acct.totals() == {"b": 2}
    fixed = AccountingAllocator(NoAllocAllocator(), owner="kvm")
    with pytest.raises(AllocError):
        fixed.reserve(1)
    assert fixed.charged("kvm") == 0
