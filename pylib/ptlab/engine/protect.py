"""Attribute changes: protect (set_memory_* / set_direct_map_*), apply (callback per leaf),
set_table_attrs (restrictions on an upper table entry)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..formats.base import ATTR_FIELDS, Attrs, Entry, FormatError, Kind
from ..walk.cursor import Cursor, leaf_cursors
from .core import EMPTY_K, TableCore, check_attr_values
from .errors import EngineError, NotMapped
from .txn import Txn

AttrChange = Mapping[str, Any] | Attrs | Iterable[str] | None
ApplyFn = Callable[[int, int, Entry], Entry | None]
_DEFAULTS = Attrs()


@dataclass(slots=True)
class ProtectArgs:
    """One protect operation: through ``tx``, leaves get ``change(attrs)``; ``strict``
    refuses holes."""

    tx: Txn
    change: Callable[[Attrs], Attrs]
    strict: bool

    def unchanged(self, leaf: Entry) -> bool:
        """Whether the change leaves ``leaf`` as it is (a huge leaf then needs no split)."""
        return self.change(leaf.attrs) == leaf.attrs


class ProtectOps(TableCore):
    """protect / apply / set_table_attrs (mixed into :class:`~ptlab.engine.PageTable`)."""

    def _changer(self, set: AttrChange, clear: AttrChange) -> Callable[[Attrs], Attrs]:
        changes: dict[str, Any] = {}
        defaults = _DEFAULTS

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
            items = sorted(changes.items())
            key = (*items, *[type(v) for _, v in items])  # 1 == True, but only True is valid
            hit = self._changers.get(key)
        except TypeError:  # unhashable values: refused just below
            key, hit = None, None
        if hit is not None:  # memoised only once its values were checked
            return hit
        check_attr_values(changes)
        norm = self.fmt.normalize
        self._normalize(defaults.with_(**changes))  # validate values once, up front
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
        self._over(va, size, lambda tx, c: self._protect(ProtectArgs(tx, change, strict), c))

    def _protect(self, p: ProtectArgs, c: Cursor) -> None:
        tx = p.tx
        partial, f0, f1 = self._partition(tx, c)
        for _, d in self._edges(tx, c, partial, strict=p.strict, keep=p.unchanged):
            self._protect(p, d)
        if f0 >= f1:
            return
        blk, kinds, leaves, tables = self._block(c, f0, f1)
        if p.strict and (kinds == EMPTY_K).any():
            first = int(np.flatnonzero(kinds == EMPTY_K)[0])
            raise NotMapped(f"VA {self._va(c.va(f0 + first)):#x} is not mapped")
        if leaves.size:
            self._protect_leaves(tx, c, f0, blk, leaves, p.change)
        for t in tables:
            self._protect(p, self._descend(c, f0 + t))

    def _protect_leaves(
        self, tx: Txn, c: Cursor, f0: int, blk: np.ndarray, leaves: np.ndarray,
        change: Callable[[Attrs], Attrs],
    ) -> None:
        """Change the leaves ``f0 + leaves`` of ``c`` (raws ``blk`` from ``f0``), one
        vectorised encode per distinct attribute set."""
        fmt, level = self.fmt, c.level
        sub = blk[leaves]
        keys = fmt.attr_keys(sub, level)
        if (keys == keys[0]).all():
            groups = [(None, int(sub[0]))]
        else:
            uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
            groups = [(inv == u, int(sub[first[u]])) for u in range(uniq.size)]
        new = None
        for sel, rep in groups:
            old = self.geo.decode(rep, level).attrs
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
        tx.write(c.table, c.n)[idx] = new[changed]
        tx.flush(*c.span(int(idx[0]), int(idx[-1]) + 1))

    def apply(self, va: int, size: int, fn: ApplyFn) -> int:
        """Call ``fn(va, level, entry)`` for every leaf overlapping [va, va+size), in VA
        order (``apply_to_existing_page_range``); a returned Entry (LEAF at the same level,
        or EMPTY) replaces it. Huge leaves partly inside are passed whole, never split, so
        apply never allocates. Returns the number of leaves visited."""
        return self._over(va, size, lambda tx, root: self._apply(tx, root, fn))

    def _apply(self, tx: Txn, root: Cursor, fn: ApplyFn) -> int:
        count = 0
        # fn's attrs object (by identity: 1 == True) -> checked, normalised; kept alive here
        normed: dict[int, tuple[Attrs, Attrs]] = {}
        # new leaves, encoded at the end per (table, entries, level, attrs): [attrs, idx, oas]
        leaves: dict[tuple[int, int, int, int], tuple[Attrs, list[int], list[int]]] = {}
        for c, i in list(leaf_cursors(root)):
            count += 1
            old = c.entry(i)
            new = fn(self._va(c.va(i)), c.level, old)
            if new is None or new == old:
                continue
            if not isinstance(new, Entry) or new.kind is Kind.TABLE:
                raise EngineError(f"apply: fn must return None or a LEAF/EMPTY Entry, got {new!r}")
            if old.attrs.contiguous:
                self._uncont(tx, c, i)
            if new.kind is Kind.LEAF:
                hit = normed.get(id(new.attrs))
                if hit is not None and hit[0] is new.attrs:
                    na = hit[1]
                else:
                    na = self._normalize(new.attrs)
                    if na.contiguous:  # one leaf alone: the hint is the engine's to manage
                        na = na.with_(contiguous=False)
                    normed[id(new.attrs)] = (new.attrs, na)
                group = leaves.get((c.table, c.n, c.level, id(na)))
                if group is None:
                    group = leaves[(c.table, c.n, c.level, id(na))] = (na, [], [])
                group[1].append(i)
                group[2].append(new.oa)
            else:
                tx.write(c.table, c.n)[i] = 0
            tx.flush(*c.span(i))
        for (table, n, level, _), (na, idx, oas) in leaves.items():
            tx.write(table, n)[idx] = self._encode_leaves(oas, na, level)
        return count

    def _encode_leaves(self, oas: list[int], attrs: Attrs, level: int) -> np.ndarray:
        """Raw leaves for ``oas`` (vectorised when every OA is a valid, aligned address;
        else the scalar codec, which names the bad one)."""
        try:
            self.fmt.encode(Entry(Kind.LEAF, oas[0], attrs), level)  # level, attrs, type
            arr = np.array(oas, dtype=np.uint64)
        except FormatError as e:
            raise EngineError(f"apply: {e}") from None
        except (TypeError, ValueError, OverflowError):
            arr = None
        size = self.fmt.entry_size(level)
        if arr is not None and not (arr & np.uint64(size - 1)).any() \
                and not (arr >> np.uint64(self.fmt.pa_bits)).any():
            return self.enc.encode(arr, attrs, level)
        try:
            return np.array([self.fmt.encode(Entry(Kind.LEAF, oa, attrs), level) for oa in oas],
                            dtype=np.uint64)
        except FormatError as e:
            raise EngineError(f"apply: {e}") from None

    def set_table_attrs(self, va: int, level: int, attrs: Attrs) -> None:
        """Give the table entry at ``level`` covering ``va`` the restrictions ``attrs``
        (x86 NX/RW/US on an upper entry, e.g. KPTI's ``pti_set_user_pgtbl`` NX on the kernel
        copy; arm64 APTable/PXNTable/UXNTable). The entry keeps pointing to the same table."""
        attrs = self._normalize(attrs, Kind.TABLE)
        tx = Txn(self)
        c = self._seek_entry(tx, va, level, "table", "table entry")
        ent = c.entry()
        if ent.kind is not Kind.TABLE:
            raise EngineError(f"VA {va:#x}: no table entry at level {level}")
        raw = self.fmt.table(ent.oa, level, attrs)
        if raw != c.raw():
            tx.write(c.table, c.n)[c.index] = raw
            tx.flush(*c.span(c.index))
        self._finish(tx)
