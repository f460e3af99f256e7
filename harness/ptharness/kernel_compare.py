"""The model-vs-real comparison of :mod:`ptharness.kernel_scenarios` (one method for every
kernel page-table user).

The method (issue 9): stop the guest and walk the real tables ("before") through a
:class:`TableSnapshot` (the table frames the walk read, copied, so the model never touches
the guest and the guest may run on); let the real kernel do the thing (agent); stop and walk
again ("after"); apply the kernel user's model operation to a copy-on-write
:class:`~ptlab.memory.overlay.OverlayMemory` over the snapshot, rooted at the real root,
with the model's table pool in a scratch range no guest RAM uses; compare model-after with
real-after:

* as runs (:func:`compare_runs`): every 4 KiB page of the range, mapped or not-present in
  either, must have the same PA, page size and effective attributes (accessed/dirty
  ignored); the result says ``N pages agree, M differ`` and lists each difference;
* as raw entries (:func:`compare_entries`): the whole table holding each touched page's
  leaf, entry for entry (leaves and non-present entries bit for bit — x86 keeps the
  inverted PFN there — table entries by their attribute bits, their table PAs being the
  model's own); accessed/dirty bits ignored.

Nothing here loosens a comparison: a difference is a finding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.engine import PageTable
from ptlab.formats.base import Format, Kind
from ptlab.memory.base import OutOfRange, PhysMemory
from ptlab.memory.overlay import OverlayMemory
from ptlab.tlb import Gather
from ptlab.walk import Run, Walker, translate

PAGE = 4096
FRAME = 4096
SCRATCH = (1 << 40, (1 << 40) + (256 << 20))  # the model's table pool: 1 TiB, no RAM there
MAX_LISTED = 20  # differences listed in a summary (all are kept)


class TableSnapshot(PhysMemory):
    """The frames of ``base`` read while recording, copied; after :meth:`freeze` only they
    can be read (any other read is OutOfRange: the model read a frame the "before" walk did
    not see, which would be the live guest's, not the snapshot's)."""

    def __init__(self, base: PhysMemory) -> None:
        self.base = base
        self.frames: dict[int, np.ndarray] = {}
        self.frozen = False

    def freeze(self) -> TableSnapshot:
        self.frozen = True
        return self

    def _frame(self, pfn: int) -> np.ndarray:
        f = self.frames.get(pfn)
        if f is None:
            if self.frozen:
                raise OutOfRange(f"frame {pfn << 12:#x} is not in the table snapshot")
            f = np.frombuffer(self.base.read(pfn * FRAME, FRAME), dtype="<u8").copy()
            self.frames[pfn] = f
        return f

    def contains(self, pa: int, size: int = 8) -> bool:
        return self.base.contains(pa, size)

    def ranges(self) -> list[tuple[int, int]]:
        return self.base.ranges()

    def read(self, pa: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            pfn, off = divmod(pa, FRAME)
            n = min(size, FRAME - off)
            out += self._frame(pfn).view(np.uint8)[off:off + n].tobytes()
            pa, size = pa + n, size - n
        return bytes(out)

    def read_table(self, pa: int, n: int) -> np.ndarray:
        off = pa % FRAME
        if off % 8 == 0 and off + n * 8 <= FRAME:
            return self._frame(pa // FRAME)[off // 8:off // 8 + n]
        return super().read_table(pa, n)


def model_table(fmt: Format, base: PhysMemory, root: int) -> PageTable:
    """A model :class:`PageTable` over a copy-on-write overlay of ``base`` rooted at the real
    root; new table pages come from the overlay's scratch range."""
    ov = OverlayMemory(base, [SCRATCH])
    pool = PhysPool(ov, SCRATCH[0], SCRATCH[1] - SCRATCH[0])
    return PageTable(fmt, ov, root=root, alloc=NormalAllocator(pool), gather=Gather())


def walk_runs(fmt: Format, mem: PhysMemory, root: int, start: int, end: int) -> list[Run]:
    """Runs of [start, end) with non-present leaves included, accessed/dirty ignored."""
    w = Walker(fmt, mem, root, ignore_ad=True, include_nonpresent=True)
    runs = list(w.run_table(start, end))
    if w.anomalies:
        a = w.anomalies[0]
        raise ValueError(f"walk of {root:#x} has {w.anomaly_count} anomalies, first "
                         f"{a.va:#x} L{a.level} {a.raw:#x}: {a.reason}")
    return runs


# --- the comparison ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    """[va, end): what the model predicts vs what the real kernel has (None: nothing)."""

    va: int
    end: int
    model: tuple[Any, ...] | None
    real: tuple[Any, ...] | None

    @property
    def pages(self) -> int:
        return (self.end - self.va) // PAGE

    def __str__(self) -> str:
        def show(k: tuple[Any, ...] | None) -> str:
            if k is None:
                return "unmapped"
            pa, size, attrs = k
            return f"PA {pa:#x} {size // 1024}K {attrs}"
        return f"{self.va:#x}-{self.end:#x} ({self.pages} pages): model {show(self.model)}, " \
               f"real {show(self.real)}"


@dataclass
class Comparison:
    """``agree`` pages agree, ``differ`` pages differ (each listed in ``differences``);
    ``entries``/``entry_differences``: the raw-entry comparison."""

    scenario: str
    agree: int = 0
    differ: int = 0
    differences: list[Difference] = field(default_factory=list)
    entries: int = 0
    entry_differences: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return self.agree + self.differ

    @property
    def equal(self) -> bool:
        return not self.differ and not self.entry_differences

    def summary(self) -> str:
        lines = [f"{self.scenario}: {self.agree} pages agree, {self.differ} differ; "
                 f"{self.entries} entries compared, {len(self.entry_differences)} differ"]
        lines += [f"  {d}" for d in self.differences[:MAX_LISTED]]
        lines += [f"  {d}" for d in self.entry_differences[:MAX_LISTED]]
        more = len(self.differences) + len(self.entry_differences) - 2 * MAX_LISTED
        if more > 0:
            lines.append(f"  ... and {more} more")
        return "\n".join(lines)


def mapped_pa(runs: Sequence[Run], va: int) -> int | None:
    """The PA ``va`` maps to in ``runs`` (present runs only), or None."""
    r = next((r for r in runs if r.va <= va < r.end and r.attrs.present), None)
    return None if r is None else r.pa + (va - r.va)


def compare_runs(scenario: str, model: Sequence[Run], real: Sequence[Run]) -> Comparison:
    """Page for page over every VA either run list covers: same PA, page size and attrs
    (the runs come from :func:`walk_runs`, sorted and disjoint: accessed/dirty already
    ignored). One sweep over both lists, cut wherever a run of either starts or ends."""
    out = Comparison(scenario)
    cuts = sorted({x for r in (*model, *real) for x in (r.va, r.end)})
    clean: dict[int, tuple[Any, Any]] = {}  # id(attrs) -> (attrs, without accessed/dirty)

    def key(r: Run | None, va: int) -> tuple[Any, ...] | None:
        if r is None:
            return None
        hit = clean.get(id(r.attrs))
        if hit is None:  # the walk shares Attrs objects; the entry keeps its object alive
            hit = clean[id(r.attrs)] = (r.attrs, r.attrs.with_(accessed=False, dirty=False))
        return r.pa + (va - r.va), r.page_size, hit[1]

    i = j = 0
    nm, nr = len(model), len(real)
    for a, b in zip(cuts, cuts[1:], strict=False):
        while i < nm and model[i].end <= a:
            i += 1
        while j < nr and real[j].end <= a:
            j += 1
        m = model[i] if i < nm and model[i].va <= a else None
        r = real[j] if j < nr and real[j].va <= a else None
        if m is None and r is None:
            continue
        km, kr = key(m, a), key(r, a)
        if km == kr:
            out.agree += (b - a) // PAGE
            continue
        out.differ += (b - a) // PAGE
        last = out.differences[-1] if out.differences else None
        if last is not None and last.end == a and last.model is not None and km is not None \
                and last.real is not None and kr is not None \
                and (last.model[1:], last.real[1:]) == (km[1:], kr[1:]):
            out.differences[-1] = Difference(last.va, b, last.model, last.real)
        else:
            out.differences.append(Difference(a, b, km, kr))
    return out


def _leaf_table(fmt: Format, mem: PhysMemory, root: int, va: int) -> tuple[int, int, int]:
    """(level, PA of the table holding the entry that ends the walk of ``va``, raw)."""
    t = translate(fmt, mem, root, va)
    if not t.steps:
        raise ValueError(f"no walk for {va:#x}")
    s = t.steps[-1]
    return s.level, s.entry_pa - s.entry_pa % FRAME, s.raw


def _entry_keys(fmt: Format, raws: np.ndarray, level: int) -> np.ndarray:
    """Leaves and invalid entries as their raw bits, table entries as their attribute bits
    (their PA is the owner's allocation); accessed/dirty cleared."""
    raws = np.asarray(raws, dtype=np.uint64)
    table = fmt.kinds(raws, level) == int(Kind.TABLE)
    keys = np.where(table, fmt.attr_keys(raws, level), raws) if level else raws
    return keys & np.uint64(~fmt.ad_mask() & ((1 << 64) - 1))


def compare_entries(out: Comparison, fmt: Format, model: PhysMemory, model_root: int,
                    real: PhysMemory, real_root: int, vas: Iterable[int]) -> Comparison:
    """For each VA: the table holding its last entry, model vs real, entry for entry (each
    table once)."""
    seen: set[tuple[int, int]] = set()
    for va in vas:
        ml, mt, mraw = _leaf_table(fmt, model, model_root, va)
        rl, rt, rraw = _leaf_table(fmt, real, real_root, va)
        if ml != rl:
            out.entries += 1
            out.entry_differences.append(
                f"{va:#x}: model ends at level {ml} ({mraw:#018x}), real at {rl} ({rraw:#018x})")
            continue
        if (mt, rt) in seen:
            continue
        seen.add((mt, rt))
        n = fmt.entries(ml)
        mk = _entry_keys(fmt, model.read_table(mt, n), ml)
        rk = _entry_keys(fmt, real.read_table(rt, n), rl)
        out.entries += n
        span = fmt.entry_size(ml)
        base = va - va % (span * n)
        mraws, rraws = model.read_table(mt, n), real.read_table(rt, n)
        for i in np.flatnonzero(mk != rk).tolist():
            out.entry_differences.append(
                f"L{ml} entry {base + i * span:#x}: model {int(mraws[i]):#018x}, "
                f"real {int(rraws[i]):#018x}")
    return out


# --- what a later set_memory_* explains ---------------------------------------------------------
# What the kernel changes in the direct map after building it, through set_memory_* / CPA on
# an alias (x86 cpa_process_alias, arm64 rodata_full's linear alias in change_memory_common):
# permissions and global only, at the same PA, possibly splitting a large page.
LATER_CPA_FIELDS = frozenset({"writable", "exec", "uexec", "global_", "dbm"})


def later_cpa_change(d: Difference) -> bool:
    """Whether ``d`` is what a later set_memory_* on an alias makes of a boot mapping: same
    PA, real page size <= the boot one, attributes differing only in LATER_CPA_FIELDS."""
    if d.model is None or d.real is None:
        return False
    (mpa, msize, ma), (rpa, rsize, ra) = d.model, d.real
    changed = {f for f in ma.__dataclass_fields__ if getattr(ma, f) != getattr(ra, f)}
    return mpa == rpa and rsize <= msize and changed <= LATER_CPA_FIELDS
