"""Translation of one VA with the entry read at every level (:func:`translate`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..formats.base import Attrs, Entry, Format, Kind, combine
from ..memory.base import MemoryError_, PhysMemory
from .cursor import Cursor, geometry, seek

__all__ = ["Step", "Trace", "level_name", "translate"]

U64 = (1 << 64) - 1


def level_name(fmt: Format, level: int) -> str:
    """The kernel's name of ``level`` in ``fmt`` (pte, pmd, pud, p4d, pgd; the names come
    from :mod:`ptlab.arch` through :meth:`Format.level_name`)."""
    return fmt.level_name(level)


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
    "table unreadable at pte (...)" when a read fails, e.g. a page not in a kdump,
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
    """Walk ``va`` from the root table at ``root`` on the cursor (:func:`.cursor.seek`),
    recording the entry read at every level.

    A VA the root does not translate faults "non-canonical" when the format translates
    both halves of the VA space (sign-extended VAs: a VA between them is non-canonical),
    else "outside this root's VA range" (one half: arm64 TTBR0 / TTBR1 roots)."""
    va = check_int("va", va, 0, U64)
    root = check_int("root", root, 0, U64)
    trace = Trace(va=va, steps=[])
    if not fmt.covers(va):
        both = fmt.va_halves == "both"
        trace.fault = "non-canonical" if both else "outside this root's VA range"
        return trace
    geo = geometry(fmt)
    if not mem.contains(root, geo.entries[geo.top] * 8):
        trace.fault = f"table outside memory at {level_name(fmt, geo.top)}"
        return trace
    path: list[Attrs] = []
    seen = {root}

    def visit(c: Cursor, entry: Entry) -> int | None:
        """Record ``c``'s entry; the next table's PA, or None with the outcome in ``trace``."""
        level, name = c.level, level_name(fmt, c.level)
        raw = c.raw()
        trace.steps.append(Step(level, c.table, c.index, c.entry_pa(), raw, entry))
        trace.notes.extend(f"{name}: {r}" for r in fmt.anomalies(raw, level))
        if entry.kind is Kind.EMPTY:
            trace.fault = f"not present at {name}"
        elif entry.kind is Kind.LEAF:
            trace.pa = entry.oa + (c.start - c.va())
            trace.page_size, trace.level = c.entry_size, level
            trace.attrs = combine(path, entry.attrs)
            if not entry.attrs.present:
                trace.fault = "not present"
        elif level == 0:
            trace.fault = f"table entry at {name}"
        elif not entry.attrs.present:
            trace.fault = f"not present at {name}"
        elif entry.oa in seen:
            trace.fault = f"cycle at {name}"
        elif not mem.contains(entry.oa, geo.entries[level - 1] * 8):
            trace.fault = f"table outside memory at {level_name(fmt, level - 1)}"
        else:
            path.append(entry.attrs)
            seen.add(entry.oa)
            return entry.oa
        return None

    try:
        c = seek(geo, mem, root, va & geo.mask, 0, visit)
        if c is not None:
            visit(c, c.entry())
    except MemoryError_ as exc:
        name = level_name(fmt, geo.top - len(trace.steps))
        trace.fault = f"table unreadable at {name} ({exc})"
    return trace
