"""``ptlab map --svg``: a well-formed SVG with one row per ptdump region that has mappings,
each run a rectangle coloured by its permissions (a planted W+X page in red), the page-size
legend; an existing file is not overwritten (exit 2)."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

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


def test_map_svg(tmp_path):
    pk = arch_for(F).page_kernel
    b = TableBuilder(F, base=0x100_0000)
    b.map(DIRECT, 0, 4 << 20, F.normalize(pk), level=1)
    b.map(DIRECT + (8 << 20), 0x80_0000, 0x1000, F.normalize(pk.with_(exec=True)), level=0)
    b.map(TEXT, 0x20_0000, 2 << 20, F.normalize(pk.with_(writable=False, exec=True)), level=1)
    raw = tmp_path / "ram.raw"
    raw.write_bytes(b.mem.read(0, 32 << 20))
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
