"""File-backed physical memory: segments of one file, read with ``pread``.

:class:`FileMemory` is the shared machinery (segment lookup, table reads, zero-filled tails,
bounded scans); :class:`RawImage` is a raw dump (``pmemsave``, ``/dev/mem`` copy, a RAM backing
file) described by a region list; :class:`ptlab.memory.elfcore.ElfCore` builds on the same base.

The file is read with ``os.pread``, not mapped: a dump truncated while in use then gives a short
read and :class:`FileChanged`, where a mapping would kill the process with SIGBUS. Only the
bytes asked for are read (a walk reads its tables, not the file). Files are opened with
``O_NONBLOCK`` and checked to be regular before anything is read, so a FIFO or a device given as
a dump is refused instead of blocking.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .base import MemoryError_, OutOfRange, PhysMemory

SCAN_CHUNK = 16 << 20  # bytes read at a time by FileMemory.find


class ImageError(MemoryError_, ValueError):
    """A memory image that cannot be opened or is described wrongly (one clear message)."""


class FileChanged(RuntimeError):
    """The file behind an open dump shrank (or failed to read) while in use: fatal, so it is
    not a :class:`MemoryError_` a walk would record as an anomaly and step over."""


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


def open_regular(path: str | os.PathLike[str], what: str = "") -> tuple[int, int]:
    """Open ``path`` read-only without blocking and check it is a regular file: (fd, size).

    A FIFO, socket or device raises :class:`ImageError` (opening a FIFO for reading would
    block until a writer comes)."""
    name = os.fspath(path)
    label = f"{what} {name}" if what else f"{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageError(f"cannot open {label}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{label} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def pread_exact(fd: int, size: int, offset: int, path: str) -> bytes:
    """``size`` bytes at file ``offset``; :class:`FileChanged` when the file ends early."""
    try:
        data = os.pread(fd, size, offset)
    except OSError as e:
        raise FileChanged(f"cannot read {path} at offset {offset:#x}: {e.strerror}") from None
    if len(data) != size:
        raise FileChanged(f"{path} ends before offset {offset + size:#x}: the file was "
                          "truncated while in use")
    return data


class FileMemory(PhysMemory):
    """Read-only physical memory over non-overlapping :class:`Segment` s of one file.

    Subclasses call :meth:`_attach` with the open descriptor and their segments.
    """

    path: str
    file_size: int  # bytes
    _fd: int | None = None

    def _attach(self, fd: int, size: int, segments: Iterable[Segment]) -> None:
        self._fd = fd
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

    def _pread(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            raise ImageError(f"{self.path} is closed")
        return pread_exact(self._fd, size, offset, self.path)

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
        s = self._find(pa)
        if s is not None and pa + size <= s.pa + s.filesz:  # the common case: one pread
            return self._pread(s.offset + pa - s.pa, size)
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
                out += self._pread(s.offset + rel, in_file)
            if n > in_file:
                out += bytes(n - in_file)
            pa, size = pa + n, size - n
        return bytes(out)

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")

    def read_table(self, pa: int, n: int) -> np.ndarray:
        """``n`` entries at ``pa`` (read-only): zeros in a zero-filled tail."""
        s = self._find(pa)
        nbytes = n * 8
        if s is not None and pa + nbytes <= s.end and pa - s.pa >= s.filesz:
            return np.zeros(n, dtype=np.uint64)
        return np.frombuffer(self.read(pa, nbytes), dtype="<u8")

    def find(self, needle: bytes, start: int = 0, limit: int | None = None) -> Iterator[int]:
        """PAs >= ``start`` where ``needle`` occurs in the file-backed bytes (within one
        segment), in PA order. Reads :data:`SCAN_CHUNK` bytes at a time (memory stays bounded),
        skips the file's holes (``SEEK_DATA``; ``needle`` must not be all zeros) and covers at
        most ``limit`` bytes of PA space in all when given."""
        if not needle.strip(b"\0"):
            raise ValueError("the needle must hold a non-zero byte")
        left = limit if limit is not None else 1 << 64
        for s in self.segments:
            if s.pa + s.filesz <= start:
                continue
            pos = s.offset + max(0, start - s.pa)
            hi = s.offset + s.filesz
            while pos < hi and left > 0:
                data_at = self._next_data(pos)
                if data_at > pos:  # a hole: zeros hold no match
                    left -= min(data_at, hi) - pos
                    pos = data_at
                    continue
                n = min(SCAN_CHUNK + len(needle) - 1, hi - pos, left + len(needle) - 1)
                data = self._pread(pos, n)
                i = data.find(needle)
                while i >= 0:
                    yield s.pa + pos + i - s.offset
                    i = data.find(needle, i + 1)
                step = min(SCAN_CHUNK, n)
                pos += step
                left -= step

    def _next_data(self, pos: int) -> int:
        """The first file offset >= ``pos`` that is not in a hole (``pos`` when the file
        system cannot tell; the file size when only holes remain)."""
        if self._fd is None:
            raise ImageError(f"{self.path} is closed")
        try:
            return os.lseek(self._fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                return max(pos, self.file_size)
            return pos

    def ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for s in self.segments:
            if out and out[-1][1] == s.pa:
                out[-1] = (out[-1][0], s.end)
            else:
                out.append((s.pa, s.end))
        return out

    def close(self) -> None:
        """Close the file. Arrays already returned stay valid (they are copies)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        if self._fd is not None:
            self.close()

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
    """A raw physical-memory image (read-only).

    ``regions`` lists ``(pa_base, file_offset, size)``; by default the whole file is PA 0
    onwards. Regions beyond the end of the file or overlapping in PA raise :class:`ImageError`
    (a ``ValueError``).
    """

    def __init__(
        self, path: str | os.PathLike[str], regions: Sequence[Region] | None = None
    ) -> None:
        self.path = os.fspath(path)
        fd, size = open_regular(path)
        try:
            if regions is None:
                if size == 0:
                    raise ImageError(f"{self.path} is empty")
                regions = [(0, 0, size)]
            if not regions:
                raise ImageError("no regions given")
            segs = check_regions(regions, size, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._attach(fd, size, segs)
