"""Gather: range coalescing, deferred table frees, batches, no-flush mode, counters."""

from __future__ import annotations

import pytest
from ptlab.tlb import Gather

P = 4096


class Recorder:
    def __init__(self) -> None:
        self.freed: list[int] = []

    def free(self, pa: int) -> None:
        self.freed.append(pa)


def test_ranges_coalesce_in_any_order() -> None:
    g = Gather()
    g.add_range(0x5000, 0x6000)
    g.add_range(0x1000, 0x2000)
    g.add_range(0x2000, 0x3000)  # touches the previous one
    g.add_range(0x8000, 0x9000)
    assert g.pending == [(0x1000, 0x3000), (0x5000, 0x6000), (0x8000, 0x9000)]
    g.add_range(0x2800, 0x8800)  # bridges three ranges
    assert g.pending == [(0x1000, 0x9000)]
    g.add_range(0x1000, 0x1000)  # empty: ignored
    g.add_range(0x9000, 0xA000)  # appended in order
    assert g.pending == [(0x1000, 0xA000)]
    with pytest.raises(ValueError, match="below start"):
        g.add_range(0x2000, 0x1000)


def test_flush_counts_and_frees_tables_after_flushing() -> None:
    g, r = Gather(ceiling=33), Recorder()
    assert g.flush() is False and g.stats.flushes == 0
    g.add_range(0, 2 * P)
    g.add_range(10 * P, 50 * P)
    g.free_table(0x7000, r)
    assert r.freed == [] and g.pending_tables == 1
    assert g.flush() is True
    assert r.freed == [0x7000]
    s = g.stats
    assert (s.flushes, s.ranges_flushed, s.pages_flushed, s.full_flushes, s.tables_freed) == (
        1, 2, 42, 1, 1)
    g.free_table(0x8000, r)  # a table free alone still needs a (walk-cache) flush
    g.flush()
    assert g.stats.flushes == 2 and r.freed == [0x7000, 0x8000]


def test_batch_costs_one_flush_and_nests() -> None:
    g = Gather()
    g.record = True
    with g.batch():
        for i in range(10):
            g.add_range(i * 3 * P, i * 3 * P + P)
            g.end_op()
        with g.batch():
            g.add_range(100 * P, 101 * P)
            g.end_op()
        assert g.stats.flushes == 0
    assert g.stats.flushes == 1 and g.stats.ranges_flushed == 11
    assert len(g.log) == 1 and len(g.log[0]) == 11
    g.add_range(0, P)
    g.end_op()
    assert g.stats.flushes == 2


def test_noflush_mode_records_without_flushing() -> None:
    g = Gather(noflush=True)
    g.add_range(0, P)
    g.end_op()
    with g.batch():
        g.add_range(P, 2 * P)
    assert g.stats.flushes == 0 and g.pending == [(0, 2 * P)]
    g.flush()  # the caller's flush_tlb_kernel_range
    assert g.flushes == 1 and g.pages_flushed == 2
    h = Gather()
    with h.noflush_mode():
        h.add_range(0, P)
        h.end_op()
    assert h.stats.flushes == 0 and not h.noflush
