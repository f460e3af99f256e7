"""The format layer: geometry and entry codec shared by every page-table format.

A format answers two questions and nothing else: how a VA splits into per-level indices
(geometry), and what a raw u64 entry means (codec). Levels are numbered as in Linux's
generic_pt: level 0 is the leaf-most table (pte), ``levels - 1`` the root (pgd).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Literal

import numpy as np

_U64 = (1 << 64) - 1

class Kind(enum.IntEnum):
    """What an entry is: nothing, a pointer to a lower table, or a translation (leaf)."""

    EMPTY = 0
    TABLE = 1
    LEAF = 2


@dataclass(frozen=True, slots=True)
class Attrs:
    """Format-neutral entry attributes.

    For a leaf these are the mapping's own bits. For a table entry they are the restrictions
    it applies to everything below it (x86 RW/US/NX of upper levels; arm64 APTable, PXNTable,
    UXNTable, NSTable): ``writable``/``user``/``exec``/``uexec`` False there means "denied
    below", so effective permissions are the AND along the path (see :func:`combine`).
    A format stores only the fields it has; :meth:`Format.normalize` maps any Attrs onto
    the subset the format can encode.
    """

    present: bool = True  # x86 P / arm64 valid bit
    writable: bool = False  # x86 RW / arm64 !AP[2] (leaf) or !APTable[1] (table)
    user: bool = False  # x86 US / arm64 AP[1] (leaf) or !APTable[0] (table)
    exec: bool = False  # privileged execute: x86 !NX / arm64 !PXN (!PXNTable)
    uexec: bool = False  # user execute: x86 !NX (same bit) / arm64 !UXN (!UXNTable)
    global_: bool = False  # x86 G / arm64 !nG
    accessed: bool = False  # x86 A / arm64 AF
    dirty: bool = False  # x86 D / arm64 software PTE_DIRTY
    cache: int = 0  # x86 PAT index (PAT<<2 | PCD<<1 | PWT) / arm64 AttrIndx
    contiguous: bool = False  # arm64 contiguous hint
    sw: int = 0  # software-available bits, packed LSB first (format-specific width)
    pkey: int = 0  # x86 protection key (bits 62:59)
    ns: bool = False  # arm64 NS / NSTable
    shareability: int = 0  # arm64 SH[1:0]
    dbm: bool = False  # arm64 DBM (hardware dirty-bit management)

    def with_(self, **changes: object) -> Attrs:
        """A copy with ``changes`` applied (dataclasses.replace)."""
        return replace(self, **changes)


ATTR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Attrs))
PERM_FIELDS: tuple[str, ...] = ("writable", "user", "exec", "uexec")


def combine(table_path: list[Attrs] | tuple[Attrs, ...], leaf: Attrs) -> Attrs:
    """Effective attributes of ``leaf`` reached through table entries ``table_path``.

    Permissions are ANDed along the path (x86 RW/US/NX, arm64 hierarchical table attributes);
    everything else is the leaf's own.
    """
    changes = {}
    for name in PERM_FIELDS:
        value = getattr(leaf, name)
        if value:
            for t in table_path:
                if not getattr(t, name):
                    value = False
                    break
            changes[name] = value
    return replace(leaf, **changes) if changes else leaf


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded entry. ``oa`` is the output address: next table PA (TABLE) or page PA (LEAF)."""

    kind: Kind
    oa: int = 0
    attrs: Attrs = Attrs()


EMPTY = Entry(Kind.EMPTY)


class FormatError(ValueError):
    """An entry or address the format cannot represent."""


class Format(ABC):
    """Geometry + codec of one page-table format configuration.

    Subclasses fill the geometry attributes in ``__init__`` and implement the codec.
    The vectorised methods (``kinds``, ``oas``, ``attr_keys``) operate on a whole table read
    as a numpy uint64 array and are what makes walking fast.
    """

    name: str  # e.g. "x86_64-4level", "arm64-4k-48"
    arch: str  # "x86_64" | "arm64"
    page_shift: int  # granule shift (12, 14, 16)
    bits_per_level: int  # index bits of a full table (9, 11, 13)
    levels: int  # number of levels
    va_bits: int  # translated VA bits
    pa_bits: int  # maximum output address bits
    upper: bool  # arm64: this root translates the upper (TTBR1) half; x86: False
    # Which VAs one root translates: "both" halves, sign-extended from bit va_bits - 1 (x86
    # canonical addresses); only the "upper" (arm64 TTBR1) or only the "lower" half (TTBR0).
    va_halves: Literal["both", "upper", "lower"]

    # --- geometry -------------------------------------------------------------------------
    @property
    def top_level(self) -> int:
        return self.levels - 1

    @property
    def table_bytes(self) -> int:
        """Size of one table page (the granule)."""
        return 1 << self.page_shift

    def shift(self, level: int) -> int:
        """VA shift of the index at ``level`` (== log2 of the size one entry there maps)."""
        return self.page_shift + level * self.bits_per_level

    def index_bits(self, level: int) -> int:
        if level < self.top_level:
            return self.bits_per_level
        return self.va_bits - self.shift(level)

    def entries(self, level: int) -> int:
        """Number of entries of a table at ``level`` (the root may be smaller)."""
        return 1 << self.index_bits(level)

    def entry_size(self, level: int) -> int:
        """Bytes of VA one entry at ``level`` covers (its leaf page size if it may be a leaf)."""
        return 1 << self.shift(level)

    def index(self, va: int, level: int) -> int:
        return (va >> self.shift(level)) & (self.entries(level) - 1)

    @property
    @abstractmethod
    def leaf_levels(self) -> frozenset[int]:
        """Levels at which a leaf (page/block) may appear."""

    def page_sizes(self) -> dict[int, int]:
        """Leaf level -> page size in bytes."""
        return {lvl: self.entry_size(lvl) for lvl in sorted(self.leaf_levels)}

    def contig_count(self, level: int) -> int:
        """Entries grouped by the contiguous hint at ``level`` (1 when the format has none)."""
        return 1

    @property
    def va_span(self) -> int:
        return 1 << self.va_bits

    def va_ranges(self) -> list[tuple[int, int]]:
        """Canonical VA ranges this root translates, as [start, end) pairs."""
        top, span = 1 << 64, self.va_span
        if self.va_halves == "both":
            return [(0, span >> 1), (top - (span >> 1), top)]
        if self.va_halves == "upper":
            return [(top - span, top)]
        return [(0, span)]

    def covers(self, va: int) -> bool:
        return any(s <= va < e for s, e in self.va_ranges())

    def canonical(self, va_low: int) -> int:
        """Full VA for an index-composed address ``va_low`` < 2**va_bits."""
        high = (1 << 64) - self.va_span
        if self.va_halves == "both":
            return va_low | high if va_low >> (self.va_bits - 1) & 1 else va_low
        if self.va_halves == "upper":
            return va_low | high
        return va_low

    # --- codec ----------------------------------------------------------------------------
    @abstractmethod
    def decode(self, raw: int, level: int) -> Entry:
        """raw u64 -> Entry. Never raises on garbage: reserved bits are kept recoverable
        (see :meth:`anomalies`)."""

    def encode(self, entry: Entry, level: int) -> int:
        """Entry -> raw u64. Raises FormatError if the entry cannot be represented there
        (e.g. a leaf at a level without leaves, an OA not aligned to the page size, or a
        non-empty entry whose bits would all be 0 and so read back as empty)."""
        self._check_level(level)
        if entry.kind is Kind.EMPTY:
            return 0
        raw = self._encode(entry, level)
        if raw == 0:
            raise FormatError(
                f"{self.name}: {entry!r} encodes to 0, which reads back as an empty entry"
            )
        return raw

    @abstractmethod
    def _encode(self, entry: Entry, level: int) -> int:
        """:meth:`encode` of a TABLE or LEAF entry at a checked ``level``."""

    @abstractmethod
    def normalize(self, attrs: Attrs, kind: Kind = Kind.LEAF) -> Attrs:
        """``attrs`` reduced to what this format stores for ``kind`` (fields it lacks reset
        to defaults, fields stored in one bit made equal, e.g. x86 uexec == exec)."""

    @abstractmethod
    def table_attrs(self) -> Attrs:
        """Attributes the kernel puts on a table entry it creates (no restrictions)."""

    def anomalies(self, raw: int, level: int) -> list[str]:
        """Reasons ``raw`` is malformed at ``level`` (reserved bits set, block where none is
        allowed, ...); empty when well formed (0 is)."""
        self._check_level(level)
        raw = self._check_raw(raw)
        return self._anomalies(raw, level, self.level_name(level)) if raw else []

    @abstractmethod
    def _anomalies(self, raw: int, level: int, name: str) -> list[str]:
        """:meth:`anomalies` of a checked non-zero ``raw``; ``name`` is the level's name."""

    def level_name(self, level: int) -> str:
        """The kernel's name of ``level`` (pte, pmd, pud, p4d, pgd; from :mod:`ptlab.arch`)."""
        self._check_level(level)
        return self.level_names[level]

    @cached_property
    def level_names(self) -> tuple[str, ...]:
        """The kernel's name of every level, leaf first."""
        from ..arch import arch_for

        return arch_for(self.arch).level_names(self.levels)

    def _check_level(self, level: int) -> None:
        if (isinstance(level, bool) or not isinstance(level, int | np.integer)
                or not 0 <= level < self.levels):
            raise FormatError(f"{self.name}: level must be 0..{self.levels - 1}, got {level!r}")

    def _check_raw(self, raw: int) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int | np.integer):
            raise FormatError(f"{self.name}: entry must be an integer, got {raw!r}")
        value = int(raw)
        if not 0 <= value <= _U64:
            raise FormatError(f"{self.name}: entry {raw!r} is not a u64")
        return value

    # --- vectorised helpers over one table (numpy uint64 array) ----------------------------
    def _table_array(self, raws: np.ndarray) -> np.ndarray:
        """``raws`` as a uint64 array (no copy for the usual uint64 table read)."""
        if isinstance(raws, np.ndarray):
            if raws.dtype == np.uint64:
                return raws
            if raws.dtype.kind == "u" or (raws.dtype.kind == "i" and not (raws < 0).any()):
                return raws.astype(np.uint64)
            raise FormatError(f"{self.name}: entries must be u64 values, got {raws.dtype}")
        try:
            values = [self._check_raw(r) for r in raws]
        except TypeError:
            raise FormatError(f"{self.name}: entries must be a sequence of u64 values") from None
        return np.array(values, dtype=np.uint64)

    @abstractmethod
    def kinds(self, raws: np.ndarray, level: int) -> np.ndarray:
        """Kind of each entry (uint8 array of Kind values)."""

    @abstractmethod
    def oas(self, raws: np.ndarray, level: int) -> np.ndarray:
        """Output address of each entry (uint64; meaningless for EMPTY)."""

    @abstractmethod
    def attr_keys(self, raws: np.ndarray, level: int) -> np.ndarray:
        """Each entry with its output-address bits cleared: equal keys <=> equal Attrs
        (after the accessed/dirty normalisation callers may apply with ``ad_mask``)."""

    def ad_mask(self) -> int:
        """Bits holding accessed/dirty state (for comparisons that ignore them)."""
        return 0

    # --- convenience ------------------------------------------------------------------------
    def leaf(self, oa: int, attrs: Attrs, level: int) -> int:
        return self.encode(Entry(Kind.LEAF, oa, attrs), level)

    def table(self, pa: int, level: int, attrs: Attrs | None = None) -> int:
        return self.encode(Entry(Kind.TABLE, pa, attrs or self.table_attrs()), level)

    def __repr__(self) -> str:
        return f"<Format {self.name}>"
