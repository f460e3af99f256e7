"""File-backed physical memory: segments of one file mapped read-only with mmap.

:class:`FileMemory` is the shared machinery (segment lookup, zero-copy table reads, zero-filled
tails); :class:`RawImage` is a raw dump (``pmemsave``, ``/dev/mem`` copy, a RAM backing file)
described by a region list; :class:`ptlab.memory.elfcore.ElfCore` builds on the same base.
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .base import MemoryError_, OutOfRange, PhysMemory


class ImageError(MemoryError_, ValueError):
    """A memory image that cannot be opened or is described wrongly (one clear message)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """``memsz`` bytes of physical memory at ``pa``; the first ``filesz`` live in the file at
    ``offset``, the rest read as zero (an ELF PT_LOAD with p_filesz < p_memsz)."""

    pa: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.pa + self.memsz


def _open_map(path: str | os.PathLike[str]) -> tuple[mmap.mmap | None, int]:
    """Map ``path`` read-only; (None, 0) for an empty file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ImageError(f"cannot open {os.fspath(path)!s}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{os.fspath(path)!s} is not a regular file")
        if st.st_size == 0:
            return None, 0
        return mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ), st.st_size
    except OSError as e:
        raise ImageError(f"cannot map {os.fspath(path)!s}: {e.strerror}") from None
    finally:
        os.close(fd)


class FileMemory(PhysMemory):
    """Read-only physical memory over non-overlapping :class:`Segment` s of one mapped file.

    Table reads inside one segment are zero-copy ``np.frombuffer`` views of the mapping.
    Subclasses call :meth:`_attach` with the mapping and their segments.
    """

    path: str
    file_size: int  # bytes

    def _attach(self, mm: mmap.mmap | None, size: int, segments: Iterable[Segment]) -> None:
        self._mm = mm
        self.file_size = size
        segs = sorted((s for s in segments if s.memsz > 0), key=lambda s: s.pa)
        self.segments: list[Segment] = segs
        self._starts = [s.pa for s in segs]
        self._last = segs[0] if segs else None

    # --- lookup ---------------------------------------------------------------------------
    def _find(self, pa: int) -> Segment | None:
        s = self._last
        if s is not None and s.pa <= pa < s.end:
            return s
        i = bisect.bisect_right(self._starts, pa) - 1
        if i >= 0:
            s = self.segments[i]
            if pa < s.end:
                self._last = s
                return s
        return None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise ImageError(f"{self.path} is closed")
        return self._mm

    # --- PhysMemory -----------------------------------------------------------------------
    def contains(self, pa: int, size: int = 8) -> bool:
        end = pa + size
        while pa < end:
            s = self._find(pa)
            if s is None:
                return False
            pa = s.end
        return True

    def read(self, pa: int, size: int) -> bytes:
        if size < 0 or pa < 0:
            raise OutOfRange(f"bad read PA {pa:#x} size {size}")
        mm = self._map()
        out = bytearray()
        want_pa, want = pa, size
        while size > 0:
            s = self._find(pa)
            if s is None:
                raise OutOfRange(
                    f"PA {want_pa:#x}+{want:#x} not backed by {self.path} (hole at {pa:#x})"
                )
            n = min(size, s.end - pa)
            rel = pa - s.pa
            in_file = max(0, min(n, s.filesz - rel))
            if in_file:
                out += mm[s.offset + rel : s.offset + rel + in_file]
            if n > in_file:
                out += bytes(n - in_file)
            pa, size = pa + n, size - n
        return bytes(out)

    def read_u64(self, pa: int) -> int:
        s = self._find(pa)
        if s is not None and pa + 8 <= s.pa + s.filesz:
            off = s.offset + pa - s.pa
            return int.from_bytes(self._map()[off : off + 8], "little")
        return int.from_bytes(self.read(pa, 8), "little")

    def read_table(self, pa: int, n: int) -> np.ndarray:
        """``n`` entries at ``pa``: a read-only view of the mapping when inside one segment's
        file part, zeros in a zero-filled tail, else a copy."""
        s = self._find(pa)
        nbytes = n * 8
        if s is not None and pa + nbytes <= s.end:
            rel = pa - s.pa
            if rel + nbytes <= s.filesz:
                return np.frombuffer(self._map(), dtype="<u8", count=n, offset=s.offset + rel)
            if rel >= s.filesz:
                return np.zeros(n, dtype=np.uint64)
        return np.frombuffer(self.read(pa, nbytes), dtype="<u8")

    def find(self, needle: bytes, start: int = 0) -> Iterator[int]:
        """PAs >= ``start`` where ``needle`` occurs in the file-backed bytes (within one
        segment), in PA order; a memmem scan of the mapping."""
        mm = self._map()
        for s in self.segments:
            if s.pa + s.filesz <= start:
                continue
            lo = s.offset + max(0, start - s.pa)
            hi = s.offset + s.filesz
            while (at := mm.find(needle, lo, hi)) >= 0:
                yield s.pa + at - s.offset
                lo = at + 1

    def ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for s in self.segments:
            if out and out[-1][1] == s.pa:
                out[-1] = (out[-1][0], s.end)
            else:
                out.append((s.pa, s.end))
        return out

    def close(self) -> None:
        """Unmap the file. Table views still alive keep the mapping until they are freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views exported: the mapping is released with the last of them

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} {len(self.segments)} segments>"


Region = tuple[int, int, int]


def check_regions(regions: Sequence[Region], file_size: int, path: str) -> list[Segment]:
    """Validate ``(pa, file_offset, size)`` regions against a file of ``file_size`` bytes."""
    segs = []
    for i, r in enumerate(regions):
        try:
            pa, off, size = (int(x) for x in r)
        except (TypeError, ValueError):
            raise ImageError(f"region #{i} {r!r} is not (pa, file_offset, size)") from None
        if pa < 0 or off < 0 or size <= 0 or pa + size > 1 << 64:
            raise ImageError(
                f"region #{i} (pa={pa:#x}, offset={off:#x}, size={size:#x}): "
                "needs pa >= 0, offset >= 0, size > 0 and pa+size <= 2**64"
            )
        if off + size > file_size:
            raise ImageError(
                f"region #{i} (pa={pa:#x}, offset={off:#x}, size={size:#x}) ends at file offset "
                f"{off + size:#x}, beyond the end of {path} ({file_size:#x} bytes)"
            )
        segs.append(Segment(pa, off, size, size))
    segs.sort(key=lambda s: s.pa)
    for a, b in zip(segs, segs[1:], strict=False):
        if b.pa < a.end:
            raise ImageError(
                f"regions overlap in PA: [{a.pa:#x}, {a.end:#x}) and [{b.pa:#x}, {b.end:#x})"
            )
    return segs


class RawImage(FileMemory):
    """A raw physical-memory image read through mmap (read-only).

    ``regions`` lists ``(pa_base, file_offset, size)``; by default the whole file is PA 0
    onwards. Regions beyond the end of the file or overlapping in PA raise :class:`ImageError`
    (a ``ValueError``).
    """

    def __init__(
        self, path: str | os.PathLike[str], regions: Sequence[Region] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._mm = None
        mm, size = _open_map(path)
        try:
            if regions is None:
                if size == 0:
                    raise ImageError(f"{self.path} is empty")
                regions = [(0, 0, size)]
            if not regions:
                raise ImageError("no regions given")
            segs = check_regions(regions, size, self.path)
        except BaseException:
            if mm is not None:
                mm.close()
            raise
        self._attach(mm, size, segs)
