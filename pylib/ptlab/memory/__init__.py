"""Physical-memory backends behind one interface (:class:`PhysMemory`)."""

from .base import MemoryError_, OutOfRange, PhysMemory
from .sparse import SparseMemory

__all__ = ["MemoryError_", "OutOfRange", "PhysMemory", "SparseMemory"]
