"""ptharness.ramsnap: a RAM file's data saved and put back (holes, changed chunks), ROM hazard."""

from __future__ import annotations

import mmap
import os
import tempfile

import pytest
from ptharness.ramsnap import (
    RamSnapshot,
    _subtract,
    data_extents,
    ram_roms,
    rings_hit_roms,
    vring_ranges,
)

PAGE = mmap.PAGESIZE
SIZE = 64 * PAGE


@pytest.fixture
def ramfile():
    """A sparse file in /dev/shm (tmpfs: SEEK_DATA/SEEK_HOLE per page) and a shared map."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="ptlab-unit-ram-", dir=base)
    os.ftruncate(fd, SIZE)
    m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        yield path, fd, m
    finally:
        m.close()
        os.close(fd)
        os.unlink(path)


def test_subtract() -> None:
    assert _subtract([(0, 10)], []) == [(0, 10)]
    assert _subtract([(0, 10)], [(0, 10)]) == []
    assert _subtract([(0, 10), (20, 30)], [(5, 25)]) == [(0, 5), (25, 30)]
    assert _subtract([(0, 30)], [(2, 4), (6, 8), (40, 50)]) == [(0, 2), (4, 6), (8, 30)]


def test_snapshot_restores_data_and_holes(ramfile) -> None:
    path, fd, m = ramfile
    m[3 * PAGE : 3 * PAGE + 5] = b"hello"
    m[10 * PAGE : 12 * PAGE] = b"\x11" * (2 * PAGE)
    extents = data_extents(fd, SIZE)
    if extents == [(0, SIZE)]:
        pytest.skip("this file system reports no holes")
    assert extents == [(3 * PAGE, 4 * PAGE), (10 * PAGE, 12 * PAGE)]
    snap = RamSnapshot.take(path, SIZE)
    assert snap.nbytes == 3 * PAGE
    before = os.pread(fd, SIZE, 0)  # (reads through the map would fill the holes)
    m[3 * PAGE : 3 * PAGE + 5] = b"HELLO"  # changed data
    m[40 * PAGE : 40 * PAGE + 1] = b"x"  # new data in a hole
    assert snap.restore(m) == PAGE  # only the changed extent (one page) rewritten
    assert os.pread(fd, SIZE, 0) == before
    assert data_extents(fd, SIZE) == extents  # the new page is a hole again
    assert snap.restore(m) == 0  # nothing left to do


def test_rom_hazard() -> None:
    roms = ram_roms(
        'fw=genroms/pvh.bin size=0x000600 name="pvh.bin"\n'
        'addr=0000000048000000 size=0x6cdf0c mem=ram name="initrd.img"\n'
        'addr=00000000fffc0000 size=0x040000 mem=rom name="bios-256k.bin"\n')
    assert roms == [(0x4800_0000, 0x4800_0000 + 0x6C_DF0C)]
    ring = vring_ranges({"vring-num": 0x40, "vring-desc": 0x4851_6000,
                         "vring-avail": 0x4851_6400, "vring-used": 0x4851_64C0})
    assert ring[0] == (0x4851_6000, 0x4851_6400)
    assert rings_hit_roms(ring, roms)
    far = vring_ranges({"vring-num": 0x100, "vring-desc": 0x4894_0000,
                        "vring-avail": 0x4894_1000, "vring-used": 0x4894_1240})
    assert not rings_hit_roms(far, roms)
    assert vring_ranges({"vring-num": 0, "vring-desc": 0}) == []
