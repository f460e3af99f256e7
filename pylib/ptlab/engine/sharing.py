"""Operations between two roots: share, unshare, clone; and preallocation.

``share`` links this root's entries at one level to the other root's sub-tables, so every
later change below that level is seen through both roots — how ASI's restricted root
reuses the kernel's tables (``asi_clone_range``) and how x86 KPTI's user PGD reaches the
entry text (``pti_clone_pgtable`` copying pmd entries). ``clone`` copies leaves instead
(no aliasing). ``preallocate`` builds and pins the tables of a range so later map/unmap/
protect there need no allocation (ASI's preallocated sub-PGD tables, mermap's slots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..formats.base import Kind
from ..walk.cursor import follow, leaf_cursors, seek
from .core import PageSizes
from .errors import EngineError, MappingExists
from .mapping import MapArgs
from .txn import Txn

if TYPE_CHECKING:
    from .pagetable import PageTable


def _check_peer(pt: PageTable, other: PageTable) -> None:
    if other.fmt.name != pt.fmt.name or other.mem is not pt.mem:
        raise EngineError("share/clone need two roots of the same format in the same memory")
    if other.root is None or pt.root is None:
        raise EngineError("page table already destroyed")


def share(pt: PageTable, other: PageTable, va: int, size: int, level: int, *,
          replace: bool = False) -> None:
    """Point ``pt``'s entries at ``level`` over [va, va+size) to ``other``'s sub-tables.

    Missing tables are created on both sides first (in ``other`` with its allocator, so
    there is something to share). Where ``other`` has a huge leaf at ``level`` it is copied
    (nothing to share below a leaf). An existing different entry in ``pt`` raises
    MappingExists unless ``replace``.
    """
    _check_peer(pt, other)
    pt._check_level("share", level)
    esz = pt.geo.size[level]
    lo, hi = pt._span(va, size, esz)
    tx = Txn(pt)
    for eb in range(lo, hi, esz):
        oc = other._path(tx, eb, level, other.alloc)
        oent = oc.entry()
        if oent.kind is Kind.EMPTY:
            child: int | None = other._new_child(tx, oc, oc.index, other.alloc)
        elif oent.kind is Kind.TABLE:
            child = other._child(oc, oc.index, oent)
        else:
            child = None
        oraw = oc.raw()
        sc = pt._path(tx, eb, level, pt.alloc)
        sent = sc.entry()
        if sent.kind is Kind.TABLE and child is not None and sent.oa == child:
            continue
        if sent.kind is not Kind.EMPTY:
            if not replace:
                raise MappingExists(f"VA {pt._va(eb):#x}: level {level} entry already in use")
            if sent.kind is Kind.TABLE:
                tx.release(sent.oa, level - 1)
            tx.flush(*sc.span(sc.index))
        if child is None:  # a leaf: copied alone, so without the contiguous hint
            a = oent.attrs
            tx.write(sc.table, sc.n)[sc.index] = (
                pt.enc.one(oent.oa, a.with_(contiguous=False), level) if a.contiguous else oraw)
        else:
            tx.link(sc, sc.index, child, oraw)
    pt._finish(tx)


def unshare(pt: PageTable, va: int, size: int, level: int) -> int:
    """Clear ``pt``'s table entries at ``level`` over [va, va+size) that point to tables
    another root also references; returns how many were unlinked."""
    pt._check_level("unshare", level)
    esz = pt.geo.size[level]
    lo, hi = pt._span(va, size, esz)
    tx = Txn(pt)
    count = 0
    for eb in range(lo, hi, esz):
        c = seek(pt.geo, tx, pt.root, eb, level, follow)
        if c is None:
            continue
        ent = c.entry()
        if ent.kind is Kind.TABLE and tx.refcount(ent.oa) > 1:
            tx.write(c.table, c.n)[c.index] = 0
            tx.release(ent.oa, level - 1)
            tx.flush(*c.span(c.index))
            count += 1
    pt._finish(tx)
    return count


def clone(pt: PageTable, other: PageTable, va: int, size: int, *, replace: bool = False) -> int:
    """Copy ``other``'s leaves in [va, va+size) into ``pt`` at the same page size (huge
    leaves partly inside are mapped with smaller pages over the part inside). Returns the
    number of leaves copied."""
    _check_peer(pt, other)
    lo, hi = pt._span(va, size, pt.fmt.table_bytes)
    tx = Txn(pt)
    sizes = pt.fmt.page_sizes()
    pieces = [(c.clip(i), c.va(i), c.level, c.entry(i))
              for c, i in leaf_cursors(other._root(tx, lo, hi))]
    for (s, e), eb, level, ent in pieces:
        allowed = PageSizes({lvl: sz for lvl, sz in sizes.items() if lvl <= level})
        a = ent.attrs.with_(contiguous=False) if ent.attrs.contiguous else ent.attrs
        m = MapArgs(tx, ent.oa - eb, a, allowed, replace, min(allowed))
        pt._map(m, pt._root(tx, s, e))
    pt._finish(tx)
    return len(pieces)


def preallocate(pt: PageTable, va: int, size: int, level: int = 0) -> int:
    """Create (and pin) every table down to ``level`` for [va, va+size), splitting huge
    leaves above it, so map/unmap/protect in units of ``level``'s page size there need no
    allocation. Returns the number of tables allocated."""
    pt._check_level("preallocate", level, 0)
    lo, hi = pt._span(va, size, pt.fmt.table_bytes)
    step = pt.geo.size[level + 1] if level < pt.top else hi - lo
    tx = Txn(pt)
    start = lo - lo % step if level < pt.top else lo
    for eb in range(start, hi, step):
        pt._path(tx, max(eb, lo), level, pt.alloc, pin=True)
    pt._finish(tx)
    return len(tx.new)
