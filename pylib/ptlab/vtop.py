"""Many VAs translated at once (crash's ``vtop``, drgn's ``follow_phys``), level by level with
numpy: each distinct table is read once per batch, whatever the number of VAs through it.

:func:`translate_many` gives, per VA, what :func:`ptlab.walk.translate` gives for one (PA, page
size, level, effective attributes, fault text) without the per-level trace; the tests hold the
two to the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats.base import Attrs, Format, Kind, combine
from .memory.base import MemoryError_, PhysMemory

U64 = np.uint64


@dataclass(slots=True)
class Batch:
    """Results for ``vas`` (uint64), index-aligned. ``pa``, ``page_size``: uint64, valid where
    ``level >= 0``; ``level``: int8, -1 when no leaf was reached; ``attrs``: int32 index into
    ``attr_table`` (effective attributes), -1 when no leaf; ``fault``: int32 index into
    ``faults`` (``faults[0]`` is None: mapped)."""

    vas: np.ndarray
    pa: np.ndarray
    page_size: np.ndarray
    level: np.ndarray
    attrs: np.ndarray
    attr_table: list[Attrs]
    fault: np.ndarray
    faults: list[str | None]

    def __len__(self) -> int:
        return len(self.vas)

    def mapped(self) -> np.ndarray:
        return self.fault == 0


class _Faults:
    def __init__(self) -> None:
        self.texts: list[str | None] = [None]
        self._ids: dict[str, int] = {}

    def id(self, text: str) -> int:
        i = self._ids.get(text)
        if i is None:
            i = self._ids[text] = len(self.texts)
            self.texts.append(text)
        return i


def _covered(fmt: Format, vas: np.ndarray) -> np.ndarray:
    ok = np.zeros(len(vas), dtype=bool)
    for start, end in fmt.va_ranges():
        hi = np.uint64(end - 1)  # end may be 2**64
        ok |= (vas >= np.uint64(start)) & (vas <= hi)
    return ok


SMALL = 16  # distinct values _unique finds by comparison before it sorts instead


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_index=True, return_inverse=True)`` (1-D), without the sort
    when there are at most SMALL distinct values (attribute keys, tables of a batch): one
    comparison pass per distinct value."""
    n = len(values)
    inverse = np.full(n, -1, dtype=np.intp)
    uniq: list[int] = []
    first: list[int] = []
    pos = 0
    while pos < n and len(uniq) < SMALL:
        v = values[pos]
        inverse[values == v] = len(uniq)
        uniq.append(int(v))
        first.append(pos)
        rest = np.flatnonzero(inverse[pos:] < 0)
        if not len(rest):
            return (np.array(uniq, dtype=values.dtype), np.array(first, dtype=np.intp),
                    inverse)
        pos += int(rest[0])
    u, f, inv = np.unique(values, return_index=True, return_inverse=True)
    return u, f, inv.reshape(-1)


def _groups(values: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(value, positions) for each distinct value of ``values``."""
    if not len(values):
        return []
    if values.min() == values.max():  # one table: the top level
        return [(int(values[0]), np.arange(len(values)))]
    order = np.argsort(values, kind="stable")
    s = values[order]
    cut = np.flatnonzero(s[1:] != s[:-1]) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(s)]])
    return [(int(s[a]), order[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _combo(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``columns`` as (first position of each distinct row, inverse)."""
    code = np.zeros(len(columns[0]), dtype=np.int64)
    radix = 1
    for col in columns:
        u, _, inv = _unique(col)
        radix *= len(u)
        if radix >= 1 << 62:  # too many combinations for one int64 code
            _, first, inv2 = np.unique(np.stack(columns, axis=1), axis=0, return_index=True,
                                       return_inverse=True)
            return first, inv2.reshape(-1)
        code = code * len(u) + inv
    _, first, inv = _unique(code)
    return first, inv


def translate_many(fmt: Format, mem: PhysMemory, root: int, vas: np.ndarray) -> Batch:
    """Translate every VA of ``vas`` (a uint64 array) through the tables at ``root``."""
    vas = np.asarray(vas, dtype=U64)
    n = len(vas)
    faults = _Faults()
    pa = np.zeros(n, dtype=U64)
    psize = np.zeros(n, dtype=U64)
    level_out = np.full(n, -1, dtype=np.int8)
    fault = np.zeros(n, dtype=np.int32)
    attr_idx = np.full(n, -1, dtype=np.int32)
    attr_table: list[Attrs] = []
    attr_ids: dict[tuple[int, ...], int] = {}

    both = fmt.va_halves == "both"
    outside = ~_covered(fmt, vas)
    fault[outside] = faults.id("non-canonical" if both else "outside this root's VA range")
    top = fmt.top_level
    if not mem.contains(root, fmt.entries(top) * 8):
        fault[~outside] = faults.id(f"table outside memory at {fmt.level_name(top)}")
        return Batch(vas, pa, psize, level_out, attr_idx, attr_table, fault, faults.texts)

    active = np.flatnonzero(~outside)
    tables = np.full(len(active), root, dtype=U64)
    path_tables: list[np.ndarray] = [tables]  # per level, for cycle detection
    path_keys: list[tuple[int, np.ndarray]] = []  # (level, table-entry attr keys)
    decoded: dict[tuple[int, int], Attrs] = {}  # (level, attr key) -> Attrs of such an entry

    def attrs_of(level: int, key: int, raw: int) -> Attrs:
        a = decoded.get((level, key))
        if a is None:
            a = decoded[(level, key)] = fmt.decode(raw, level).attrs
        return a

    span_mask = U64(fmt.va_span - 1)
    for level in range(top, -1, -1):
        if not len(active):
            break
        name = fmt.level_name(level)
        nent = fmt.entries(level)
        idx = ((vas[active] & span_mask) >> U64(fmt.shift(level))) & U64(nent - 1)
        raws = np.zeros(len(active), dtype=U64)
        readable = np.ones(len(active), dtype=bool)
        for tpa, sel in _groups(tables):
            try:
                table = mem.read_table(int(tpa), nent)
            except MemoryError_ as exc:
                readable[sel] = False
                fault[active[sel]] = faults.id(f"table unreadable at {name} ({exc})")
                continue
            raws[sel] = table[idx[sel].astype(np.intp)]
        active, tables, idx, raws = (active[readable], tables[readable], idx[readable],
                                     raws[readable])
        path_tables = [t[readable] for t in path_tables]
        path_keys = [(lv, k[readable]) for lv, k in path_keys]
        kinds = fmt.kinds(raws, level)
        oas = fmt.oas(raws, level)
        keys = fmt.attr_keys(raws, level)

        empty = kinds == Kind.EMPTY
        fault[active[empty]] = faults.id(f"not present at {name}")

        leaf = np.flatnonzero(kinds == Kind.LEAF)
        if len(leaf):
            size = 1 << fmt.shift(level)
            rows = active[leaf]
            pa[rows] = oas[leaf] + (vas[rows] & U64(size - 1))
            psize[rows] = U64(size)
            level_out[rows] = level
            first, inv_c = _combo([k[leaf] for _, k in path_keys] + [keys[leaf]])
            ai_of = np.empty(len(first), dtype=np.int32)
            for c, j in enumerate(leaf[first].tolist()):
                key = (level, *(int(k[j]) for _, k in path_keys), int(keys[j]))
                ai = attr_ids.get(key)
                if ai is None:
                    tpath = [attrs_of(lv, int(k[j]), int(k[j])) for lv, k in path_keys]
                    own = fmt.decode(int(raws[j]), level).attrs
                    ai = attr_ids[key] = len(attr_table)
                    attr_table.append(combine(tpath, own))
                ai_of[c] = ai
            attr_idx[rows] = ai_of[inv_c]
            present = np.array([a.present for a in attr_table], dtype=bool)[attr_idx[rows]]
            fault[rows[~present]] = faults.id("not present")  # combine() keeps the leaf's

        tab = kinds == Kind.TABLE
        if level == 0:
            fault[active[tab]] = faults.id(f"table entry at {name}")
            break
        t = np.flatnonzero(tab)
        if not len(t):
            break
        ukeys, first_t, inv_t = _unique(keys[t])
        tpresent = np.array([attrs_of(level, int(k), int(raws[t[j]])).present
                             for k, j in zip(ukeys.tolist(), first_t.tolist(), strict=True)],
                            dtype=bool)[inv_t]
        fault[active[t[~tpresent]]] = faults.id(f"not present at {name}")
        t = t[tpresent]
        nxt = oas[t]
        cyc = np.zeros(len(t), dtype=bool)
        for pt in path_tables:
            cyc |= pt[t] == nxt
        fault[active[t[cyc]]] = faults.id(f"cycle at {name}")
        t, nxt = t[~cyc], nxt[~cyc]
        lower = fmt.entries(level - 1) * 8
        uniq, _, inverse = _unique(nxt)
        inside = np.array([mem.contains(int(tpa), lower) for tpa in uniq.tolist()],
                          dtype=bool)[inverse]
        fault[active[t[~inside]]] = faults.id(f"table outside memory at "
                                              f"{fmt.level_name(level - 1)}")
        t, nxt = t[inside], nxt[inside]
        path_keys = [(lv, k[t]) for lv, k in path_keys] + [(level, keys[t])]
        path_tables = [pt[t] for pt in path_tables] + [nxt]
        active, tables = active[t], nxt
    return Batch(vas, pa, psize, level_out, attr_idx, attr_table, fault, faults.texts)
