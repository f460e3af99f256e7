"""x86-64 page-table format: 4-level and 5-level (LA57) paging, 4 KiB granule.

Bits follow arch/x86/include/asm/pgtable_types.h (``_PAGE_BIT_*``) and the SDM's
"IA-32e paging" tables. Levels (generic_pt numbering): 0 pte, 1 pmd, 2 pud, 3 p4d / pgd
(4-level: pgd), 4 pgd (5-level). Leaves: 4K pte, 2M pmd and 1G pud (PS, bit 7).

Layout decisions (the ``Attrs`` an entry decodes to):

* ``cache`` = PAT<<2 | PCD<<1 | PWT, with PAT at bit 7 in a pte and bit 12 (``_PAGE_PAT_LARGE``)
  in a 2M/1G leaf; a table entry stores only PCD|PWT (cache 0..3).
* ``sw`` packs the bits the CPU ignores and the kernel uses as software bits, LSB first:
  sw[0..2] = bits 9, 10, 11 (``_PAGE_BIT_SOFTW1..3``: special/cpa-test, uffd-wp, soft-dirty /
  kernel-4K) and sw[3..9] = bits 52..58 (``_PAGE_BIT_SOFTW4`` devmap/58 in 6.1, 57 later;
  ``_PAGE_BIT_SOFTW5`` saved-dirty / NOPTISHADOW 58; 52..56 are free). Width 10.
* ``pkey`` = bits 62:59, leaves only. In a table entry those bits are ignored by the CPU;
  decode drops them and :meth:`X86_64.anomalies` reports them.
* ``exec`` == ``uexec`` == not NX (bit 63): x86 has one NX bit. :meth:`X86_64.normalize` picks
  the field that governs the entry's audience: ``uexec`` when ``user`` is set, else ``exec``
  (with SMEP the kernel never executes user pages, and users never reach kernel pages).
* Non-zero entries with P clear: at levels 0..2 a ``LEAF`` with ``present=False``, PS set or
  not (the kernel's ``lookup_address`` returns a pmd/pud that is ``pmd_leaf() ||
  !pmd_present()`` as the large "pte", and CPA's ``__should_split_large_page`` clears
  ``_PAGE_PSE`` together with ``_PAGE_PRESENT`` so that ``pmd_present()`` stays false; a THP
  swap/migration pmd has no PS either). Without PS the OA is read with ``PTE_PFN_MASK``
  (``pmd_pfn_mask``), bit 12 is an OA bit rather than PAT, and ``sw`` bit :data:`SW_NO_PS`
  records the missing PS so that the entry round-trips. At levels >= 3 such an entry is a
  ``TABLE`` with ``present=False`` (reported as an anomaly: the CPU ignores it, the kernel
  never makes one). L1TF (arch/x86/include/asm/pgtable-invert.h): the
  output-address bits of such a pte/pmd/pud are stored inverted (``__pte_needs_invert``:
  ``val && !(val & _PAGE_PRESENT)``), which decode undoes as pte_pfn/pmd_pfn/pud_pfn do and
  encode applies as pfn_pte/pfn_pmd/pfn_pud do. p4d/pgd values are never inverted (p4d_pfn,
  pgd_pfn). A 2M leaf CPA made non-present in place (pfn_pte with the 4K mask) has bits
  20:12 set: the OA still decodes right, bit 12 reads as PAT, 20:13 are reported.
* Table entries keep D and G (ignored by the CPU there, but _KERNPG_TABLE sets D). PS in a
  p4d/pgd entry is reserved: reported, decoded as a table (the kernel's p4d_large() == 0).
"""

from __future__ import annotations

import numpy as np

from .base import EMPTY, Attrs, Entry, Format, FormatError, Kind

# --- bits (arch/x86/include/asm/pgtable_types.h) ------------------------------------------
P = 1 << 0  # _PAGE_PRESENT
RW = 1 << 1  # _PAGE_RW
US = 1 << 2  # _PAGE_USER
PWT = 1 << 3  # _PAGE_PWT
PCD = 1 << 4  # _PAGE_PCD
A = 1 << 5  # _PAGE_ACCESSED
D = 1 << 6  # _PAGE_DIRTY
PS = 1 << 7  # _PAGE_PSE (levels >= 1)
PAT = 1 << 7  # _PAGE_PAT (pte)
G = 1 << 8  # _PAGE_GLOBAL (_PAGE_PROTNONE when P is clear)
PAT_LARGE = 1 << 12  # _PAGE_PAT_LARGE (2M / 1G leaves)
PKEY_SHIFT = 59  # _PAGE_BIT_PKEY_BIT0
PKEY = 0xF << PKEY_SHIFT
NX = 1 << 63  # _PAGE_NX

SW_BITS: tuple[int, ...] = (9, 10, 11, 52, 53, 54, 55, 56, 57, 58)
SW_WIDTH = len(SW_BITS)
SW_MASK = sum(1 << b for b in SW_BITS)
# sw index, non-present pmd/pud leaves only: stored without PS (CPA's non-present large page)
SW_NO_PS = SW_WIDTH

PA_BITS = 52  # __PHYSICAL_MASK_SHIFT
PHYS_MASK = (1 << PA_BITS) - 1
PTE_PFN_MASK = PHYS_MASK & ~0xFFF  # bits 51:12
U64 = (1 << 64) - 1

_KERNPG_TABLE = Attrs(
    present=True, writable=True, user=False, exec=True, uexec=True, accessed=True, dirty=True
)


def _sw_pack(raw: int) -> int:
    """Software bits 9..11 and 52..58 of ``raw`` as a 10-bit value (bit 9 -> sw bit 0)."""
    return (raw >> 9) & 0x7 | ((raw >> 52) & 0x7F) << 3


def _sw_unpack(sw: int) -> int:
    """Inverse of :func:`_sw_pack`."""
    return (sw & 0x7) << 9 | ((sw >> 3) & 0x7F) << 52


class X86_64(Format):
    """x86-64 4-level (48-bit VA) or 5-level (57-bit VA, LA57) paging."""

    arch = "x86_64"
    page_shift = 12
    bits_per_level = 9
    pa_bits = PA_BITS
    upper = False
    va_halves = "both"  # canonical: sign-extended from bit va_bits - 1

    def __init__(self, levels: int = 4) -> None:
        if levels not in (4, 5):
            raise FormatError(f"x86-64 paging has 4 or 5 levels, not {levels!r}")
        self.levels = levels
        self.va_bits = 48 if levels == 4 else 57
        self.name = f"x86_64-{levels}level"
        self._leaf_levels = frozenset({0, 1, 2})
        # Per-level masks: output address of a leaf, and the bits reserved below it.
        self._leaf_oa = {lvl: PHYS_MASK & ~(self.entry_size(lvl) - 1) for lvl in range(3)}
        self._leaf_rsvd = {0: 0}
        for lvl in (1, 2):
            self._leaf_rsvd[lvl] = (self.entry_size(lvl) - 1) & ~((1 << 13) - 1)

    # --- geometry -------------------------------------------------------------------------
    @property
    def leaf_levels(self) -> frozenset[int]:
        return self._leaf_levels

    @staticmethod
    def _inverts(level: int) -> bool:
        """Whether the kernel inverts non-present entries at ``level`` (pte/pmd/pud)."""
        return level <= 2

    # --- codec ----------------------------------------------------------------------------
    def decode(self, raw: int, level: int) -> Entry:
        self._check_level(level)
        raw = self._check_raw(raw)
        if raw == 0:
            return EMPTY
        present = bool(raw & P)
        sw = _sw_pack(raw)
        if level == 0 or (level in self._leaf_levels and raw & PS):
            kind, oa_mask = Kind.LEAF, self._leaf_oa[level]
        elif level in self._leaf_levels and not present:  # pmd_pfn_mask() without PS
            kind, oa_mask, sw = Kind.LEAF, PTE_PFN_MASK, sw | 1 << SW_NO_PS
        else:
            kind, oa_mask = Kind.TABLE, PTE_PFN_MASK
        value = raw ^ U64 if not present and self._inverts(level) else raw
        executable = not raw & NX
        cache = (1 if raw & PWT else 0) | (2 if raw & PCD else 0)
        if kind is Kind.LEAF:
            pat = PAT if level == 0 else PAT_LARGE if raw & PS else 0
            cache |= 4 if raw & pat else 0
            pkey = (raw >> PKEY_SHIFT) & 0xF
        else:
            pkey = 0
        attrs = Attrs(
            present=present,
            writable=bool(raw & RW),
            user=bool(raw & US),
            exec=executable,
            uexec=executable,
            global_=bool(raw & G),
            accessed=bool(raw & A),
            dirty=bool(raw & D),
            cache=cache,
            sw=sw,
            pkey=pkey,
        )
        return Entry(kind, value & oa_mask, attrs)

    def _encode(self, entry: Entry, level: int) -> int:
        kind = entry.kind
        no_ps = kind is Kind.LEAF and not entry.attrs.present and entry.attrs.sw >> SW_NO_PS & 1
        if kind is Kind.LEAF:
            if level not in self._leaf_levels:
                raise FormatError(
                    f"{self.name}: no leaf at level {level} ({self.level_name(level)})"
                )
            oa_mask, align = self._leaf_oa[level], self.entry_size(level)
            if no_ps:
                if level == 0:
                    raise FormatError(f"{self.name}: sw bit {SW_NO_PS} (no PS) is for a "
                                      "non-present pmd/pud, not a pte")
                if entry.attrs.cache & 4:
                    raise FormatError(f"{self.name}: a non-present {self.level_name(level)} "
                                      "without PS has no PAT bit (bit 12 is an OA bit)")
                oa_mask, align = PTE_PFN_MASK, self.table_bytes
        elif kind is Kind.TABLE:
            if level == 0:
                raise FormatError(f"{self.name}: a pte cannot point to a table")
            oa_mask, align = PTE_PFN_MASK, self.table_bytes
        else:
            raise FormatError(f"{self.name}: unknown entry kind {kind!r}")
        oa = entry.oa
        if not isinstance(oa, int | np.integer) or not 0 <= oa <= PHYS_MASK or oa % align:
            raise FormatError(
                f"{self.name}: output address {oa!r} is not a {align:#x}-aligned address "
                f"below 2**{PA_BITS} (level {level}, {kind.name})"
            )
        a = self.normalize(entry.attrs, kind)
        raw = (
            (P if a.present else 0)
            | (RW if a.writable else 0)
            | (US if a.user else 0)
            | (PWT if a.cache & 1 else 0)
            | (PCD if a.cache & 2 else 0)
            | (A if a.accessed else 0)
            | (D if a.dirty else 0)
            | (G if a.global_ else 0)
            | (0 if a.exec else NX)
            | _sw_unpack(a.sw & ((1 << SW_WIDTH) - 1))
        )
        if kind is Kind.LEAF:
            raw |= a.pkey << PKEY_SHIFT
            if level == 0:
                raw |= PAT if a.cache & 4 else 0
            elif not no_ps:
                raw |= PS | (PAT_LARGE if a.cache & 4 else 0)
        oa = int(oa)
        raw |= (oa ^ U64) & oa_mask if not a.present and self._inverts(level) else oa
        return raw

    def normalize(self, attrs: Attrs, kind: Kind = Kind.LEAF) -> Attrs:
        if kind is Kind.EMPTY:
            return Attrs()
        if not 0 <= attrs.cache <= 7:
            raise FormatError(f"{self.name}: cache index {attrs.cache!r} is not 0..7")
        if not 0 <= attrs.pkey <= 15:
            raise FormatError(f"{self.name}: protection key {attrs.pkey!r} is not 0..15")
        width = SW_WIDTH + (kind is Kind.LEAF and not attrs.present)  # + SW_NO_PS
        if not 0 <= attrs.sw < 1 << width:
            raise FormatError(f"{self.name}: sw {attrs.sw!r} does not fit in {width} bits")
        executable = attrs.uexec if attrs.user else attrs.exec
        leaf = kind is Kind.LEAF
        return Attrs(
            present=attrs.present,
            writable=attrs.writable,
            user=attrs.user,
            exec=executable,
            uexec=executable,
            global_=attrs.global_,
            accessed=attrs.accessed,
            dirty=attrs.dirty,
            cache=attrs.cache if leaf else attrs.cache & 3,
            sw=attrs.sw,
            pkey=attrs.pkey if leaf else 0,
        )

    def table_attrs(self) -> Attrs:
        """``_KERNPG_TABLE``: P|RW|A|D, no NX (pmd_populate_kernel and friends)."""
        return _KERNPG_TABLE

    def _anomalies(self, raw: int, level: int, name: str) -> list[str]:
        present = bool(raw & P)
        out: list[str] = []
        if level not in self._leaf_levels and raw & PS:
            out.append(
                f"PS set in a {name} entry: reserved (no leaf at this level); "
                "decoded as a table, PS dropped"
            )
        if level in (1, 2) and not present and not raw & PS:
            return out  # CPA's non-present large page (or a pmd swap entry): a leaf, no PS
        leaf = level == 0 or (level in self._leaf_levels and raw & PS)
        if leaf:
            rsvd = raw & self._leaf_rsvd[level]
            if rsvd:
                hi = self.shift(level) - 1
                what = "reserved" if present else "ignored (non-present)"
                out.append(
                    f"bits {hi}:13 set in a {self.entry_size(level) >> 20}M {name} leaf "
                    f"({rsvd:#x}): {what}, dropped by decode"
                )
        else:
            if raw & PKEY:
                out.append(
                    f"bits 62:59 set in a {name} table entry ({raw & PKEY:#x}): protection "
                    "keys apply to leaves only; ignored by the CPU, dropped by decode"
                )
            if not present:
                out.append(
                    f"non-present non-zero {name} entry: neither a page nor a usable table "
                    "(garbage; the kernel never writes one); do not descend"
                )
        return out

    # --- vectorised helpers --------------------------------------------------------------
    def kinds(self, raws: np.ndarray, level: int) -> np.ndarray:
        self._check_level(level)
        r = self._table_array(raws)
        nonzero = (r != 0).view(np.uint8)  # EMPTY 0 / TABLE 1
        if level == 0:
            return nonzero * np.uint8(Kind.LEAF)
        if level in self._leaf_levels:  # PS or !P adds 1: TABLE -> LEAF (0 stays EMPTY)
            leaf = ((r >> np.uint64(7)) | ~r) & np.uint64(1)
            return nonzero + nonzero * leaf.astype(np.uint8)
        return nonzero.copy()

    def oas(self, raws: np.ndarray, level: int) -> np.ndarray:
        self._check_level(level)
        r = self._table_array(raws)
        v = r
        if self._inverts(level):
            invert = (r != 0) & ((r & np.uint64(P)) == 0)
            v = np.where(invert, ~r, r)
        if level == 0 or level not in self._leaf_levels:
            return v & np.uint64(self._leaf_oa[0])
        ps = (r & np.uint64(PS)) != 0  # from the stored value: PS is never inverted
        return v & np.where(ps, np.uint64(self._leaf_oa[level]), np.uint64(PTE_PFN_MASK))

    def attr_keys(self, raws: np.ndarray, level: int) -> np.ndarray:
        """Each entry with the bits decode does not read into Attrs cleared (OA bits, and
        the reserved/ignored bits :meth:`anomalies` reports). Compare keys of one kind."""
        self._check_level(level)
        r = self._table_array(raws)
        table_keep = U64 & ~(PTE_PFN_MASK | PKEY)
        if level == 0:
            return r & np.uint64(U64 & ~PTE_PFN_MASK)
        if level not in self._leaf_levels:
            return r & np.uint64(table_keep & ~PS)
        leaf_keep = U64 & ~(self._leaf_oa[level] | self._leaf_rsvd[level])
        ps = (r & np.uint64(PS)) != 0
        no_ps_leaf = U64 & ~PTE_PFN_MASK  # non-present without PS: a leaf, pkey kept
        keep = np.where((r & np.uint64(P)) == 0, np.uint64(no_ps_leaf), np.uint64(table_keep))
        return r & np.where(ps, np.uint64(leaf_keep), keep)

    def ad_mask(self) -> int:
        return A | D


CONFIGS: list[Format] = [X86_64(4), X86_64(5)]
