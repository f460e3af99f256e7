"""TLB flush gathering: the model's ``struct mmu_gather``.

An operation adds the VA ranges whose translations changed (:meth:`Gather.add_range`) and
the table pages it unlinked (:meth:`Gather.free_table`, freed only after the flush, as
``tlb_remove_table`` does). At the end of an operation the engine calls
:meth:`Gather.end_op`, which flushes unless a batch is open (:meth:`Gather.batch`, so a
whole batch costs one flush, like ``tlb_finish_mmu``) or the gather is in no-flush mode
(``set_direct_map_*_noflush`` callers, who flush later with ``flush_tlb_kernel_range``).
Counters (``flushes``, ``pages_flushed``, ...) make "one flush per batch" measurable.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

PAGE_SIZE = 4096


class _Freer(Protocol):
    def free(self, pa: int) -> None: ...


@dataclass(slots=True)
class FlushStats:
    """What flushes cost so far."""

    flushes: int = 0  # flush operations issued (one per flush() with work pending)
    ranges_flushed: int = 0  # coalesced ranges across all flushes
    pages_flushed: int = 0  # 4 KiB pages covered by those ranges
    full_flushes: int = 0  # flushes that exceeded the ceiling (flush everything instead)
    tables_freed: int = 0  # table pages freed after their flush


class Gather:
    """Collects flush ranges (coalesced) and deferred table frees.

    ``ceiling``: a flush covering more than this many pages counts as a full flush
    (``tlb_single_page_flush_ceiling`` = 33 on x86); ``None`` means never.
    """

    def __init__(self, *, noflush: bool = False, ceiling: int | None = None) -> None:
        self.noflush = noflush
        self.ceiling = ceiling
        self.stats = FlushStats()
        self._starts: list[int] = []  # sorted, disjoint, non-adjacent [start, end) ranges
        self._ends: list[int] = []
        self._tables: list[tuple[int, _Freer]] = []
        self._depth = 0
        self.log: list[list[tuple[int, int]]] = []  # ranges of each flush (kept if record)
        self.record = False

    # --- collecting ---------------------------------------------------------------------
    def add_range(self, start: int, end: int) -> None:
        """Note that translations in [start, end) changed; merges with touching ranges."""
        if end <= start:
            if end < start:
                raise ValueError(f"flush range end {end:#x} is below start {start:#x}")
            return
        starts, ends = self._starts, self._ends
        if not starts or start > ends[-1]:  # the common case: ranges arrive in order
            starts.append(start)
            ends.append(end)
            return
        if start >= starts[-1]:  # overlaps or touches the last range
            ends[-1] = max(ends[-1], end)
            return
        lo = bisect.bisect_left(ends, start)  # first range ending at or after start
        hi = bisect.bisect_right(starts, end)  # ranges starting after end are untouched
        if lo < hi:
            start = min(start, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def free_table(self, pa: int, allocator: _Freer) -> None:
        """Free table page ``pa`` back to ``allocator`` once the TLB no longer caches it."""
        self._tables.append((pa, allocator))

    @property
    def pending(self) -> list[tuple[int, int]]:
        """Coalesced ranges not yet flushed."""
        return list(zip(self._starts, self._ends, strict=True))

    @property
    def pending_tables(self) -> int:
        return len(self._tables)

    @property
    def flushes(self) -> int:
        """Flushes issued so far (``stats.flushes``)."""
        return self.stats.flushes

    @property
    def pages_flushed(self) -> int:
        """4 KiB pages covered by all flushes so far (``stats.pages_flushed``)."""
        return self.stats.pages_flushed

    # --- flushing -------------------------------------------------------------------------
    def flush(self) -> bool:
        """Flush pending ranges and free pending tables now (even in no-flush mode).

        Returns whether anything was pending. Counts one flush per call with work.
        """
        if not self._starts and not self._tables:
            return False
        if self._starts:
            pages = sum(
                (e - s + PAGE_SIZE - 1) // PAGE_SIZE
                for s, e in zip(self._starts, self._ends, strict=True)
            )
            st = self.stats
            st.flushes += 1
            st.ranges_flushed += len(self._starts)
            st.pages_flushed += pages
            if self.ceiling is not None and pages > self.ceiling:
                st.full_flushes += 1
            if self.record:
                self.log.append(self.pending)
            self._starts, self._ends = [], []
        elif self._tables:
            self.stats.flushes += 1  # freeing tables needs the walk caches flushed
        tables, self._tables = self._tables, []
        for pa, allocator in tables:
            allocator.free(pa)
        self.stats.tables_freed += len(tables)
        return True

    def end_op(self) -> None:
        """Called by the engine after each operation: flush unless batching or no-flush."""
        if self._depth == 0 and not self.noflush:
            self.flush()

    @contextmanager
    def batch(self) -> Iterator[Gather]:
        """Operations inside share one flush, issued when the outermost batch exits."""
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and not self.noflush:
                self.flush()

    @contextmanager
    def noflush_mode(self) -> Iterator[Gather]:
        """Temporarily record ranges without flushing (``*_noflush`` callers)."""
        old, self.noflush = self.noflush, True
        try:
            yield self
        finally:
            self.noflush = old

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<Gather flushes={s.flushes} pages={s.pages_flushed} "
            f"pending={len(self._starts)} ranges/{len(self._tables)} tables>"
        )
