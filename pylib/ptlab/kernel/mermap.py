"""Per-CPU temporary mapping windows: mermap and kmap_local.

* :class:`Mermap` — the mermap proposal (Jackman, "__GFP_UNMAPPED" series, 2026:
  mm/mermap.c, include/linux/mermap.h; not in any released kernel): each CPU owns a window
  of ``nr_slots`` pages whose tables are built once, up front (:meth:`PageTable.preallocate`,
  pinned), so the map path is *guaranteed not to allocate* — here it runs through a view
  of the root whose allocator is a :class:`NoAllocAllocator`, which would raise if it ever
  needed a table. Slots are handed out in order and released without a flush; when the
  window wraps, all its entries are cleared and ONE local flush (that CPU's gather) covers
  them. Entries are never global (``PAGE_KERNEL_NOGLOBAL``), so the flush can stay local.
  :meth:`Mermap.get` returns None when every slot is still in use (the series' fast path
  is expected to fail; callers fall back to ``mermap_get_reserved()``).
* :class:`KmapLocal` — mm/highmem.c ``__kmap_local_pfn_prot`` / ``kunmap_local_indexed``
  (6.1): a per-CPU stack of ``KM_MAX_IDX`` fixmap slots; map writes the slot's pte
  (``BUG_ON(!pte_none())``), unmap clears it and flushes that one page locally
  (``arch_kmap_local_post_unmap`` → ``flush_tlb_one_kernel``). On 64-bit kernels
  ``kmap_local_page`` of a lowmem page returns ``page_address()`` and maps nothing; this
  is the mapping path (HIGHMEM or DEBUG_KMAP_LOCAL_FORCE_MAP).
"""

from __future__ import annotations

from ..alloc import NoAllocAllocator
from ..engine import PageTable
from ..formats.base import Attrs
from ..tlb import Gather

PAGE_SIZE = 4096
KM_MAX_IDX = 16  # include/asm-generic/kmap_size.h (without DEBUG_KMAP_LOCAL)


class _Windows:
    """Per-CPU windows of ``nr_slots`` pages from ``base``, tables prepared with ``pt``'s
    allocator; afterwards every CPU maps through a no-allocation view with its own gather."""

    def __init__(self, pt: PageTable, base: int, nr_cpus: int, nr_slots: int,
                 prot: Attrs) -> None:
        if prot.global_:
            raise ValueError("per-CPU windows are flushed locally: prot must not be global")
        if nr_cpus < 1 or nr_slots < 1:
            raise ValueError(f"need >= 1 CPU and slot, got {nr_cpus}/{nr_slots}")
        self.base, self.nr_slots, self.prot = base, nr_slots, prot
        self.prepared_tables = pt.preallocate(base, nr_cpus * nr_slots * PAGE_SIZE, level=0)
        self.noalloc = NoAllocAllocator(pt.fmt.table_bytes)
        self.cpus = [PageTable(pt.fmt, pt.mem, root=pt.root, alloc=self.noalloc,
                               gather=Gather()) for _ in range(nr_cpus)]

    def slot_va(self, cpu: int, slot: int) -> int:
        if not 0 <= cpu < len(self.cpus):
            raise ValueError(f"CPU {cpu} outside 0..{len(self.cpus) - 1}")
        if not 0 <= slot < self.nr_slots:
            raise ValueError(f"slot {slot} outside 0..{self.nr_slots - 1}")
        return self.base + (cpu * self.nr_slots + slot) * PAGE_SIZE

    def flushes(self, cpu: int) -> int:
        """Local flushes CPU ``cpu`` has issued."""
        return self.cpus[cpu].gather.flushes


class Mermap(_Windows):
    """mermap: ``get`` maps a page into the next free slot, ``put`` releases it lazily,
    a wrap clears the window with one local flush."""

    def __init__(self, pt: PageTable, base: int, nr_cpus: int, prot: Attrs,
                 nr_slots: int = 4) -> None:
        super().__init__(pt, base, nr_cpus, nr_slots, prot)
        self.next = [0] * nr_cpus  # next unused slot per CPU
        self.in_use = [set() for _ in range(nr_cpus)]  # type: list[set[int]]
        self.wraps = [0] * nr_cpus

    def get(self, cpu: int, pa: int) -> int | None:
        """Map ``pa`` on ``cpu``; its VA, or None when the window is full of live slots."""
        start = self.slot_va(cpu, 0)  # checks cpu
        pt, used = self.cpus[cpu], self.in_use[cpu]
        if self.next[cpu] == self.nr_slots:
            if used:
                return None  # cannot wrap under a live mapping: the caller falls back
            pt.unmap(start, self.nr_slots * PAGE_SIZE)  # stale entries gone, one flush
            self.next[cpu], self.wraps[cpu] = 0, self.wraps[cpu] + 1
        slot = self.next[cpu]
        va = self.slot_va(cpu, slot)
        pt.map(va, pa, PAGE_SIZE, self.prot)  # into an empty pte: no flush, no allocation
        self.next[cpu] = slot + 1
        used.add(slot)
        return va

    def put(self, cpu: int, va: int) -> None:
        """Release the slot at ``va`` (its entry stays until the window wraps)."""
        slot = (va - self.slot_va(cpu, 0)) // PAGE_SIZE
        if slot not in self.in_use[cpu]:
            raise ValueError(f"CPU {cpu}: VA {va:#x} is not a live mermap slot")
        self.in_use[cpu].discard(slot)


class KmapLocal(_Windows):
    """kmap_local: a per-CPU stack of fixmap slots, one local one-page flush per unmap."""

    def __init__(self, pt: PageTable, base: int, nr_cpus: int, prot: Attrs) -> None:
        super().__init__(pt, base, nr_cpus, KM_MAX_IDX, prot)
        self.depth = [0] * nr_cpus

    def map(self, cpu: int, pa: int) -> int:
        """``kmap_local_pfn``: push a slot and map ``pa`` there."""
        self.slot_va(cpu, 0)  # checks cpu
        idx = self.depth[cpu]
        if idx == KM_MAX_IDX:
            raise OverflowError(f"CPU {cpu}: kmap_local stack of {KM_MAX_IDX} slots full")
        va = self.slot_va(cpu, idx)
        self.cpus[cpu].map(va, pa, PAGE_SIZE, self.prot)  # MappingExists = the BUG_ON
        self.depth[cpu] = idx + 1
        return va

    def unmap(self, cpu: int, va: int) -> None:
        """``kunmap_local``: only the top slot may go (the stack discipline)."""
        self.slot_va(cpu, 0)  # checks cpu
        idx = self.depth[cpu] - 1
        if idx < 0 or va != self.slot_va(cpu, idx):
            raise ValueError(f"CPU {cpu}: kunmap_local of {va:#x} is not the top slot")
        self.cpus[cpu].unmap(va, PAGE_SIZE)  # pte_clear + flush_tlb_one_kernel
        self.depth[cpu] = idx
