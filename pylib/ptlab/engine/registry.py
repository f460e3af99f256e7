"""Who references each table page: the engine's ownership record, one per physical memory.

Tables are shared between roots (ASI, KPTI), so a table is freed only when the last entry
pointing to it goes away. The registry keeps, per table PA, the number of parent entries
(or owning :class:`~ptlab.engine.PageTable` objects, for roots) that reference it, the
allocator it came from, and whether it is pinned (preallocated: never freed when emptied,
never collapsed). Tables the engine did not allocate (imported from a guest) are unknown
to it: they count as referenced once and are never handed back to an allocator.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from ..alloc import Allocator
from ..memory.base import PhysMemory


@dataclass
class TableRegistry:
    refs: dict[int, int] = field(default_factory=dict)
    source: dict[int, Allocator] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)

    def refcount(self, pa: int) -> int:
        return self.refs.get(pa, 1)

    def known(self) -> int:
        """Tables the engine allocated and still references."""
        return len(self.source)


_STATE: weakref.WeakKeyDictionary[PhysMemory, dict[str, object]] = weakref.WeakKeyDictionary()
_STATE_BY_ID: dict[int, tuple[PhysMemory, dict[str, object]]] = {}


def memory_state(mem: PhysMemory) -> dict[str, object]:
    """Per-memory engine state (registry, default pools), dropped with the memory object."""
    try:
        st = _STATE.get(mem)
        if st is None:
            st = _STATE[mem] = {}
        return st
    except TypeError:  # a backend that is not hashable / weak-referenceable
        hit = _STATE_BY_ID.get(id(mem))
        if hit is None or hit[0] is not mem:
            hit = _STATE_BY_ID[id(mem)] = (mem, {})
        return hit[1]


def registry_for(mem: PhysMemory) -> TableRegistry:
    """The registry of tables living in ``mem`` (shared by every PageTable on it)."""
    st = memory_state(mem)
    reg = st.get("registry")
    if reg is None:
        reg = st["registry"] = TableRegistry()
    assert isinstance(reg, TableRegistry)
    return reg
