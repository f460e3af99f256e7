"""The memory layer: one small interface over physical memory, many backends."""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np


class MemoryError_(Exception):
    """Base of memory-backend errors."""


class OutOfRange(MemoryError_):
    """A physical address the backend does not hold."""


class PhysMemory(ABC):
    """Physical memory as the page-table code sees it (little-endian u64 entries)."""

    @abstractmethod
    def read(self, pa: int, size: int) -> bytes:
        """``size`` bytes at ``pa``; raises OutOfRange if any byte is not backed."""

    def write(self, pa: int, data: bytes) -> None:
        raise PermissionError(f"{type(self).__name__} is read-only")

    @abstractmethod
    def contains(self, pa: int, size: int = 8) -> bool:
        """Whether [pa, pa+size) is backed."""

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, int(value).to_bytes(8, "little"))

    def read_table(self, pa: int, n: int) -> np.ndarray:
        """``n`` u64 entries at ``pa`` as a uint64 array (may be a read-only view)."""
        return np.frombuffer(self.read(pa, n * 8), dtype="<u8")

    def write_table(self, pa: int, values: np.ndarray) -> None:
        self.write(pa, np.asarray(values, dtype="<u8").tobytes())

    def ranges(self) -> list[tuple[int, int]]:
        """Backed physical ranges as [start, end) pairs, if known."""
        return []

    def close(self) -> None:
        """Release files/mappings held by the backend."""
        return None

    def __enter__(self) -> PhysMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Span(Protocol):
    @property
    def end(self) -> int: ...


S = TypeVar("S", bound=_Span)


def find_range(starts: Sequence[int], spans: Sequence[S], pa: int, size: int) -> S:
    """The span of ``spans`` (sorted, non-overlapping, ``starts`` their first PAs) holding all
    of [pa, pa+size); OutOfRange otherwise."""
    i = bisect.bisect_right(starts, pa) - 1
    if i >= 0 and size >= 0 and pa + size <= spans[i].end:
        return spans[i]
    raise OutOfRange(f"PA {pa:#x}+{size:#x} is not in guest RAM")


class SpanMemory(PhysMemory):
    """Physical memory made of sorted spans (guest RAM regions): ``_find`` gives the span
    holding a range (e.g. with :func:`find_range`), ``contains`` follows from it."""

    @abstractmethod
    def _find(self, pa: int, size: int) -> object:
        """The span holding all of [pa, pa+size); OutOfRange otherwise."""

    def contains(self, pa: int, size: int = 8) -> bool:
        try:
            self._find(pa, size)
        except OutOfRange:
            return False
        return True
