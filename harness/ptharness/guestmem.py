"""Live guest physical memory as ptlab :class:`PhysMemory` backends.

:class:`SharedRAM` maps the files behind QEMU's ``memory-backend-file,share=on`` RAM: reads
are views of the guest's own pages (zero copy; a running guest changes them under you, so stop
it for a consistent walk). :class:`PmemsaveRAM` works for any QEMU with a QMP socket: it
asks QMP ``pmemsave`` for whole chunks into a file and caches them until :meth:`invalidate`.
:func:`planted_u64` changes one u64 (a page-table entry) of a stopped guest for a block.
"""

from __future__ import annotations

import bisect
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ptlab.memory import OutOfRange, PhysMemory
from ptlab.memory.base import SpanMemory, find_range


@dataclass(frozen=True, slots=True)
class Region:
    """Guest-physical [pa, pa+size) backed by ``buf[offset : offset+size]``."""

    pa: int
    size: int
    buf: mmap.mmap
    offset: int
    name: str

    @property
    def end(self) -> int:
        return self.pa + self.size


class SharedRAM(SpanMemory):
    """Guest RAM read (and written) in place through mmaps of shared backend files."""

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._maps: dict[str, mmap.mmap] = {}

    def map_file(self, name: str, path: Path | str, size: int, *, writable: bool = True) -> None:
        """mmap backend ``name``'s file (``size`` bytes, shared with QEMU)."""
        if name in self._maps:
            raise ValueError(f"backend {name!r} is mapped already")
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags)
        try:
            if os.fstat(fd).st_size < size:
                raise ValueError(f"{path} holds {os.fstat(fd).st_size:#x} bytes, need {size:#x}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._maps[name] = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)

    def add_range(self, pa: int, size: int, name: str, offset: int = 0) -> None:
        """Make [pa, pa+size) read from mapped backend ``name`` at ``offset``."""
        buf = self._maps.get(name)
        if buf is None:
            raise ValueError(f"backend {name!r} is not mapped")
        if size <= 0 or offset < 0 or offset + size > len(buf):
            raise ValueError(f"range {offset:#x}+{size:#x} outside backend {name!r}")
        i = bisect.bisect_right(self._starts, pa)
        if (i > 0 and self._regions[i - 1].end > pa) or (
            i < len(self._regions) and self._regions[i].pa < pa + size
        ):
            raise ValueError(f"PA range {pa:#x}+{size:#x} overlaps a mapped range")
        self._regions.insert(i, Region(pa, size, buf, offset, name))
        self._starts.insert(i, pa)

    def drop(self, name: str) -> None:
        """Forget backend ``name``: its ranges and its mapping."""
        keep = [r for r in self._regions if r.name != name]
        self._regions, self._starts = keep, [r.pa for r in keep]
        buf = self._maps.pop(name, None)
        if buf is not None:
            _close_map(buf)

    def ranges(self) -> list[tuple[int, int]]:
        return [(r.pa, r.end) for r in self._regions]

    def backends(self) -> list[str]:
        return list(self._maps)

    def layout(self) -> list[tuple[int, int, str, int]]:
        """(PA, size, backend, offset in the backend's file) of each mapped range."""
        return [(r.pa, r.size, r.name, r.offset) for r in self._regions]

    def backend_map(self, name: str) -> mmap.mmap:
        """The shared mapping of backend ``name`` (whole file, file offsets)."""
        return self._maps[name]

    def _find(self, pa: int, size: int) -> Region:
        return find_range(self._starts, self._regions, pa, size)


    def read(self, pa: int, size: int) -> bytes:
        r = self._find(pa, size)
        off = r.offset + pa - r.pa
        return r.buf[off : off + size]

    def write(self, pa: int, data: bytes) -> None:
        r = self._find(pa, len(data))
        off = r.offset + pa - r.pa
        r.buf[off : off + len(data)] = data

    def read_u64(self, pa: int) -> int:
        r = self._find(pa, 8)
        return int.from_bytes(r.buf[r.offset + pa - r.pa : r.offset + pa - r.pa + 8], "little")

    def read_table(self, pa: int, n: int) -> np.ndarray:
        """A uint64 view of guest RAM (no copy); it changes if the guest runs."""
        r = self._find(pa, n * 8)
        return np.frombuffer(r.buf, dtype="<u8", count=n, offset=r.offset + pa - r.pa)

    def view(self, pa: int, size: int) -> memoryview:
        """A zero-copy byte view of [pa, pa+size)."""
        r = self._find(pa, size)
        off = r.offset + pa - r.pa
        return memoryview(r.buf)[off : off + size]

    def close(self) -> None:
        for buf in self._maps.values():
            _close_map(buf)
        self._maps.clear()
        self._regions, self._starts = [], []


def _close_map(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:
        # numpy views still reference the map; it is unmapped when the last one goes away.
        pass


@contextmanager
def planted_u64(mem: PhysMemory, pa: int, value: int) -> Iterator[int]:
    """Write the u64 ``value`` at guest-physical ``pa`` for the duration of the block and put
    the old value back afterwards, also on errors; yields the old value.

    For planting one page-table entry in a *stopped* guest (a running one may rewrite the
    entry itself, or cache it in its TLB). Raises ValueError, writing nothing, if ``pa`` is not
    8-byte aligned or ``value`` is not a u64; OutOfRange if ``pa`` is not guest RAM.
    """
    if pa % 8 or not 0 <= value < 1 << 64:
        raise ValueError(f"cannot plant {value:#x} at PA {pa:#x}: need an aligned u64")
    old = mem.read_u64(pa)
    mem.write_u64(pa, value)
    try:
        yield old
    finally:
        mem.write_u64(pa, old)


Dump = Callable[[int, int, Path], None]  # (pa, size, file) -> writes guest bytes into file


class PmemsaveRAM(PhysMemory):
    """Guest RAM read through a dump function (QMP ``pmemsave``), chunk by chunk, cached.

    ``ranges`` are the guest's RAM ranges; reads outside them raise OutOfRange. The cache is
    never refreshed on its own: call :meth:`invalidate` after the guest ran.
    """

    def __init__(
        self,
        dump: Dump,
        ranges: Iterable[tuple[int, int]],
        workdir: Path | str,
        *,
        chunk: int = 2 << 20,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if chunk <= 0 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two, not {chunk}")
        self._dump = dump
        self._ranges = sorted((int(a), int(b)) for a, b in ranges if b > a)
        self._starts = [a for a, _ in self._ranges]
        self._file = Path(workdir) / f"pmemsave-{os.getpid()}-{id(self):x}.bin"
        self.chunk = chunk
        self._cache: dict[int, bytes] = {}
        self._on_close = on_close
        self.dumps = 0  # pmemsave calls made (for measurements)

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def contains(self, pa: int, size: int = 8) -> bool:
        i = bisect.bisect_right(self._starts, pa) - 1
        return i >= 0 and size >= 0 and pa + size <= self._ranges[i][1]

    def invalidate(self) -> None:
        """Drop cached chunks (the guest may have changed its memory)."""
        self._cache.clear()

    def _chunk(self, base: int) -> bytes:
        data = self._cache.get(base)
        if data is None:
            # Dump only the parts of the chunk that are RAM (pmemsave outside RAM fails);
            # the rest stays zero and is never returned (read() checks contains()).
            buf = bytearray(self.chunk)
            for lo, hi in self._ranges:
                start, end = max(base, lo), min(base + self.chunk, hi)
                if start >= end:
                    continue
                try:
                    self._dump(start, end - start, self._file)
                    got = self._file.read_bytes()
                finally:
                    self._file.unlink(missing_ok=True)
                self.dumps += 1
                if len(got) != end - start:
                    raise OutOfRange(
                        f"pmemsave of {start:#x}+{end - start:#x} returned {len(got)} bytes"
                    )
                buf[start - base : end - base] = got
            data = self._cache[base] = bytes(buf)
        return data

    def read(self, pa: int, size: int) -> bytes:
        if not self.contains(pa, size):
            raise OutOfRange(f"PA {pa:#x}+{size:#x} is not in guest RAM")
        out = bytearray()
        while size > 0:
            base = pa & ~(self.chunk - 1)
            n = min(size, base + self.chunk - pa)
            out += self._chunk(base)[pa - base : pa - base + n]
            pa, size = pa + n, size - n
        return bytes(out)

    def close(self) -> None:
        self._cache.clear()
        self._file.unlink(missing_ok=True)
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def attach_pmemsave(
    qmp_socket: Path | str, workdir: Path | str, *, chunk: int = 2 << 20, timeout: float = 10.0
) -> PmemsaveRAM:
    """A :class:`PmemsaveRAM` over any QEMU reachable on ``qmp_socket`` (one we did not start):
    RAM ranges from ``info mtree -f``, bytes via ``pmemsave`` into ``workdir`` (which QEMU must
    be able to write). Closing it closes the QMP connection."""
    from .qmp import Monitor, parse_mtree_ram

    mon = Monitor(qmp_socket, timeout=timeout)
    mon.connect(time.monotonic() + timeout)
    try:
        ranges = [(r.pa, r.end) for r in parse_mtree_ram(mon.hmp("info mtree -f"))]
    except BaseException:
        mon.close()
        raise

    def dump(pa: int, size: int, path: Path) -> None:
        mon.cmd("pmemsave", val=pa, size=size, filename=str(path))

    return PmemsaveRAM(dump, ranges, workdir, chunk=chunk, on_close=mon.close)
