"""A copy of a stopped guest's shared-file RAM, put back in place by the harness.

QEMU's ``savevm``/``loadvm`` with the migration capability ``x-ignore-shared`` skip RAM blocks
that are shared (``ramblock_is_ignored`` in QEMU 7.2's migration/ram.c: not migratable, or
ignore-shared and ``qemu_ram_is_shared``), so they save and load only device and CPU state.
:class:`RamSnapshot` keeps the RAM part: the file's data extents (``SEEK_DATA``/``SEEK_HOLE``
on tmpfs: a guest touches a fraction of its RAM, the rest is a hole) copied into private
memory. :meth:`RamSnapshot.restore` writes back every saved extent that changed and punches
holes where the guest wrote since (``MADV_REMOVE``), leaving the file as it was.

The file is reached through QEMU's own descriptor (``/proc/<pid>/fd/N``): the harness unlinks
RAM files as soon as they are mapped.

One hazard: ``loadvm`` resets the machine first, and the reset copies every ROM blob that lives
in RAM (``rom_reset`` in hw/core/loader.c: ``-kernel``'s Image or PVH ELF segments, the
initrd, the DTB) over guest RAM *before* the devices' state is loaded, and virtio's
``virtio_load`` then reads each virtqueue's ring indices from that RAM. A kernel that freed its
initrd or init sections may have put a ring there (arm64: the virtio-net control queue inside
the freed initrd). :func:`rings_hit_roms` tells; the harness then checkpoints with RAM.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHUNK = 1 << 20  # bytes compared (and rewritten when different) at a time


def qemu_fd_of(pid: int, path: Path) -> Path:
    """``/proc/<pid>/fd/N`` of the file QEMU opened at ``path`` (unlinked or not)."""
    fds = Path(f"/proc/{pid}/fd")
    want = (str(path), f"{path} (deleted)")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) in want:
                return fd
        except OSError:
            continue
    raise FileNotFoundError(f"QEMU (pid {pid}) has no descriptor for {path}")


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of ``fd`` holding data (everything else is a hole)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


@dataclass
class RamSnapshot:
    """The data of one RAM backend file at one moment (its holes are implied)."""

    path: Path  # /proc/<pid>/fd/N
    size: int
    extents: list[tuple[int, int]] = field(default_factory=list)
    saved: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def take(cls, path: Path, size: int) -> RamSnapshot:
        fd = os.open(path, os.O_RDONLY)
        try:
            extents = data_extents(fd, size)
            saved = []
            for start, end in extents:
                buf = np.empty(end - start, dtype=np.uint8)
                got = os.preadv(fd, [buf], start)
                if got != end - start:
                    raise OSError(f"short read of {path} at {start:#x}: {got} bytes")
                saved.append(buf)
        finally:
            os.close(fd)
        return cls(path, size, extents, saved)

    @property
    def nbytes(self) -> int:
        return sum(b.size for b in self.saved)

    def restore(self, m: mmap.mmap) -> int:
        """Make the file hold the saved data again, writing through ``m`` (a shared mapping
        of the whole file, e.g. the harness's own); returns the bytes rewritten."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            now = data_extents(fd, self.size)
        finally:
            os.close(fd)
        for start, end in _subtract(now, self.extents):
            lo, hi = start & ~(mmap.PAGESIZE - 1), -(-end // mmap.PAGESIZE) * mmap.PAGESIZE
            m.madvise(mmap.MADV_REMOVE, lo, min(hi, self.size) - lo)
        return _copy_changed(m, self.extents, self.saved)


def _copy_changed(m: mmap.mmap, extents: list[tuple[int, int]], saved: list[np.ndarray]) -> int:
    """Write each saved chunk whose bytes in ``m`` differ; returns the bytes written. (Its
    numpy views of ``m`` end with the call, so that the caller can close ``m``.)"""
    ram = np.frombuffer(m, dtype=np.uint8)
    written = 0
    for (start, _end), buf in zip(extents, saved, strict=True):
        for off in range(0, buf.size, CHUNK):
            want = buf[off : off + CHUNK]
            have = ram[start + off : start + off + want.size]
            if want.size % 8 == 0:  # compared as 64-bit words: 8x fewer elements
                same = np.array_equal(have.view("<u8"), want.view("<u8"))
            else:
                same = np.array_equal(have, want)
            if not same:
                have[:] = want
                written += want.size
    return written


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of the sorted ranges ``a`` not covered by the sorted ranges ``b``."""
    out: list[tuple[int, int]] = []
    j = 0
    for start, end in a:
        pos = start
        while j < len(b) and b[j][1] <= pos:
            j += 1
        k = j
        while pos < end:
            if k >= len(b) or b[k][0] >= end:
                out.append((pos, end))
                break
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
    return out


_ROM = re.compile(r"^addr=([0-9a-fA-F]+) size=0x([0-9a-fA-F]+) mem=ram ", re.MULTILINE)


def ram_roms(info_roms: str) -> list[tuple[int, int]]:
    """[start, end) guest-physical ranges of the ROM blobs in RAM (HMP ``info roms``)."""
    return [(int(a, 16), int(a, 16) + int(n, 16)) for a, n in _ROM.findall(info_roms)]


def vring_ranges(status: dict) -> list[tuple[int, int]]:
    """[start, end) of a virtqueue's descriptor table, avail and used rings (QMP
    ``x-query-virtio-queue-status``; split rings: 16, 2 and 8 bytes per entry plus headers)."""
    num = int(status.get("vring-num", 0))
    desc = int(status.get("vring-desc", 0))
    if not num or not desc:
        return []
    avail, used = int(status["vring-avail"]), int(status["vring-used"])
    return [(desc, desc + 16 * num), (avail, avail + 6 + 2 * num), (used, used + 6 + 8 * num)]


def rings_hit_roms(rings: Iterable[tuple[int, int]], roms: Iterable[tuple[int, int]]) -> bool:
    """Whether any ring range overlaps any ROM range."""
    roms = list(roms)
    return any(a < re and ra < b for a, b in rings for ra, re in roms)
