"""arm64 stage-1 (EL1&0) translation-table format: 4K, 16K and 64K granules.

Bits follow arch/arm64/include/asm/pgtable-hwdef.h (``PTE_*``, ``PMD_*``, ``PXD_TABLE_*``),
pgtable-prot.h (software bits) and pgtable.h (``__pte_to_phys`` / ``__phys_to_pte_val``).
Levels use generic_pt numbering: level 0 is the pte table (Arm level 3), ``levels - 1`` the
pgd; :meth:`Arm64.arm_level` gives the Arm ARM's number (-1 for the 5-level LPA2 root).

Configurations (granule, VA bits): 4K 39/48/52 (52 = LPA2, 5 levels, 16-entry root),
16K 36/47/48/52 (48: 2-entry root; 52 = LPA2), 64K 42/48/52 (52 = LVA + LPA, 1024-entry root).
Output addresses are 48 bits, 52 in the 52-bit configurations:

* 64K with LPA: PA[51:48] live in descriptor bits 15:12 (``PTE_ADDR_HIGH``, shift 36).
* LPA2 (4K/16K): OA bits 49:page_shift are in place and PA[51:50] live in bits 9:8, which then
  no longer hold SH (shareability comes from TCR_ELx.SH), so ``shareability`` is always 0.

Layout decisions (the ``Attrs`` an entry decodes to):

* Leaf (page or block, bit 0 set): ``cache`` = AttrIndx[2:0] (bits 4:2), ``ns`` bit 5,
  ``user`` = AP[1] (bit 6), ``writable`` = !AP[2] (bit 7, ``PTE_RDONLY``), ``shareability`` =
  SH (bits 9:8, not with LPA2), ``accessed`` = AF (bit 10), ``global_`` = !nG (bit 11),
  ``dbm`` = DBM (bit 51, Linux's ``PTE_WRITE``), ``contiguous`` bit 52, ``exec`` = !PXN (53),
  ``uexec`` = !UXN (54), ``dirty`` = bit 55 (Linux's software ``PTE_DIRTY``; the hardware-dirty
  state of a DBM page is AP[2] clear, which stays a permission and is not folded in).
* Leaf ``sw`` packs, LSB first, :data:`LEAF_SW_BITS` = bits 56, 57, 58 (``PTE_SPECIAL``,
  ``PTE_DEVMAP``, ``PTE_PROT_NONE`` in 6.1), 50 (GP, the BTI guarded-page bit, which ``Attrs``
  has no field for), 59..62 (PBHA; 6.1's ``PMD_PRESENT_INVALID`` is bit 59) and 63 (software).
* Invalid entries (bit 0 clear, non-zero) decode, at every level, as ``Kind.LEAF`` with
  ``present=False`` and every other bit kept: the output address is read with the granule's
  mask (as ``__pte_to_phys`` does), the attribute bits as for a leaf, and ``sw`` gains
  sw[9] = bit 1 XOR (level == 0) (bit 1 differing from what a page/block would hold),
  sw[10] = bit 0 (see reserved descriptors below) and sw[11..] = the bits a valid page keeps
  RES0 (16K: 13:12, 64K without LPA: 15:12, and 49:48 without LPA2), in ascending order. This
  is how PROT_NONE ptes, invalidated direct-map entries (``set_direct_map_invalid_noflush``)
  and swap entries survive a decode/encode.
* A valid descriptor the CPU treats as reserved (bit 1 clear at level 0, or a block at a level
  without blocks) faults like an invalid one: it decodes as a non-present leaf with sw[10]
  set (so it still round-trips) and :meth:`Arm64.anomalies` reports it. sw[10] is refused by
  encode unless bit 1 makes the descriptor reserved at that level.
* Table entry: ``ns`` = NSTable (63), ``writable`` = !APTable[1] (62), ``user`` = !APTable[0]
  (61), ``uexec`` = !UXNTable (60), ``exec`` = !PXNTable (59); all zero means "no restriction"
  (:meth:`Arm64.table_attrs`). The bits the CPU ignores in a table entry (11:2, minus 9:8 with
  LPA2, and 58:51) are packed into ``sw`` LSB first (:meth:`Arm64.table_sw_bits`).
* RES0 bits of a valid descriptor (OA bits below a block's alignment, bits between 12 and the
  granule, 49:48 without LPA2, bit 50 of a table) are dropped by decode and reported.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .base import EMPTY, Attrs, Entry, Format, FormatError, Kind

# --- bits (arch/arm64/include/asm/pgtable-hwdef.h, pgtable-prot.h) -------------------------
VALID = 1 << 0  # PTE_VALID
TABLE_BIT = 1 << 1  # PTE_TABLE_BIT / PTE_TYPE_PAGE's bit 1
ATTRINDX_SHIFT = 2
ATTRINDX = 7 << ATTRINDX_SHIFT  # PTE_ATTRINDX_MASK
NS = 1 << 5  # PTE_NS
USER = 1 << 6  # PTE_USER (AP[1])
RDONLY = 1 << 7  # PTE_RDONLY (AP[2])
SH_SHIFT = 8
SH = 3 << SH_SHIFT  # PTE_SHARED
AF = 1 << 10  # PTE_AF
NG = 1 << 11  # PTE_NG
GP = 1 << 50  # PTE_GP (BTI)
DBM = 1 << 51  # PTE_DBM
CONT = 1 << 52  # PTE_CONT
PXN = 1 << 53  # PTE_PXN
UXN = 1 << 54  # PTE_UXN
DIRTY = 1 << 55  # PTE_DIRTY (software)
PXN_TABLE = 1 << 59  # PXD_TABLE_PXN
UXN_TABLE = 1 << 60  # PXD_TABLE_UXN
APTABLE_NO_EL0 = 1 << 61  # APTable[0]
APTABLE_RDONLY = 1 << 62  # APTable[1]
NS_TABLE = 1 << 63  # NSTable

LEAF_SW_BITS: tuple[int, ...] = (56, 57, 58, 50, 59, 60, 61, 62, 63)
LEAF_SW_WIDTH = len(LEAF_SW_BITS)
SW_BIT1_FLIP = LEAF_SW_WIDTH  # sw index of "bit 1 differs" in an invalid entry
SW_RESERVED = LEAF_SW_WIDTH + 1  # sw index of "bit 0 set in a reserved descriptor"
SW_SPARE = LEAF_SW_WIDTH + 2  # first sw index of the spare (RES0-when-valid) bits
U64 = (1 << 64) - 1

_GRANULES = {4096: (12, 9), 16384: (14, 11), 65536: (16, 13)}
_VA_BITS = {4096: (39, 48, 52), 16384: (36, 47, 48, 52), 65536: (42, 48, 52)}
# Generic_pt level -> Arm contiguous-hint group size (pgtable-hwdef.h CONT_PTES / CONT_PMDS).
_CONTIG = {4096: {0: 16, 1: 16}, 16384: {0: 128, 1: 32}, 65536: {0: 32, 1: 32}}
_NO_RESTRICTION = Attrs(present=True, writable=True, user=True, exec=True, uexec=True)


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(b for b in range(64) if mask >> b & 1)


def _pack(raw: int, bits: tuple[int, ...]) -> int:
    out = 0
    for i, bit in enumerate(bits):
        out |= ((raw >> bit) & 1) << i
    return out


def _unpack(value: int, bits: tuple[int, ...]) -> int:
    raw = 0
    for i, bit in enumerate(bits):
        raw |= ((value >> i) & 1) << bit
    return raw


def _span(lo: int, hi: int) -> int:
    """Mask of bits lo..hi-1."""
    return ((1 << hi) - 1) & ~((1 << lo) - 1) if hi > lo else 0


class Arm64(Format):
    """arm64 stage-1 translation regime of one TTBR (upper: TTBR1, else TTBR0)."""

    arch = "arm64"

    def __init__(self, granule: int = 4096, va_bits: int = 48, upper: bool = True) -> None:
        if isinstance(granule, bool) or granule not in tuple(_GRANULES):
            raise FormatError(f"arm64 granule must be 4096, 16384 or 65536, not {granule!r}")
        if va_bits not in _VA_BITS[granule]:
            allowed = ", ".join(map(str, _VA_BITS[granule]))
            raise FormatError(
                f"arm64 {granule >> 10}K granule supports VA bits {allowed}, not {va_bits!r}"
            )
        self.granule = granule
        self.page_shift, self.bits_per_level = _GRANULES[granule]
        self.va_bits = va_bits
        self.upper = bool(upper)
        self.va_halves = "upper" if self.upper else "lower"
        self.levels = math.ceil((va_bits - self.page_shift) / self.bits_per_level)
        self.pa_bits = 52 if va_bits == 52 else 48
        self.lpa2 = va_bits == 52 and granule != 65536  # FEAT_LPA2, TCR_ELx.DS = 1
        self.lpa = va_bits == 52 and granule == 65536  # FEAT_LPA (64K, 52-bit PA)
        suffix = "" if self.upper else "-ttbr0"
        self.name = f"arm64-{granule >> 10}k-{va_bits}{suffix}"

        leaves = {0, 1} if granule != 4096 else {0, 1, 2}
        if self.pa_bits == 52:
            leaves.add(max(leaves) + 1)  # 4K: 512G, 16K: 64G (LPA2); 64K: 4T (LPA)
        self._leaf_levels = frozenset(lvl for lvl in leaves if lvl < self.levels)

        # Output-address encoding: bits in place up to oa_top, plus an optional high field.
        oa_top = 50 if self.lpa2 else 48
        if self.lpa2:
            self._hi_field, self._hi_pa = SH, 50  # PA[51:50] in bits 9:8
        elif self.lpa:
            self._hi_field, self._hi_pa = 0xF << 12, 48  # PA[51:48] in bits 15:12
        else:
            self._hi_field, self._hi_pa = 0, 0
        self._hi_shift = self._hi_pa - _bits(self._hi_field)[0] if self._hi_field else 0
        self._page_oa = _span(self.page_shift, oa_top)
        self._leaf_oa = {lvl: _span(self.shift(lvl), oa_top) for lvl in range(self.levels)}
        oa_region = _span(12, 50)  # bits that are OA or RES0 in a valid descriptor
        self._leaf_res0 = {
            lvl: oa_region & ~self._leaf_oa[lvl] & ~self._hi_field for lvl in range(self.levels)
        }
        self._table_res0 = (oa_region | GP) & ~self._page_oa & ~self._hi_field
        self._spare_bits = _bits(self._leaf_res0[0])  # RES0 of a page: kept in sw if invalid
        self._invalid_sw_width = SW_SPARE + len(self._spare_bits)
        self._table_sw_bits = _bits((_span(2, 12) & ~self._hi_field) | _span(51, 59))

    # --- geometry -------------------------------------------------------------------------
    @property
    def leaf_levels(self) -> frozenset[int]:
        return self._leaf_levels

    def contig_count(self, level: int) -> int:
        self._check_level(level)
        return _CONTIG[self.granule].get(level, 1) if level in self._leaf_levels else 1

    def arm_level(self, level: int) -> int:
        """The Arm ARM's lookup level of ``level`` (3 for the pte table, -1 for an LPA2 root)."""
        self._check_level(level)
        return 3 - level

    def table_sw_bits(self) -> tuple[int, ...]:
        """Descriptor bits packed (LSB first) into ``sw`` of a table entry."""
        return self._table_sw_bits

    def sw_width(self, kind: Kind = Kind.LEAF, present: bool = True) -> int:
        """Width of ``Attrs.sw`` for an entry of ``kind`` (invalid leaves carry more)."""
        if kind is Kind.TABLE:
            return len(self._table_sw_bits)
        if kind is Kind.LEAF:
            return LEAF_SW_WIDTH if present else self._invalid_sw_width
        return 0

    # --- output address ------------------------------------------------------------------
    def _oa(self, raw: int, low_mask: int) -> int:
        oa = raw & low_mask
        if self._hi_field:
            oa |= (raw & self._hi_field) << self._hi_shift
        return oa

    def _oa_bits(self, oa: int) -> int:
        low = oa & ((1 << self._hi_pa) - 1) if self._hi_field else oa
        if self._hi_field:
            low |= (oa >> self._hi_shift) & self._hi_field
        return low

    def _reserved(self, raw: int, level: int) -> bool:
        """Valid descriptor the CPU treats as reserved (faults): see module docstring."""
        if level == 0:
            return not raw & TABLE_BIT
        return not raw & TABLE_BIT and level not in self._leaf_levels

    # --- codec ----------------------------------------------------------------------------
    def decode(self, raw: int, level: int) -> Entry:
        self._check_level(level)
        raw = self._check_raw(raw)
        if raw == 0:
            return EMPTY
        if not raw & VALID or self._reserved(raw, level):
            return self._decode_leaf(raw, level, present=False)
        if level > 0 and raw & TABLE_BIT:
            attrs = Attrs(
                present=True,
                writable=not raw & APTABLE_RDONLY,
                user=not raw & APTABLE_NO_EL0,
                exec=not raw & PXN_TABLE,
                uexec=not raw & UXN_TABLE,
                ns=bool(raw & NS_TABLE),
                sw=_pack(raw, self._table_sw_bits),
            )
            return Entry(Kind.TABLE, self._oa(raw, self._page_oa), attrs)
        return self._decode_leaf(raw, level, present=True)

    def _decode_leaf(self, raw: int, level: int, present: bool) -> Entry:
        sw = _pack(raw, LEAF_SW_BITS)
        if present:
            oa = self._oa(raw, self._leaf_oa[level])
        else:
            oa = self._oa(raw, self._page_oa)
            flip = bool(raw & TABLE_BIT) != (level == 0)
            sw |= int(flip) << SW_BIT1_FLIP | (raw & VALID) << SW_RESERVED
            sw |= _pack(raw, self._spare_bits) << SW_SPARE
        attrs = Attrs(
            present=present,
            writable=not raw & RDONLY,
            user=bool(raw & USER),
            exec=not raw & PXN,
            uexec=not raw & UXN,
            global_=not raw & NG,
            accessed=bool(raw & AF),
            dirty=bool(raw & DIRTY),
            cache=(raw & ATTRINDX) >> ATTRINDX_SHIFT,
            contiguous=bool(raw & CONT),
            sw=sw,
            ns=bool(raw & NS),
            shareability=0 if self.lpa2 else (raw & SH) >> SH_SHIFT,
            dbm=bool(raw & DBM),
        )
        return Entry(Kind.LEAF, oa, attrs)

    def _encode(self, entry: Entry, level: int) -> int:
        kind = entry.kind
        present = entry.attrs.present
        if kind is Kind.LEAF:
            if present and level not in self._leaf_levels:
                raise FormatError(
                    f"{self.name}: no block at level {level} ({self.level_name(level)})"
                )
            align = self.entry_size(level) if present else self.table_bytes
        elif kind is Kind.TABLE:
            if level == 0:
                raise FormatError(f"{self.name}: a pte cannot point to a table")
            if not present:
                raise FormatError(
                    f"{self.name}: an arm64 table entry is always valid; encode a "
                    "non-present LEAF to keep an invalid entry's bits"
                )
            align = self.table_bytes
        else:
            raise FormatError(f"{self.name}: unknown entry kind {kind!r}")
        oa = entry.oa
        if not isinstance(oa, int | np.integer) or not 0 <= oa < 1 << self.pa_bits or oa % align:
            raise FormatError(
                f"{self.name}: output address {oa!r} is not a {align:#x}-aligned address "
                f"below 2**{self.pa_bits} (level {level}, {kind.name})"
            )
        a = self.normalize(entry.attrs, kind)
        raw = self._oa_bits(int(oa))
        if kind is Kind.TABLE:
            raw |= (
                VALID
                | TABLE_BIT
                | (0 if a.writable else APTABLE_RDONLY)
                | (0 if a.user else APTABLE_NO_EL0)
                | (0 if a.exec else PXN_TABLE)
                | (0 if a.uexec else UXN_TABLE)
                | (NS_TABLE if a.ns else 0)
                | _unpack(a.sw, self._table_sw_bits)
            )
            return raw
        raw |= (
            (a.cache << ATTRINDX_SHIFT)
            | (NS if a.ns else 0)
            | (USER if a.user else 0)
            | (0 if a.writable else RDONLY)
            | (a.shareability << SH_SHIFT)
            | (AF if a.accessed else 0)
            | (0 if a.global_ else NG)
            | (DBM if a.dbm else 0)
            | (CONT if a.contiguous else 0)
            | (0 if a.exec else PXN)
            | (0 if a.uexec else UXN)
            | (DIRTY if a.dirty else 0)
            | _unpack(a.sw, LEAF_SW_BITS)
        )
        bit1 = level == 0
        if present:
            raw |= VALID
        else:
            bit1 ^= bool(a.sw >> SW_BIT1_FLIP & 1)
            raw |= _unpack(a.sw >> SW_SPARE, self._spare_bits)
            if a.sw >> SW_RESERVED & 1:
                raw |= VALID
                if not self._reserved(raw | (TABLE_BIT if bit1 else 0), level):
                    raise FormatError(
                        f"{self.name}: sw bit {SW_RESERVED} (valid bit of a reserved "
                        f"descriptor) set, but bit 1 makes a valid {self.level_name(level)} "
                        f"entry; flip sw bit {SW_BIT1_FLIP} or clear it"
                    )
        raw |= TABLE_BIT if bit1 else 0
        return raw

    def normalize(self, attrs: Attrs, kind: Kind = Kind.LEAF) -> Attrs:
        if kind is Kind.EMPTY:
            return Attrs()
        width = self.sw_width(kind, attrs.present)
        if not isinstance(attrs.sw, int) or not 0 <= attrs.sw < 1 << width:
            raise FormatError(f"{self.name}: sw {attrs.sw!r} does not fit in {width} bits")
        if kind is Kind.TABLE:
            return Attrs(
                present=True,
                writable=attrs.writable,
                user=attrs.user,
                exec=attrs.exec,
                uexec=attrs.uexec,
                ns=attrs.ns,
                sw=attrs.sw,
            )
        if not isinstance(attrs.cache, int) or not 0 <= attrs.cache <= 7:
            raise FormatError(f"{self.name}: AttrIndx {attrs.cache!r} is not 0..7")
        if not isinstance(attrs.shareability, int) or not 0 <= attrs.shareability <= 3:
            raise FormatError(f"{self.name}: shareability {attrs.shareability!r} is not 0..3")
        return Attrs(
            present=attrs.present,
            writable=attrs.writable,
            user=attrs.user,
            exec=attrs.exec,
            uexec=attrs.uexec,
            global_=attrs.global_,
            accessed=attrs.accessed,
            dirty=attrs.dirty,
            cache=attrs.cache,
            contiguous=attrs.contiguous,
            sw=attrs.sw,
            ns=attrs.ns,
            shareability=0 if self.lpa2 else attrs.shareability,
            dbm=attrs.dbm,
        )

    def table_attrs(self) -> Attrs:
        """A table entry without APTable/XNTable/NSTable bits: no restriction below it."""
        return _NO_RESTRICTION

    def _anomalies(self, raw: int, level: int, name: str) -> list[str]:
        out: list[str] = []
        if not raw & VALID:
            if level not in self._leaf_levels:
                out.append(
                    f"invalid non-zero {name} entry at a level without leaves "
                    f"({raw:#x}): not empty, not a table (pXd_bad); do not descend"
                )
            return out
        if level == 0 and not raw & TABLE_BIT:
            out.append(
                f"reserved descriptor in a {name} (bit 1 clear at Arm level 3): the CPU "
                "faults; decoded as a non-present leaf"
            )
            return out
        if not raw & TABLE_BIT and level not in self._leaf_levels:
            out.append(
                f"block descriptor in a {name} entry (Arm level {self.arm_level(level)}): "
                "no blocks at this level, the CPU faults; decoded as a non-present leaf"
            )
            return out
        if level > 0 and raw & TABLE_BIT:
            rsvd = raw & self._table_res0
            if rsvd:
                out.append(f"RES0 bits set in a {name} table entry ({rsvd:#x}): dropped by decode")
            return out
        rsvd = raw & self._leaf_res0[level]
        if rsvd:
            below = rsvd & (self.entry_size(level) - 1)
            if below and level > 0:
                out.append(
                    f"output address of a {self._size_text(level)} {name} block not aligned "
                    f"({below:#x} below the block size): RES0, dropped by decode"
                )
            if rsvd & ~below:
                out.append(f"RES0 bits set in a {name} leaf ({rsvd & ~below:#x}): dropped")
            elif below and level == 0:
                out.append(f"RES0 bits set in a {name} leaf ({below:#x}): dropped")
        return out

    def _size_text(self, level: int) -> str:
        size = self.entry_size(level)
        for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
            if size >= 1 << shift:
                return f"{size >> shift}{unit}"
        return f"{size}"

    # --- vectorised helpers --------------------------------------------------------------
    def _classes(self, r: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boolean masks (table, valid leaf, invalid-or-reserved leaf) over non-zero raws."""
        nz = r != 0
        valid = (r & np.uint64(VALID)) != 0
        bit1 = (r & np.uint64(TABLE_BIT)) != 0
        if level == 0:
            table = np.zeros(r.shape, dtype=bool)
            leaf = valid & bit1
        else:
            table = valid & bit1
            leaf = valid & ~bit1 if level in self._leaf_levels else np.zeros(r.shape, bool)
        invalid = nz & ~table & ~leaf
        return table, leaf, invalid

    def kinds(self, raws: np.ndarray, level: int) -> np.ndarray:
        self._check_level(level)
        r = self._table_array(raws)
        table, _, _ = self._classes(r, level)
        out = np.where(r != 0, np.uint8(Kind.LEAF), np.uint8(Kind.EMPTY)).astype(np.uint8)
        out[table] = np.uint8(Kind.TABLE)
        return out

    def oas(self, raws: np.ndarray, level: int) -> np.ndarray:
        self._check_level(level)
        r = self._table_array(raws)
        _, leaf, _ = self._classes(r, level)
        low = np.where(leaf, np.uint64(self._leaf_oa[level]), np.uint64(self._page_oa))
        out = r & low
        if self._hi_field:
            out |= (r & np.uint64(self._hi_field)) << np.uint64(self._hi_shift)
        return out

    def attr_keys(self, raws: np.ndarray, level: int) -> np.ndarray:
        """Each entry with the bits decode does not read into Attrs cleared (OA bits, and
        the RES0 bits it drops from valid entries). Compare keys of one kind."""
        self._check_level(level)
        r = self._table_array(raws)
        table, leaf, _ = self._classes(r, level)
        oa = self._page_oa | self._hi_field
        invalid_keep = U64 & ~oa
        leaf_keep = U64 & ~(self._leaf_oa[level] | self._hi_field | self._leaf_res0[level])
        table_keep = U64 & ~(oa | self._table_res0)
        keep = np.where(leaf, np.uint64(leaf_keep), np.uint64(invalid_keep))
        keep = np.where(table, np.uint64(table_keep), keep)
        return r & keep

    def ad_mask(self) -> int:
        """AF and the software dirty bit (a DBM page's hardware-dirty AP[2] is a permission
        and is not included)."""
        return AF | DIRTY


_ALL = [(g, v) for g in (4096, 16384, 65536) for v in _VA_BITS[g]]
CONFIGS: list[Format] = [Arm64(g, v) for g, v in _ALL] + [Arm64(4096, 48, upper=False)]


def variant(name: str) -> Format | None:
    """The TTBR0 (user) regime of a kernel configuration by name, ``<config>-ttbr0`` (e.g.
    ``arm64-4k-52-ttbr0`` for a process under a 52-bit kernel); None for other names."""
    base = name.removesuffix("-ttbr0")
    if base == name:
        return None
    for f in CONFIGS:
        if f.upper and f.name == base:
            return _ttbr0(f.granule, f.va_bits)
    return None


@functools.cache
def _ttbr0(granule: int, va_bits: int) -> Format:
    if (granule, va_bits) == (4096, 48):
        return CONFIGS[-1]  # the catalogued arm64-4k-48-ttbr0
    return Arm64(granule, va_bits, upper=False)
