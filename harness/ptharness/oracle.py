"""QEMU-side oracles: what QEMU itself says about a guest's page tables.

Nothing here uses ptlab's walker: these are the independent witnesses the real-table tests
compare the walker against.

* ``info tlb`` (x86 HMP, target/i386/monitor.c ``hmp_info_tlb``): QEMU walks CR3's tree and
  prints one line per present leaf, ``print_pte``::

      ffff888000000000: 0000000000000000 XG-DA--UW
      <canonical VA, %016x>: <PA = entry & mask, %016x> <9 flags>

  flags, in order: X = NX, G = global, P = PSE (a 2M/1G leaf; cleared for 4K ptes, whose bit 7
  is PAT), D = dirty, A = accessed, C = PCD, T = PWT, U = user, W = writable. The flags are the
  leaf entry's own bits, not combined with the table entries above it. The PA mask drops the
  PAT bit of large leaves, the pkey and the software bits. A 4-level walk prints
  ``(l1 << 39) + ...``; under LA57 ``(l0 << 48) + ...``, sign-extended from bit 56.
* ``gva2gpa ADDR`` (monitor/hmp-cmds.c ``hmp_gva2gpa``): the current vCPU's own debug
  translation (``cpu_get_phys_page_attrs_debug``), printing ``gpa: %#x`` or ``Unmapped``. It
  uses the regime the vCPU is in when stopped: x86 the live CR3; arm64 the current EL's
  translation regime (at EL1: TTBR1_EL1 for upper-half VAs; at EL0 under KPTI TTBR1 holds the
  trampoline table).
* ``x /1gx ADDR``: a u64 read through QEMU's own translation (``memory_dump``).

Comparison with the walker (:func:`compare_leaves`): both sides are expanded to one record per
leaf page ``(va, pa, page_size, flags)``, the walker's effective attributes rendered in the same
9 flags (accessed/dirty blanked on both sides when normalising); then coalesced the same way
(:func:`coalesce`) into runs of VA- and PA-contiguous leaves of one page size and equal flags.
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ptlab.formats.base import Attrs

Hmp = Callable[[str], str]

TLB_FLAGS = "XGPDACTUW"
SZ_4K = 1 << 12
SZ_2M = 1 << 21
SZ_1G = 1 << 30
AMBIGUOUS = 0  # page_size of a large info-tlb leaf that may be 2M or 1G (see resolve_sizes)

_TLB_LINE = re.compile(r"([0-9a-f]{16}): ([0-9a-f]{16}) ([X-][G-][P-][D-][A-][C-][T-][U-][W-])")
_GPA = re.compile(r"gpa: (0x[0-9a-f]+|0)")
_XDUMP = re.compile(r"([0-9a-f]+): (0x[0-9a-f]+)")


class OracleError(RuntimeError):
    """QEMU's monitor answered something the oracle cannot interpret."""


@dataclass(frozen=True, slots=True)
class TlbLine:
    """One ``info tlb`` line as printed."""

    va: int
    pa: int
    flags: str  # 9 chars, TLB_FLAGS order, '-' where clear

    @property
    def large(self) -> bool:
        return self.flags[2] == "P"


@dataclass(frozen=True, slots=True)
class TlbLeaf:
    """A leaf page in the comparison form shared by QEMU's and the walker's side."""

    va: int
    pa: int
    page_size: int  # 4K, 2M, 1G; AMBIGUOUS for an info-tlb line that may be 2M or 1G
    flags: str


@dataclass(frozen=True, slots=True)
class LeafRun:
    """VA- and PA-contiguous leaves of one page size with equal flags."""

    va: int
    size: int
    pa: int
    page_size: int
    flags: str

    @property
    def end(self) -> int:
        return self.va + self.size

    @property
    def count(self) -> int:
        return self.size // self.page_size if self.page_size else 1


@dataclass(slots=True)
class LeafDiff:
    """Outcome of :func:`compare_leaves`."""

    only_walker: list[TlbLeaf] = field(default_factory=list)
    only_qemu: list[TlbLeaf] = field(default_factory=list)
    differ: list[tuple[TlbLeaf, TlbLeaf]] = field(default_factory=list)  # (walker, qemu)
    ambiguous: int = 0  # QEMU 2M-or-1G leaves matched against the walker's size
    compared: int = 0

    @property
    def equal(self) -> bool:
        return not (self.only_walker or self.only_qemu or self.differ)

    def summary(self, limit: int = 10) -> str:
        out = [
            f"{self.compared} leaves compared: {len(self.only_walker)} only in the walk, "
            f"{len(self.only_qemu)} only in info tlb, {len(self.differ)} differ"
        ]
        for w in self.only_walker[:limit]:
            out.append(f"  walk only : {fmt_leaf(w)}")
        for q in self.only_qemu[:limit]:
            out.append(f"  qemu only : {fmt_leaf(q)}")
        for w, q in self.differ[:limit]:
            out.append(f"  walk {fmt_leaf(w)}  !=  qemu {fmt_leaf(q)}")
        return "\n".join(out)


def fmt_leaf(leaf: TlbLeaf) -> str:
    size = {SZ_4K: "4K", SZ_2M: "2M", SZ_1G: "1G", AMBIGUOUS: "2M|1G"}.get(
        leaf.page_size, hex(leaf.page_size)
    )
    return f"{leaf.va:016x} -> {leaf.pa:016x} {size} {leaf.flags}"


# --- info tlb ----------------------------------------------------------------------------------
def parse_info_tlb(text: str) -> list[TlbLine]:
    """Parse x86 ``info tlb`` output. Raises OracleError on any line that is not a leaf line
    (``PG disabled``, ``No CPU available``, an error message, truncated output)."""
    lines: list[TlbLine] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _TLB_LINE.fullmatch(line)
        if m is None:
            raise OracleError(f"info tlb line {n} not understood: {line[:120]!r}")
        lines.append(TlbLine(int(m[1], 16), int(m[2], 16), m[3]))
    return lines


def resolve_sizes(lines: Sequence[TlbLine]) -> list[TlbLeaf]:
    """Page size of each line. 4K lines have no P flag. A P line is 2M unless its VA and PA
    are 1G-aligned and no other line falls inside the following 1G; such a line is printed
    identically for a 1G leaf and a lone 2M leaf, and gets page_size AMBIGUOUS."""
    order = sorted(range(len(lines)), key=lambda i: lines[i].va)
    out: list[TlbLeaf | None] = [None] * len(lines)
    for pos, i in enumerate(order):
        ln = lines[i]
        if not ln.large:
            size = SZ_4K
        elif ln.va % SZ_1G or ln.pa % SZ_1G:
            size = SZ_2M
        else:
            nxt = lines[order[pos + 1]].va if pos + 1 < len(order) else None
            size = SZ_2M if nxt is not None and nxt < ln.va + SZ_1G else AMBIGUOUS
        out[i] = TlbLeaf(ln.va, ln.pa, size, ln.flags)
    return [leaf for leaf in out if leaf is not None]


def covering(lines: Sequence[TlbLine], vas: Iterable[int]) -> dict[int, TlbLeaf]:
    """The leaf mapping each of ``vas`` (its 4K line, or the large line it falls in); a VA
    that no line maps, or that lies past the first 2M of an AMBIGUOUS line, is left out."""
    leaves = sorted(resolve_sizes(lines), key=lambda leaf: leaf.va)
    starts = [leaf.va for leaf in leaves]
    out: dict[int, TlbLeaf] = {}
    for va in vas:
        i = bisect.bisect_right(starts, va) - 1
        if i < 0:
            continue
        leaf = leaves[i]
        size = SZ_2M if leaf.page_size == AMBIGUOUS else leaf.page_size
        if va < leaf.va + size:
            out[va] = leaf
    return out


def info_tlb(hmp: Hmp) -> tuple[list[TlbLine], float]:
    """Run ``info tlb`` on the (stopped) guest; the parsed lines and the seconds it took."""
    t0 = time.perf_counter()
    text = hmp("info tlb")
    elapsed = time.perf_counter() - t0
    return parse_info_tlb(text), elapsed


def normalise_flags(flags: str, ignore_ad: bool = True) -> str:
    """``flags`` with D and A blanked when ``ignore_ad``."""
    if not ignore_ad:
        return flags
    return flags[:3] + "--" + flags[5:]


def attrs_flags(attrs: Attrs, page_size: int, ignore_ad: bool = True) -> str:
    """The 9 info-tlb flags a leaf with ``attrs`` would print (x86 semantics)."""
    bits = (
        not attrs.exec,
        attrs.global_,
        page_size > SZ_4K,
        attrs.dirty and not ignore_ad,
        attrs.accessed and not ignore_ad,
        bool(attrs.cache & 2),
        bool(attrs.cache & 1),
        attrs.user,
        attrs.writable,
    )
    return "".join(c if b else "-" for c, b in zip(TLB_FLAGS, bits, strict=True))


def in_range(va: int, start: int | None, end: int | None) -> bool:
    return (start is None or va >= start) and (end is None or va < end)


def qemu_leaves(
    lines: Sequence[TlbLine],
    start: int | None = None,
    end: int | None = None,
    ignore_ad: bool = True,
) -> list[TlbLeaf]:
    """QEMU's leaves with VA in [start, end), flags normalised, sorted by VA."""
    leaves = [
        TlbLeaf(lf.va, lf.pa, lf.page_size, normalise_flags(lf.flags, ignore_ad))
        for lf in resolve_sizes(lines)
        if in_range(lf.va, start, end)
    ]
    leaves.sort(key=lambda lf: lf.va)
    return leaves


def walker_leaves(
    runs: Iterable[Any],
    start: int | None = None,
    end: int | None = None,
    ignore_ad: bool = True,
    pa_mask: int = 0x3FFFFFFFFF000,
) -> list[TlbLeaf]:
    """Expand walker runs (ptlab.walk.Run: va, pa, page_size, count, attrs) to leaves in the
    comparison form. ``pa_mask`` is QEMU's (bits 12..49)."""
    leaves = []
    for r in runs:
        ps = r.page_size
        flags = attrs_flags(r.attrs, ps, ignore_ad)
        for i in range(r.count):
            va = r.va + i * ps
            if in_range(va, start, end):
                leaves.append(TlbLeaf(va, (r.pa + i * ps) & pa_mask, ps, flags))
    leaves.sort(key=lambda lf: lf.va)
    return leaves


def compare_leaves(walk: Sequence[TlbLeaf], qemu: Sequence[TlbLeaf]) -> LeafDiff:
    """Leaf-by-leaf comparison keyed by VA. A QEMU AMBIGUOUS leaf matches a walker leaf of
    2M or 1G at the same VA."""
    diff = LeafDiff()
    q_by_va = {q.va: q for q in qemu}
    if len(q_by_va) != len(qemu):
        raise OracleError("info tlb printed the same VA twice")
    seen = set()
    for w in walk:
        diff.compared += 1
        q = q_by_va.get(w.va)
        if q is None:
            diff.only_walker.append(w)
            continue
        seen.add(w.va)
        q_size = q.page_size
        if q_size == AMBIGUOUS and w.page_size in (SZ_2M, SZ_1G):
            diff.ambiguous += 1
            q_size = w.page_size
        if (w.pa, w.page_size, w.flags) != (q.pa, q_size, q.flags):
            diff.differ.append((w, q))
    diff.only_qemu = [q for q in qemu if q.va not in seen]
    return diff


def coalesce(leaves: Iterable[TlbLeaf]) -> list[LeafRun]:
    """Merge VA-sorted leaves into runs: VA and PA contiguous, same page size and flags."""
    runs: list[LeafRun] = []
    cur: LeafRun | None = None
    for lf in leaves:
        ps = lf.page_size
        if (
            cur is not None
            and ps != AMBIGUOUS
            and ps == cur.page_size
            and lf.flags == cur.flags
            and lf.va == cur.end
            and lf.pa == cur.pa + cur.size
        ):
            cur = LeafRun(cur.va, cur.size + ps, cur.pa, ps, cur.flags)
        else:
            if cur is not None:
                runs.append(cur)
            cur = LeafRun(lf.va, ps or SZ_2M, lf.pa, ps, lf.flags)
    if cur is not None:
        runs.append(cur)
    return runs


def tlb_wx(lines: Iterable[TlbLine], start: int | None = None,
           end: int | None = None) -> list[TlbLine]:
    """QEMU's own W+X audit: the ``info tlb`` leaves in [start, end) printed writable (W) and
    executable (no X = NX). The flags are the leaf's own bits; in the kernel half the table
    entries above restrict nothing (they are _KERNPG_TABLE: RW, no NX)."""
    return [ln for ln in lines
            if in_range(ln.va, start, end) and ln.flags[8] == "W" and ln.flags[0] != "X"]


def tlb_attrs(flags: str) -> Attrs:
    """The ptlab Attrs an info-tlb flag string stands for (fields QEMU does not print stay
    at their defaults)."""
    if len(flags) != 9:
        raise OracleError(f"bad info tlb flags {flags!r}")
    f = {c: flags[i] == c for i, c in enumerate(TLB_FLAGS)}
    return Attrs(
        present=True,
        writable=f["W"],
        user=f["U"],
        exec=not f["X"],
        uexec=not f["X"],
        global_=f["G"],
        accessed=f["A"],
        dirty=f["D"],
        cache=(f["C"] << 1) | f["T"],
    )


def tlb_runs(
    lines: Sequence[TlbLine],
    start: int | None = None,
    end: int | None = None,
    ignore_ad: bool = True,
) -> list[Any]:
    """``info tlb`` as a ptlab run list (ptlab.walk.Run, level from page size; an AMBIGUOUS
    large leaf is taken as 2M)."""
    from ptlab.walk import Run

    level = {SZ_4K: 0, SZ_2M: 1, SZ_1G: 2}
    out: list[Any] = []
    for r in coalesce(qemu_leaves(lines, start, end, ignore_ad)):
        ps = r.page_size or SZ_2M
        out.append(Run(r.va, r.size, r.pa, ps, level[ps], tlb_attrs(r.flags), r.size // ps))
    return out


# --- gva2gpa -----------------------------------------------------------------------------------
def parse_gva2gpa(text: str) -> int | None:
    """``gpa: 0x...`` -> the PA; ``Unmapped`` -> None; anything else -> OracleError."""
    s = text.strip()
    if s == "Unmapped":
        return None
    m = _GPA.fullmatch(s)
    if m is None:
        raise OracleError(f"gva2gpa answered {s[:120]!r}")
    return int(m[1], 16) if m[1] != "0" else 0


def gva2gpa(hmp: Hmp, va: int) -> int | None:
    """QEMU's translation of ``va`` by the current vCPU regime (None if unmapped)."""
    return parse_gva2gpa(hmp(f"gva2gpa {va:#x}"))


@dataclass(slots=True)
class Gva2gpaBatch:
    """Results of :func:`gva2gpa_many` with its timing."""

    vas: list[int]
    gpas: list[int | None]
    seconds: float

    @property
    def per_call_us(self) -> float:
        return 1e6 * self.seconds / max(1, len(self.vas))


def gva2gpa_many(hmp: Hmp | Any, vas: Sequence[int]) -> Gva2gpaBatch:
    """gva2gpa for every VA. ``hmp`` is an HMP callable, or an object with ``hmp_many``
    (pipelined commands, one reply string per command) which is used when present, also when
    ``hmp`` is a bound method of such an object (``guest.hmp``)."""
    cmds = [f"gva2gpa {va:#x}" for va in vas]
    t0 = time.perf_counter()
    many = getattr(hmp, "hmp_many", None) or getattr(getattr(hmp, "__self__", None),
                                                     "hmp_many", None)
    if many is not None:
        replies = list(many(cmds))
    else:
        call = hmp if callable(hmp) else hmp.hmp
        replies = [call(c) for c in cmds]
    elapsed = time.perf_counter() - t0
    if len(replies) != len(cmds):
        raise OracleError(f"{len(cmds)} gva2gpa commands, {len(replies)} replies")
    return Gva2gpaBatch(list(vas), [parse_gva2gpa(r) for r in replies], elapsed)


@dataclass(frozen=True, slots=True)
class Disagreement:
    va: int
    walker: int | None
    qemu: int | None

    def __str__(self) -> str:
        w = "unmapped" if self.walker is None else hex(self.walker)
        q = "Unmapped" if self.qemu is None else hex(self.qemu)
        return f"va {self.va:#018x}: walker {w}, gva2gpa {q}"


def disagreements(
    expected: Sequence[int | None], batch: Gva2gpaBatch
) -> list[Disagreement]:
    """Where the walker's PA (None = unmapped) differs from gva2gpa's."""
    return [
        Disagreement(va, e, q)
        for va, e, q in zip(batch.vas, expected, batch.gpas, strict=True)
        if e != q
    ]


# --- reads through QEMU's translation ------------------------------------------------------------
def read_virt_u64(hmp: Hmp, va: int) -> int:
    """The u64 at kernel VA ``va``, read by QEMU through the current vCPU's translation."""
    text = hmp(f"x /1gx {va:#x}")
    m = _XDUMP.search(text)
    if m is None or int(m[1], 16) != va:
        raise OracleError(f"x /1gx {va:#x} answered {text.strip()[:120]!r}")
    return int(m[2], 16)


def read_phys_u64s(hmp: Hmp, pa: int, count: int) -> list[int]:
    """``count`` u64 at guest-physical ``pa`` read by QEMU (``xp /Ngx``)."""
    text = hmp(f"xp /{count}gx {pa:#x}")
    values: list[int] = []
    for line in text.splitlines():
        if ":" not in line:
            continue
        _, rest = line.split(":", 1)
        values.extend(int(tok, 16) for tok in rest.split())
    if len(values) != count:
        raise OracleError(f"xp /{count}gx {pa:#x}: got {len(values)} values")
    return values


