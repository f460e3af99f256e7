"""Translation of one VA with the entry read at every level (:func:`translate`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..formats.base import Attrs, Entry, Format, Kind, combine
from ..memory.base import MemoryError_, PhysMemory

__all__ = ["Step", "Trace", "level_name", "translate"]

U64 = (1 << 64) - 1
_GENERIC_NAMES = {
    1: ("pgd",),
    2: ("pte", "pgd"),
    3: ("pte", "pmd", "pgd"),
    4: ("pte", "pmd", "pud", "pgd"),
    5: ("pte", "pmd", "pud", "p4d", "pgd"),
}


def level_name(fmt: Format, level: int) -> str:
    """The kernel's name of ``level`` in ``fmt`` (pte, pmd, pud, p4d, pgd)."""
    named = getattr(fmt, "level_name", None)
    if named is not None:
        return named(level)
    names = _GENERIC_NAMES.get(fmt.levels)
    return names[level] if names and 0 <= level < len(names) else f"level{level}"


@dataclass(frozen=True, slots=True)
class Step:
    """One level of a translation: the entry read at ``entry_pa`` of the table at ``table_pa``."""

    level: int
    table_pa: int
    index: int
    entry_pa: int
    raw: int
    entry: Entry


@dataclass(slots=True)
class Trace:
    """Result of :func:`translate`.

    ``fault`` is None when ``va`` is mapped by a present leaf; otherwise it says why not
    ("not present at pmd", "non-canonical", "cycle at pud", "table outside memory at pmd",
    "not present" for a non-present leaf, whose ``pa``/``attrs`` are still filled in).
    ``notes`` holds the format's anomaly reasons for entries on the path.
    """

    va: int
    steps: list[Step]
    pa: int | None = None
    page_size: int | None = None
    level: int | None = None
    attrs: Attrs | None = None  # effective: combine() of the table path and the leaf
    fault: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mapped(self) -> bool:
        return self.fault is None


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} {value:#x} is outside {lo:#x}..{hi:#x}")
    return value


def low_va(fmt: Format, va: int) -> int:
    return va & (fmt.va_span - 1)


def translate(fmt: Format, mem: PhysMemory, root: int, va: int) -> Trace:
    """Walk ``va`` from the root table at ``root``, recording the entry read at every level."""
    va = check_int("va", va, 0, U64)
    root = check_int("root", root, 0, U64)
    trace = Trace(va=va, steps=[])
    if not fmt.covers(va):
        trace.fault = "non-canonical" if fmt.arch == "x86_64" else "outside this root's VA range"
        return trace
    low = low_va(fmt, va)
    table_pa, path, seen = root, [], {root}
    for level in range(fmt.top_level, -1, -1):
        name = level_name(fmt, level)
        n = fmt.entries(level)
        index = fmt.index(low, level)
        entry_pa = table_pa + index * 8
        if not mem.contains(table_pa, n * 8):
            trace.fault = f"table outside memory at {name}"
            return trace
        try:
            raw = mem.read_u64(entry_pa)
        except MemoryError_ as exc:
            trace.fault = f"table outside memory at {name} ({exc})"
            return trace
        entry = fmt.decode(raw, level)
        trace.steps.append(Step(level, table_pa, index, entry_pa, raw, entry))
        trace.notes.extend(f"{name}: {r}" for r in fmt.anomalies(raw, level))
        if entry.kind is Kind.EMPTY:
            trace.fault = f"not present at {name}"
            return trace
        if entry.kind is Kind.TABLE:
            if level == 0:
                trace.fault = f"table entry at {name}"
                return trace
            if not entry.attrs.present:
                trace.fault = f"not present at {name}"
                return trace
            if entry.oa in seen:
                trace.fault = f"cycle at {name}"
                return trace
            if not mem.contains(entry.oa, fmt.entries(level - 1) * 8):
                trace.fault = f"table outside memory at {level_name(fmt, level - 1)}"
                return trace
            path.append(entry.attrs)
            seen.add(entry.oa)
            table_pa = entry.oa
            continue
        size = fmt.entry_size(level)
        trace.pa = entry.oa + (low & (size - 1))
        trace.page_size, trace.level = size, level
        trace.attrs = combine(path, entry.attrs)
        if not entry.attrs.present:
            trace.fault = "not present"
        return trace
    trace.fault = "no leaf below the last level"  # unreachable for well-formed formats
    return trace
