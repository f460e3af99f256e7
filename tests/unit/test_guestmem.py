"""Guest-memory backends over files: shared-RAM mmaps and the pmemsave chunk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ptharness.guestmem import PmemsaveRAM, SharedRAM
from ptlab.memory import OutOfRange

MiB = 1 << 20


def ram_file(path: Path, size: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


@pytest.fixture
def shared(tmp_path):
    """q35-like layout: low RAM with a hole, a second backend above 4 GiB."""
    low = ram_file(tmp_path / "ram0", 4 * MiB, 1)
    dimm = ram_file(tmp_path / "dimm", 2 * MiB, 2)
    mem = SharedRAM()
    mem.map_file("ram0", tmp_path / "ram0", 4 * MiB)
    mem.map_file("dimm", tmp_path / "dimm", 2 * MiB)
    mem.add_range(0, 0xA0000, "ram0", 0)
    mem.add_range(0x100000, 3 * MiB, "ram0", 0x100000)
    mem.add_range(1 << 32, 2 * MiB, "dimm")
    yield mem, low, dimm, tmp_path
    mem.close()


def test_shared_reads_match_files(shared):
    mem, low, dimm, _ = shared
    assert mem.read(0x1234, 16) == low[0x1234:0x1244]
    assert mem.read_u64(0x100008) == int.from_bytes(low[0x100008:0x100010], "little")
    assert mem.read((1 << 32) + 0x1000, 8) == dimm[0x1000:0x1008]
    t = mem.read_table(0x200000, 512)
    assert t.dtype == np.dtype("<u8") and t.size == 512
    assert t.tobytes() == low[0x200000:0x201000]
    assert mem.ranges() == [(0, 0xA0000), (0x100000, 0x400000), (1 << 32, (1 << 32) + 2 * MiB)]


def test_shared_is_zero_copy_and_writable(shared):
    mem, _, _, tmp_path = shared
    view = mem.read_table(0x300000, 512)
    mem.write_u64(0x300000, 0xDEADBEEF)
    assert int(view[0]) == 0xDEADBEEF  # the earlier view sees the write: no copy
    with open(tmp_path / "ram0", "rb") as f:  # and so does the file (MAP_SHARED)
        f.seek(0x300000)
        assert int.from_bytes(f.read(8), "little") == 0xDEADBEEF


@pytest.mark.parametrize("pa,size", [(0xA0000, 8), (0x9FFFC, 8), (0x400000, 8), (1 << 40, 8),
                                     (-8, 8)])
def test_shared_out_of_range(shared, pa, size):
    mem = shared[0]
    assert not mem.contains(pa, size)
    with pytest.raises(OutOfRange):
        mem.read(pa, size)


def test_shared_rejects_overlap_and_unknown(shared):
    mem = shared[0]
    with pytest.raises(ValueError, match="overlaps"):
        mem.add_range(0x9F000, 0x2000, "ram0", 0x9F000)
    with pytest.raises(ValueError, match="not mapped"):
        mem.add_range(1 << 36, 4096, "nope")
    with pytest.raises(ValueError, match="outside backend"):
        mem.add_range(1 << 36, 8 * MiB, "dimm")


def test_shared_drop_backend(shared):
    mem = shared[0]
    mem.drop("dimm")
    assert not mem.contains(1 << 32)
    assert mem.backends() == ["ram0"]
    assert mem.contains(0x100000)


def test_short_file_rejected(tmp_path):
    (tmp_path / "small").write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="need"):
        SharedRAM().map_file("x", tmp_path / "small", 8192)


class FakeQemu:
    """pmemsave into a file from a byte image of guest RAM; counts calls."""

    def __init__(self, image: dict[int, bytes]) -> None:
        self.image = image
        self.calls: list[tuple[int, int]] = []

    def dump(self, pa: int, size: int, path: Path) -> None:
        self.calls.append((pa, size))
        for base, data in self.image.items():
            if base <= pa and pa + size <= base + len(data):
                path.write_bytes(data[pa - base : pa - base + size])
                return
        raise AssertionError(f"pmemsave outside RAM: {pa:#x}+{size:#x}")


def test_pmemsave_chunks_cache_and_holes(tmp_path):
    rng = np.random.default_rng(7)  # fixed: a failure replays as is
    low = rng.integers(0, 256, 0xA0000, dtype=np.uint8).tobytes()
    high = rng.integers(0, 256, 3 * MiB, dtype=np.uint8).tobytes()
    q = FakeQemu({0: low, 0x100000: high})
    mem = PmemsaveRAM(q.dump, [(0, 0xA0000), (0x100000, 0x400000)], tmp_path, chunk=MiB)
    assert mem.read(0x1000, 16) == low[0x1000:0x1010]
    assert q.calls == [(0, 0xA0000)]  # the chunk was clipped to RAM
    assert mem.read(0x2000, 8) == low[0x2000:0x2008]
    assert len(q.calls) == 1  # cached
    # a read across a chunk boundary inside one range
    assert mem.read(0x1FFFF8, 16) == high[0xFFFF8:0x100008]
    assert mem.read_table(0x300000, 512).tobytes() == high[0x200000:0x201000]
    assert not mem.contains(0xA0000) and not mem.contains(0x3FFFFC, 8)
    with pytest.raises(OutOfRange):
        mem.read(0xA0000 - 4, 8)
    mem.invalidate()
    mem.read(0x1000, 8)
    assert mem.dumps == len(q.calls) == 5  # chunks 0, 1M, 2M, 3M, then 0 again
    assert not list(tmp_path.iterdir())  # the dump file never lingers
    mem.close()


def test_pmemsave_short_dump_is_an_error(tmp_path):
    def short(pa: int, size: int, path: Path) -> None:
        path.write_bytes(b"\0" * (size - 1))

    mem = PmemsaveRAM(short, [(0, MiB)], tmp_path, chunk=MiB)
    with pytest.raises(OutOfRange, match="returned"):
        mem.read(0, 8)


def test_pmemsave_bad_chunk(tmp_path):
    with pytest.raises(ValueError):
        PmemsaveRAM(lambda *a: None, [(0, MiB)], tmp_path, chunk=3000)
