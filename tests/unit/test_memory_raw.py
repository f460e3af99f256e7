"""RawImage: mmap-backed raw images with region lists."""

from __future__ import annotations

import numpy as np
import pytest
from ptlab.memory import ImageError, MemoryError_, OutOfRange, RawImage


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.integers(0, 2**64, size=3 * 512, dtype=np.uint64)  # 3 pages
    path = tmp_path / "ram.bin"
    path.write_bytes(data.tobytes())
    return path, data


def test_default_region_is_whole_file_at_pa0(image):
    path, data = image
    with RawImage(path) as mem:
        assert mem.ranges() == [(0, 3 * 4096)]
        assert mem.read_u64(8) == int(data[1])
        assert mem.read(4096, 16) == data[512:514].tobytes()
        assert mem.contains(3 * 4096 - 8) and not mem.contains(3 * 4096 - 4)
        with pytest.raises(OutOfRange):
            mem.read(3 * 4096 - 4, 8)


def test_regions_map_pa_to_file_offsets(image):
    path, data = image
    regs = [(0x10_0000_0000, 4096, 4096), (0x1000, 0, 4096), (0x2000, 8192, 4096)]
    with RawImage(path, regs) as mem:
        assert mem.ranges() == [(0x1000, 0x3000), (0x10_0000_0000, 0x10_0000_1000)]
        t = mem.read_table(0x10_0000_0000, 512)
        assert np.array_equal(t, data[512:1024])
        # a read-only array (read with pread: a dump truncated under us is an error, not SIGBUS)
        assert not t.flags.writeable and not t.flags.owndata
        # a read spanning the two PA-adjacent regions joins file pages 0 and 2
        got = mem.read(0x2000 - 8, 16)
        assert got == data[511:512].tobytes() + data[1024:1025].tobytes()
        assert mem.read_u64(0x2008) == int(data[1025])
        assert np.array_equal(mem.read_table(0x1ff8, 2), data[[511, 1024]])
        assert not mem.contains(0x3000) and not mem.contains(0)
        with pytest.raises(OutOfRange, match="0x3000"):
            mem.read_u64(0x3000)


def test_read_only(image):
    path, _ = image
    with RawImage(path) as mem, pytest.raises(PermissionError):
        mem.write_u64(0, 1)


@pytest.mark.parametrize(
    ("regions", "pattern"),
    [
        ([(0, 8192, 8192)], "beyond the end"),
        ([(0, 0, 4096), (0x800, 4096, 4096)], "overlap"),
        ([(0, 0, 0)], "size > 0"),
        ([(-1, 0, 16)], "pa >= 0"),
        ([(0, 0)], "not \\(pa, file_offset, size\\)"),
        ([], "no regions"),
    ],
)
def test_bad_regions_one_clear_error(image, regions, pattern):
    path, _ = image
    with pytest.raises(ValueError, match=pattern) as e:
        RawImage(path, regions)
    assert isinstance(e.value, MemoryError_)
    assert "\n" not in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ImageError, match="cannot open"):
        RawImage(tmp_path / "nope")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        RawImage(tmp_path / "empty")
    with pytest.raises(ImageError, match="not a regular file"):
        RawImage(tmp_path)


def test_close_with_live_views(image):
    path, data = image
    mem = RawImage(path)
    view = mem.read_table(0, 512)
    mem.close()  # must not raise although a view is alive
    assert int(view[3]) == int(data[3])
    with pytest.raises(ImageError, match="closed"):
        mem.read(0, 8)
