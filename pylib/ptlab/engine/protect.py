"""Attribute changes: protect (set_memory_* / set_direct_map_*), apply (callback per leaf),
set_table_attrs (restrictions on an upper table entry)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from typing import Any

import numpy as np

from ..formats.base import ATTR_FIELDS, Attrs, Entry, Kind
from .core import EMPTY_K, LEAF, TABLE, TableCore
from .errors import EngineError, NotMapped
from .txn import Txn

AttrChange = Mapping[str, Any] | Attrs | Iterable[str] | None
ApplyFn = Callable[[int, int, Entry], Entry | None]


class ProtectOps(TableCore):
    """protect / apply / set_table_attrs (mixed into :class:`~ptlab.engine.PageTable`)."""

    def _changer(self, set: AttrChange, clear: AttrChange) -> Callable[[Attrs], Attrs]:
        changes: dict[str, Any] = {}
        defaults = Attrs()

        def names(spec: AttrChange) -> dict[str, Any]:
            if spec is None:
                return {}
            if isinstance(spec, Attrs):
                return {f.name: getattr(spec, f.name) for f in fields(Attrs)
                        if getattr(spec, f.name) != getattr(defaults, f.name)}
            if isinstance(spec, Mapping):
                return dict(spec)
            if isinstance(spec, str):
                return {spec: True}
            return {k: True for k in spec}

        sets, clears = names(set), names(clear)
        for name in [*sets, *clears]:
            if name not in ATTR_FIELDS:
                raise EngineError(f"unknown attribute {name!r} (known: {', '.join(ATTR_FIELDS)})")
            if name == "contiguous":
                raise EngineError("the contiguous hint is managed by the engine")
        changes.update(sets)
        for name, on in clears.items():
            if on:
                changes[name] = 0 if isinstance(getattr(defaults, name), int) and not isinstance(
                    getattr(defaults, name), bool) else False
        if not changes:
            raise EngineError("protect() needs set= or clear=")
        try:
            key = tuple(sorted(changes.items()))
            hit = self._changers.get(key)
        except TypeError:  # unhashable values: no memo
            key, hit = None, None
        if hit is not None:
            return hit
        norm = self.fmt.normalize
        norm(defaults.with_(**changes))  # validate values once, up front
        cache: dict[Attrs, Attrs] = {}

        def change(old: Attrs) -> Attrs:
            new = cache.get(old)
            if new is None:
                new = cache[old] = norm(old.with_(**changes))
            return new

        if key is not None and len(self._changers) < 256:
            self._changers[key] = change
        return change

    def protect(
        self,
        va: int,
        size: int,
        set: AttrChange = None,
        clear: AttrChange = None,
        *,
        strict: bool = False,
    ) -> None:
        """Change attributes of the leaves in [va, va+size) (set_memory_* style).

        ``set``: mapping field -> value (or an Attrs: its non-default fields);
        ``clear``: field names (or a mapping/Attrs: its truthy fields) reset to False/0.
        Huge leaves partly inside are split first, unless the change leaves them as they
        are. Holes are skipped, or raise :class:`NotMapped` with ``strict``.
        """
        change = self._changer(set, clear)
        lo, hi = self._span(va, size, self.fmt.table_bytes)
        tx = Txn(self)
        self._protect(tx, self.root, self.top, 0, lo, hi, change, strict)
        self._finish(tx)

    def _protect(
        self, tx: Txn, tpa: int, level: int, tbase: int, s: int, e: int,
        change: Callable[[Attrs], Attrs], strict: bool,
    ) -> None:
        fmt, n, sh = self.fmt, self._n[level], self._sh[level]
        esz = 1 << sh
        partial, f0, f1 = self._slots(level, tbase, s, e)
        self._uncont_edges(tx, tpa, level, tbase, s, e, partial)
        for idx in partial:
            ent = self._entry(tx, tpa, level, idx)
            eb = tbase + (idx << sh)
            if ent.kind is Kind.EMPTY:
                if strict:
                    raise NotMapped(f"VA {self._va(max(s, eb)):#x} is not mapped")
                continue
            if ent.kind is Kind.LEAF:
                if change(ent.attrs) == ent.attrs:
                    continue
                child = self._split(tx, tpa, idx, level, eb, ent)
            else:
                child = self._child(ent, level, eb)
            self._protect(tx, child, level - 1, eb, max(s, eb), min(e, eb + esz), change, strict)
        if f0 >= f1:
            return
        blk = tx.read(tpa, n)[f0:f1]
        kinds = fmt.kinds(blk, level)
        if strict and (kinds == EMPTY_K).any():
            first = int(np.flatnonzero(kinds == EMPTY_K)[0])
            raise NotMapped(f"VA {self._va(tbase + ((f0 + first) << sh)):#x} is not mapped")
        leaves = np.flatnonzero(kinds == LEAF)
        tables = np.flatnonzero(kinds == TABLE)
        child_oas = [int(x) for x in fmt.oas(blk[tables], level)] if tables.size else []
        if leaves.size:
            self._protect_leaves(tx, tpa, level, tbase, f0, blk, leaves, change)
        for t, child in zip(tables, child_oas, strict=True):
            idx = f0 + int(t)
            eb = tbase + (idx << sh)
            self._child(self._entry(tx, tpa, level, idx), level, eb)
            self._protect(tx, child, level - 1, eb, eb, eb + esz, change, strict)

    def _protect_leaves(
        self, tx: Txn, tpa: int, level: int, tbase: int, f0: int, blk: np.ndarray,
        leaves: np.ndarray, change: Callable[[Attrs], Attrs],
    ) -> None:
        fmt, sh = self.fmt, self._sh[level]
        sub = blk[leaves]
        keys = fmt.attr_keys(sub, level)
        if (keys == keys[0]).all():
            groups = [(None, int(sub[0]))]
        else:
            uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
            groups = [(inv == u, int(sub[first[u]])) for u in range(uniq.size)]
        new = None
        for sel, rep in groups:
            old = fmt.decode(rep, level).attrs
            want = change(old)
            if want == old:
                continue
            if new is None:
                new = sub.copy()
                oas = fmt.oas(sub, level)
                changed = np.zeros(sub.size, dtype=bool)
            if sel is None:
                new[:] = self.enc.encode(oas, want, level)
                changed[:] = True
            else:
                new[sel] = self.enc.encode(oas[sel], want, level)
                changed |= sel
        if new is None:
            return
        idx = f0 + leaves[changed]
        tx.write(tpa, self._n[level])[idx] = new[changed]
        tx.flush(tbase + (int(idx[0]) << sh), tbase + ((int(idx[-1]) + 1) << sh))

    def apply(self, va: int, size: int, fn: ApplyFn) -> int:
        """Call ``fn(va, level, entry)`` for every leaf overlapping [va, va+size), in VA
        order (``apply_to_existing_page_range``); a returned Entry (LEAF at the same level,
        or EMPTY) replaces it. Huge leaves partly inside are passed whole, never split, so
        apply never allocates. Returns the number of leaves visited."""
        lo, hi = self._span(va, size, self.fmt.table_bytes)
        tx = Txn(self)
        count = 0
        for tpa, level, idx, eb in list(self._leaf_slots(tx, self.root, self.top, 0, lo, hi)):
            count += 1
            old = self._entry(tx, tpa, level, idx)
            new = fn(self._va(eb), level, old)
            if new is None or new == old:
                continue
            if not isinstance(new, Entry) or new.kind is Kind.TABLE:
                raise EngineError(f"apply: fn must return None or a LEAF/EMPTY Entry, got {new!r}")
            if old.attrs.contiguous:
                self._uncont(tx, tpa, level, eb - (idx << self._sh[level]), idx)
            na = new.attrs.with_(contiguous=False) if new.attrs.contiguous else new.attrs
            raw = 0 if new.kind is Kind.EMPTY else self.fmt.encode(
                Entry(Kind.LEAF, new.oa, self._leaf_attrs(na)), level)
            tx.write(tpa, self._n[level])[idx] = raw
            tx.flush(eb, eb + (1 << self._sh[level]))
        self._finish(tx)
        return count

    def set_table_attrs(self, va: int, level: int, attrs: Attrs) -> None:
        """Give the table entry at ``level`` covering ``va`` the restrictions ``attrs``
        (x86 NX/RW/US on an upper entry, e.g. KPTI's ``pti_set_user_pgtbl`` NX on the kernel
        copy; arm64 APTable/PXNTable/UXNTable). The entry keeps pointing to the same table."""
        if not isinstance(attrs, Attrs):
            raise EngineError(f"attrs must be an Attrs, got {type(attrs).__name__}")
        tx = Txn(self)
        lo, tpa, idx, ent = self._entry_at(tx, va, level, "table", "table entry")
        if ent.kind is not Kind.TABLE:
            raise EngineError(f"VA {va:#x}: no table entry at level {level}")
        raw = self.fmt.table(ent.oa, level, self.fmt.normalize(attrs, Kind.TABLE))
        if raw != int(tx.read(tpa, self._n[level])[idx]):
            tx.write(tpa, self._n[level])[idx] = raw
            esz = 1 << self._sh[level]
            tx.flush(lo - lo % esz, lo - lo % esz + esz)
        self._finish(tx)
