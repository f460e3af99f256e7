"""Copy-on-write physical memory over any :class:`PhysMemory`.

The model's edits to a stopped guest's tables land here, never in the guest: reads fall
through to the *base* memory until a frame is written, a write copies the frame into a
private page first, and the base is never written. ``scratch`` ranges are extra physical
memory that exists only in the overlay (reads as zero), e.g. the model's own table pool
when the guest has no free RAM the model may claim. :meth:`written` and :meth:`changes`
tell what the model wrote; :meth:`discard` forgets it all.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .base import OutOfRange, PhysMemory

FRAME_SHIFT = 12
FRAME = 1 << FRAME_SHIFT
_WORDS = FRAME // 8


class OverlayMemory(PhysMemory):
    """``base`` seen through private 4 KiB frames; ``scratch``: [start, end) ranges that
    exist only in the overlay (zero until written). The base is never written."""

    def __init__(self, base: PhysMemory, scratch: Iterable[tuple[int, int]] = ()) -> None:
        self.base = base
        self.scratch = sorted((int(s), int(e)) for s, e in scratch)
        for s, e in self.scratch:
            if s < 0 or e <= s or s % FRAME or e % FRAME:
                raise ValueError(f"scratch range [{s:#x}, {e:#x}) is not a non-empty "
                                 "4 KiB-aligned range")
            if any(base.contains(a, 8) for a in (s, e - 8)):
                raise ValueError(f"scratch range [{s:#x}, {e:#x}) overlaps the base memory")
        self._frames: dict[int, np.ndarray] = {}

    # --- where bytes live ---------------------------------------------------------------
    def _in_scratch(self, pa: int, size: int) -> bool:
        return any(s <= pa and pa + size <= e for s, e in self.scratch)

    def contains(self, pa: int, size: int = 8) -> bool:
        return pa >= 0 and size >= 0 and (
            self._in_scratch(pa, size) or self.base.contains(pa, size))

    def _check(self, pa: int, size: int) -> None:
        if not self.contains(pa, size):
            raise OutOfRange(f"PA {pa:#x}+{size:#x} is neither in the base memory nor in "
                             "the overlay's scratch ranges")

    def _private(self, pfn: int) -> np.ndarray:
        """The private copy of frame ``pfn``, made from the base (or zeros) on first use."""
        f = self._frames.get(pfn)
        if f is None:
            pa = pfn << FRAME_SHIFT
            if self._in_scratch(pa, FRAME):
                f = np.zeros(_WORDS, dtype=np.uint64)
            else:
                f = np.frombuffer(self.base.read(pa, FRAME), dtype="<u8").astype(np.uint64)
            self._frames[pfn] = f
        return f

    # --- PhysMemory -----------------------------------------------------------------------
    def read(self, pa: int, size: int) -> bytes:
        self._check(pa, size)
        out = bytearray()
        while size > 0:
            pfn, off = divmod(pa, FRAME)
            n = min(size, FRAME - off)
            f = self._frames.get(pfn)
            if f is not None:
                out += f.view(np.uint8)[off : off + n].tobytes()
            elif self._in_scratch(pa, n):
                out += bytes(n)
            else:
                out += self.base.read(pa, n)
            pa, size = pa + n, size - n
        return bytes(out)

    def write(self, pa: int, data: bytes) -> None:
        self._check(pa, len(data))
        mv = memoryview(bytes(data))
        while mv:
            pfn, off = divmod(pa, FRAME)
            n = min(len(mv), FRAME - off)
            self._private(pfn).view(np.uint8)[off : off + n] = np.frombuffer(mv[:n], np.uint8)
            pa, mv = pa + n, mv[n:]

    def read_u64(self, pa: int) -> int:
        f = self._frames.get(pa >> FRAME_SHIFT)
        if f is not None and pa & 7 == 0:
            return int(f[(pa & (FRAME - 1)) >> 3])
        return super().read_u64(pa)

    def write_u64(self, pa: int, value: int) -> None:
        if pa & 7 == 0 and pa >= 0 and self.contains(pa, 8):
            self._private(pa >> FRAME_SHIFT)[(pa & (FRAME - 1)) >> 3] = value
        else:
            super().write_u64(pa, value)

    def read_table(self, pa: int, n: int) -> np.ndarray:
        first, last = pa >> FRAME_SHIFT, (pa + n * 8 - 1) >> FRAME_SHIFT
        frames = self._frames
        if first == last:  # the common case: one table in one frame
            f = frames.get(first)
            if f is not None and pa & 7 == 0:
                off = (pa & (FRAME - 1)) >> 3
                return f[off : off + n]
        if not any(p in frames for p in range(first, last + 1)):
            if self._in_scratch(pa, n * 8):
                return np.zeros(n, dtype=np.uint64)
            return self.base.read_table(pa, n)  # untouched: the base's own (fast) read
        return np.frombuffer(self.read(pa, n * 8), dtype="<u8").astype(np.uint64)

    def write_table(self, pa: int, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.uint64)
        off = pa & (FRAME - 1)
        if off & 7 == 0 and off + values.size * 8 <= FRAME and self.contains(pa, values.size * 8):
            self._private(pa >> FRAME_SHIFT)[off >> 3 : (off >> 3) + values.size] = values
        else:
            self.write(pa, values.astype("<u8").tobytes())

    def zero(self, pa: int, size: int) -> None:
        """Zero [pa, pa+size) in the overlay (table pools zero pages through this)."""
        self.write(pa, bytes(size))

    def ranges(self) -> list[tuple[int, int]]:
        return sorted(self.base.ranges() + self.scratch)

    # --- what the model wrote -------------------------------------------------------------
    def written(self) -> list[int]:
        """PAs of the frames the overlay holds privately, ascending."""
        return sorted(p << FRAME_SHIFT for p in self._frames)

    def changes(self) -> list[tuple[int, int, int]]:
        """(pa, base value, overlay value) of every u64 that now differs from the base
        (scratch memory counts as zero in the base)."""
        out: list[tuple[int, int, int]] = []
        for pfn in sorted(self._frames):
            pa = pfn << FRAME_SHIFT
            mine = self._frames[pfn]
            if self._in_scratch(pa, FRAME):
                old = np.zeros(_WORDS, dtype=np.uint64)
            else:
                old = np.frombuffer(self.base.read(pa, FRAME), dtype="<u8")
            for i in np.flatnonzero(mine != old).tolist():
                out.append((pa + 8 * i, int(old[i]), int(mine[i])))
        return out

    def discard(self) -> None:
        """Forget every private frame: the overlay reads as the base again."""
        self._frames.clear()
