"""``ptlab map --svg/--png``: a well-formed SVG with one row per ptdump region that has
mappings, each run a rectangle coloured by its permissions (a planted W+X page in red), the
page-size legend; the PNG decodes (an independent zlib reader) to the same picture; an existing
file is not overwritten (exit 2)."""

from __future__ import annotations

import io
import struct
import xml.etree.ElementTree as ET
import zlib

from ptlab.arch import arch_for
from ptlab.cli import main
from ptlab.formats.catalog import by_name
from ptlab.svgmap import COLOURS
from ptlab.testing import TableBuilder

F = by_name("x86_64-4level")
DIRECT = 0xFFFF_8880_0000_0000
TEXT = 0xFFFF_FFFF_8100_0000
NS = "{http://www.w3.org/2000/svg}"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def small_image(tmp_path) -> tuple[TableBuilder, object]:
    """A raw image: 4 MiB of RW direct map in 2M pages, one W+X 4K page, 2M of RX text."""
    pk = arch_for(F).page_kernel
    b = TableBuilder(F, base=0x100_0000)
    b.map(DIRECT, 0, 4 << 20, F.normalize(pk), level=1)
    b.map(DIRECT + (8 << 20), 0x80_0000, 0x1000, F.normalize(pk.with_(exec=True)), level=0)
    b.map(TEXT, 0x20_0000, 2 << 20, F.normalize(pk.with_(writable=False, exec=True)), level=1)
    raw = tmp_path / "ram.raw"
    raw.write_bytes(b.mem.read(0, 32 << 20))
    return b, raw


def test_map_svg(tmp_path):
    b, raw = small_image(tmp_path)
    svg = tmp_path / "map.svg"
    args = ["--raw", str(raw), "--format", F.name, "--root", hex(b.root), "map", "--svg",
            str(svg)]
    code, out, err = run(*args)
    assert (code, err) == (0, "") and out == f"# {svg}: 3 runs\n"
    root = ET.parse(svg).getroot()
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "Low Kernel Mapping" in texts and "High Kernel Mapping" in texts
    assert "Vmemmap" not in texts  # no row for a region without mappings
    assert "4K pages" in texts and "2M pages" in texts
    runs = [r for r in root.iter(f"{NS}rect") if r.find(f"{NS}title") is not None
            and " +" in (r.find(f"{NS}title").text or "")]
    by_va = {r.find(f"{NS}title").text.split()[0]: r.get("fill") for r in runs}
    assert by_va == {hex(DIRECT): COLOURS["rw"], hex(DIRECT + (8 << 20)): COLOURS["W+X"],
                     hex(TEXT): COLOURS["rx"]}
    code, out, err = run(*args)
    assert code == 2 and "exists: not overwriting" in err


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB, non-interlaced PNG whose rows use
    filter 0 (what ptlab writes): a small independent reader over zlib and struct."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == w * h * 3 + h
    rows = [raw[y * (w * 3 + 1):(y + 1) * (w * 3 + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, [r[1:] for r in rows]


def test_map_png_same_picture(tmp_path):
    """``--png`` beside ``--svg``: the PNG decodes to the SVG's size, and the pixel at the
    middle of each run's rectangle in the SVG has the run's permission colour."""
    b, raw = small_image(tmp_path)
    svg, png = tmp_path / "map.svg", tmp_path / "map.png"
    args = ["--raw", str(raw), "--format", F.name, "--root", hex(b.root), "map"]
    code, out, err = run(*args, "--svg", str(svg), "--png", str(png))
    assert (code, err) == (0, "") and out == f"# {svg}: 3 runs\n# {png}: 3 runs\n"
    w, h, rows = decode_png(png.read_bytes())
    root = ET.parse(svg).getroot()
    assert (w, h) == (int(root.get("width")), int(root.get("height")))
    runs = [r for r in root.iter(f"{NS}rect") if r.find(f"{NS}title") is not None
            and " +" in (r.find(f"{NS}title").text or "")]
    assert len(runs) == 3
    for r in runs:
        x = int(float(r.get("x")) + float(r.get("width")) / 2)
        y = int(float(r.get("y")) + float(r.get("height")) / 2)
        assert "#" + rows[y][x * 3:x * 3 + 3].hex() == r.get("fill"), r.find(f"{NS}title").text
    assert rows[0][:3] == b"\xff\xff\xff"  # the white background
    code, out, err = run(*args, "--png", str(tmp_path / "other.png"), "--svg", str(svg))
    assert code == 2 and "exists: not overwriting" in err and not (tmp_path / "other.png").exists()
    code, out, err = run(*args)
    assert code == 2 and "--svg FILE and/or --png FILE" in err
