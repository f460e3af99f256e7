"""Sparse model RAM: page frames created on first write, zero elsewhere."""

from __future__ import annotations

import numpy as np

from .base import OutOfRange, PhysMemory


class SparseMemory(PhysMemory):
    """Model physical memory of ``size`` bytes, stored as 4 KiB frames of uint64 arrays.

    Unwritten memory reads as zero. Tables live here; the engine reads and writes whole
    tables as numpy arrays, so a table read is a view, not a copy.
    """

    FRAME_SHIFT = 12
    FRAME = 1 << FRAME_SHIFT

    def __init__(self, size: int = 1 << 52) -> None:
        self.size = size
        self._frames: dict[int, np.ndarray] = {}

    def contains(self, pa: int, size: int = 8) -> bool:
        return 0 <= pa and pa + size <= self.size

    def _check(self, pa: int, size: int) -> None:
        if not self.contains(pa, size):
            raise OutOfRange(f"PA {pa:#x}+{size:#x} outside model memory of {self.size:#x}")

    def _frame(self, pfn: int, create: bool) -> np.ndarray | None:
        f = self._frames.get(pfn)
        if f is None and create:
            f = self._frames[pfn] = np.zeros(self.FRAME // 8, dtype=np.uint64)
        return f

    def read(self, pa: int, size: int) -> bytes:
        self._check(pa, size)
        out = bytearray()
        while size > 0:
            pfn, off = divmod(pa, self.FRAME)
            n = min(size, self.FRAME - off)
            f = self._frames.get(pfn)
            out += f.view(np.uint8)[off : off + n].tobytes() if f is not None else bytes(n)
            pa, size = pa + n, size - n
        return bytes(out)

    def write(self, pa: int, data: bytes) -> None:
        self._check(pa, len(data))
        mv = memoryview(data)
        while mv:
            pfn, off = divmod(pa, self.FRAME)
            n = min(len(mv), self.FRAME - off)
            self._frame(pfn, True).view(np.uint8)[off : off + n] = np.frombuffer(mv[:n], np.uint8)
            pa, mv = pa + n, mv[n:]

    def read_u64(self, pa: int) -> int:
        if pa & 7 == 0 and 0 <= pa and pa + 8 <= self.size:
            f = self._frames.get(pa >> self.FRAME_SHIFT)
            return 0 if f is None else int(f[(pa & (self.FRAME - 1)) >> 3])
        return super().read_u64(pa)

    def write_u64(self, pa: int, value: int) -> None:
        if pa & 7 == 0 and 0 <= pa and pa + 8 <= self.size:
            self._frame(pa >> self.FRAME_SHIFT, True)[(pa & (self.FRAME - 1)) >> 3] = value
        else:
            super().write_u64(pa, value)

    def read_table(self, pa: int, n: int) -> np.ndarray:
        off = pa & (self.FRAME - 1)
        if off == 0 and n * 8 == self.FRAME and self.contains(pa, n * 8):
            f = self._frames.get(pa >> self.FRAME_SHIFT)
            return f if f is not None else np.zeros(n, dtype=np.uint64)
        if off & 7 == 0 and off + n * 8 <= self.FRAME and self.contains(pa, n * 8):
            f = self._frames.get(pa >> self.FRAME_SHIFT)
            if f is None:
                return np.zeros(n, dtype=np.uint64)
            return f[off >> 3 : (off >> 3) + n]
        per = self.FRAME // 8
        if off == 0 and n % per == 0 and self.contains(pa, n * 8):  # 16K/64K tables: a copy
            pfn, frames, get = pa >> self.FRAME_SHIFT, n // per, self._frames.get
            out = np.zeros(n, dtype=np.uint64)
            for i in range(frames):
                f = get(pfn + i)
                if f is not None:
                    out[i * per : (i + 1) * per] = f
            return out
        return np.frombuffer(self.read(pa, n * 8), dtype="<u8").astype(np.uint64)

    def write_table(self, pa: int, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.uint64)
        off = pa & (self.FRAME - 1)
        if off & 7 == 0 and off + values.size * 8 <= self.FRAME:
            self._check(pa, values.size * 8)
            self._frame(pa >> self.FRAME_SHIFT, True)[off >> 3 : (off >> 3) + values.size] = values
        elif off == 0 and values.size % (per := self.FRAME // 8) == 0:  # 16K/64K tables
            self._check(pa, values.size * 8)
            pfn, frame = pa >> self.FRAME_SHIFT, self._frame
            for i in range(values.size // per):
                frame(pfn + i, True)[:] = values[i * per : (i + 1) * per]
        else:
            super().write_table(pa, values)

    def zero(self, pa: int, size: int) -> None:
        """Zero [pa, pa+size); frames fully covered are dropped."""
        self._check(pa, size)
        end = pa + size
        while pa < end:
            pfn, off = divmod(pa, self.FRAME)
            n = min(end - pa, self.FRAME - off)
            if n == self.FRAME:
                self._frames.pop(pfn, None)
            elif (f := self._frames.get(pfn)) is not None:
                f.view(np.uint8)[off : off + n] = 0
            pa += n

    def frames_in_use(self) -> int:
        return len(self._frames)

    def snapshot(self) -> dict[int, bytes]:
        """All non-zero frames' bytes (for all-or-nothing checks)."""
        return {pfn: f.tobytes() for pfn, f in self._frames.items() if f.any()}

    def ranges(self) -> list[tuple[int, int]]:
        return [(0, self.size)]
