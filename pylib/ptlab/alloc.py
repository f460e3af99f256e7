"""Table-page allocators: a model physical page pool and the allocators the engine calls.

Every allocator has one interface: ``reserve(n) -> list[pa]`` is all-or-nothing (it raises
:class:`AllocError` and allocates nothing when ``n`` pages cannot be had) and ``free(pa)``
gives one page back. The engine reserves every table page an operation needs in one call
before it writes anything, so a failed reservation leaves the page tables untouched.

* :class:`NormalAllocator` — pages from a :class:`PhysPool` (``__get_free_page``).
* :class:`NoAllocAllocator` — any need fails: the "guaranteed not to allocate" paths
  (ASI/mermap maps into preallocated tables).
* :class:`PoolAllocator` — a preallocated stash of N pages, refillable (mempool).
* :class:`AccountingAllocator` — charges each page to an owner, like ``__GFP_ACCOUNT`` and
  the ``NR_SECONDARY_PAGETABLE`` / ``NR_PAGETABLE`` counters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Hashable, Sequence

from .memory.base import PhysMemory


class AllocError(Exception):
    """A page reservation that cannot be satisfied (nothing was allocated)."""


class PhysPool:
    """Granule-sized pages of model physical memory in [base, base + size).

    Pages are zeroed when allocated (``__GFP_ZERO``) and when freed (so a freed table leaves
    no stale entries behind in the model). Double frees and foreign pages raise.
    """

    def __init__(self, mem: PhysMemory, base: int, size: int, page_size: int = 4096) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size!r} is not a power of two")
        if base % page_size or size % page_size or size <= 0:
            raise ValueError(
                f"pool [{base:#x}, +{size:#x}) is not a non-empty {page_size:#x}-aligned range"
            )
        if not mem.contains(base, size):
            raise ValueError(f"pool [{base:#x}, +{size:#x}) is outside the memory")
        self.mem, self.base, self.size, self.page_size = mem, base, size, page_size
        self.npages = size // page_size
        self._next = 0  # pages [0, _next) have been handed out at least once
        self._free: list[int] = []  # page numbers below _next that are free again
        self._used: set[int] = set()

    @property
    def allocated(self) -> int:
        """Pages currently allocated."""
        return len(self._used)

    @property
    def available(self) -> int:
        return self.npages - len(self._used)

    def owns(self, pa: int) -> bool:
        return self.base <= pa < self.base + self.size and (pa - self.base) % self.page_size == 0

    def alloc(self, n: int) -> list[int]:
        """``n`` zeroed pages, all or none."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.available:
            raise AllocError(
                f"physical pool exhausted: {n} pages wanted, {self.available} of "
                f"{self.npages} free"
            )
        out: list[int] = []
        take = min(n, len(self._free))
        if take:
            out = self._free[-take:][::-1]
            del self._free[-take:]
        fresh = n - take
        out.extend(range(self._next, self._next + fresh))
        self._next += fresh
        self._used.update(out)
        pas = [self.base + p * self.page_size for p in out]
        for pa in pas[:take]:  # fresh pages were never written
            self._zero(pa)
        return pas

    def free(self, pa: int) -> None:
        if not self.owns(pa):
            raise AllocError(f"PA {pa:#x} is not a page of this pool")
        page = (pa - self.base) // self.page_size
        if page not in self._used:
            raise AllocError(f"double free of PA {pa:#x}")
        self._used.discard(page)
        self._free.append(page)
        self._zero(pa)

    def _zero(self, pa: int) -> None:
        zero_page(self.mem, pa, self.page_size)


def zero_page(mem: PhysMemory, pa: int, size: int) -> None:
    """Zero [pa, pa+size) (dropping SparseMemory frames where it can)."""
    zero = getattr(mem, "zero", None)
    if zero is not None:
        zero(pa, size)
    else:
        mem.write(pa, bytes(size))


class Allocator(ABC):
    """Source of table pages for the engine."""

    page_size: int = 4096
    mem: PhysMemory | None = None  # where the pages live, when known

    @abstractmethod
    def reserve(self, n: int) -> list[int]:
        """``n`` zeroed pages; all or nothing (raises AllocError, allocating nothing)."""

    @abstractmethod
    def free(self, pa: int) -> None:
        """Give back one page obtained from :meth:`reserve`."""

    def owns(self, pa: int) -> bool:
        """Whether ``pa`` is a page this allocator hands out (the engine frees only those)."""
        return False

    def pa_range(self) -> tuple[int, int] | None:
        """[lo, hi): the physical range every page this allocator can hand out lies in,
        when known (lo == hi: it hands out nothing). The engine refuses, up front, an
        allocator whose pages a format cannot point to."""
        return None


class NormalAllocator(Allocator):
    """Pages straight from a :class:`PhysPool`."""

    def __init__(self, pool: PhysPool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.mem = pool.mem

    def reserve(self, n: int) -> list[int]:
        return self.pool.alloc(n)

    def free(self, pa: int) -> None:
        self.pool.free(pa)

    def owns(self, pa: int) -> bool:
        return self.pool.owns(pa)

    def pa_range(self) -> tuple[int, int] | None:
        return self.pool.base, self.pool.base + self.pool.size


class PageListAllocator(Allocator):
    """Zeroed pages from a given list of page PAs (not contiguous: e.g. pages a guest
    pinned for the host), handed out in order; freed pages are reused."""

    def __init__(self, mem: PhysMemory, pages: Sequence[int], page_size: int = 4096) -> None:
        bad = [pa for pa in pages if pa % page_size or not mem.contains(pa, page_size)]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"pages must be distinct, aligned and in memory: {bad[:4]}")
        self.mem, self.page_size = mem, page_size
        self.pages = list(pages)
        self._free = self.pages[::-1]

    @property
    def allocated(self) -> int:
        return len(self.pages) - len(self._free)

    def in_use(self) -> list[int]:
        """The pages handed out and not freed, in list order."""
        free = set(self._free)
        return [pa for pa in self.pages if pa not in free]

    def reserve(self, n: int) -> list[int]:
        if n > len(self._free):
            raise AllocError(f"page list exhausted: {n} pages wanted, {len(self._free)} of "
                             f"{len(self.pages)} free")
        out = [self._free.pop() for _ in range(n)]
        for pa in out:
            zero_page(self.mem, pa, self.page_size)
        return out

    def free(self, pa: int) -> None:
        if pa not in self.pages or pa in self._free:
            raise AllocError(f"PA {pa:#x} is not an allocated page of this list")
        self._free.append(pa)

    def owns(self, pa: int) -> bool:
        return pa in self.pages

    def pa_range(self) -> tuple[int, int] | None:
        return (min(self.pages), max(self.pages) + self.page_size) if self.pages else (0, 0)


class NoAllocAllocator(Allocator):
    """Never allocates: any reservation of one page or more raises AllocError.

    ``free`` is refused too, since no page ever came from here.
    """

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.refused = 0  # reservations refused (for tests)

    def reserve(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot reserve {n} pages")
        if n:
            self.refused += 1
            raise AllocError(f"no-allocation mode: {n} table page(s) needed")
        return []

    def free(self, pa: int) -> None:
        raise AllocError(f"no-allocation mode never handed out PA {pa:#x}")

    def pa_range(self) -> tuple[int, int] | None:
        return 0, 0


class PoolAllocator(Allocator):
    """A stash of pages taken from ``source`` up front (mempool_create + refill).

    ``reserve`` only draws from the stash; freed pages go back to the stash.
    """

    def __init__(self, source: PhysPool | Allocator, n: int = 0) -> None:
        self.source = source
        self.page_size = source.page_size
        self.mem = source.mem
        self._stash: list[int] = []
        self._mine: set[int] = set()
        if n:
            self.refill(n)

    @property
    def available(self) -> int:
        return len(self._stash)

    def refill(self, n: int) -> None:
        """Take ``n`` more pages from the source (all or none)."""
        src = self.source
        pas = src.alloc(n) if isinstance(src, PhysPool) else src.reserve(n)
        self._stash.extend(pas)
        self._mine.update(pas)

    def reserve(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot reserve {n} pages")
        if n > len(self._stash):
            raise AllocError(f"page pool exhausted: {n} wanted, {len(self._stash)} left")
        out = self._stash[len(self._stash) - n :]
        del self._stash[len(self._stash) - n :]
        return out

    def free(self, pa: int) -> None:
        if pa not in self._mine:
            raise AllocError(f"PA {pa:#x} did not come from this page pool")
        if pa in self._stash:
            raise AllocError(f"double free of PA {pa:#x}")
        if self.mem is not None:
            zero_page(self.mem, pa, self.page_size)
        self._stash.append(pa)

    def drain(self) -> None:
        """Return every stashed page to the source."""
        while self._stash:
            pa = self._stash.pop()
            self._mine.discard(pa)
            self.source.free(pa)

    def owns(self, pa: int) -> bool:
        return pa in self._mine

    def pa_range(self) -> tuple[int, int] | None:
        src = self.source
        return (src.base, src.base + src.size) if isinstance(src, PhysPool) else src.pa_range()


class AccountingAllocator(Allocator):
    """Charges every page ``inner`` hands out to an owner; uncharges it on free.

    The owner is ``owner`` or, when ``owner_fn`` is given, ``owner_fn()`` at reservation
    time (like memcg charging the current task). ``charged(owner)`` is the per-owner count
    (``NR_SECONDARY_PAGETABLE`` for KVM/IOMMU tables, ``NR_PAGETABLE`` for process ones).
    """

    def __init__(
        self,
        inner: Allocator,
        owner: Hashable | None = None,
        owner_fn: Callable[[], Hashable] | None = None,
    ) -> None:
        self.inner = inner
        self.page_size = inner.page_size
        self.mem = inner.mem
        self.owner = owner
        self.owner_fn = owner_fn
        self._owner_of: dict[int, Hashable] = {}
        self._counts: Counter[Hashable] = Counter()

    def reserve(self, n: int) -> list[int]:
        owner = self.owner_fn() if self.owner_fn is not None else self.owner
        pas = self.inner.reserve(n)
        for pa in pas:
            self._owner_of[pa] = owner
        self._counts[owner] += len(pas)
        return pas

    def free(self, pa: int) -> None:
        self.inner.free(pa)
        owner = self._owner_of.pop(pa, _UNCHARGED)
        if owner is not _UNCHARGED:
            self._counts[owner] -= 1
            if not self._counts[owner]:
                del self._counts[owner]

    def owns(self, pa: int) -> bool:
        return self.inner.owns(pa)

    def pa_range(self) -> tuple[int, int] | None:
        return self.inner.pa_range()

    def charged(self, owner: Hashable | None = None) -> int:
        """Pages currently charged to ``owner``."""
        return self._counts.get(owner, 0)

    def totals(self) -> dict[Hashable, int]:
        """Owner -> pages currently charged."""
        return dict(self._counts)


_UNCHARGED = object()
