"""What the real-guest CLI tests share: ptlab in process and as a subprocess, its
``walk --json`` output parsed, the same objects from the harness's own walk, the checks of
a ``map --svg/--png`` picture that do not depend on the architecture, ptlab's stop and resume
of a running guest over ``--qmp``, and planting edits into a copy of an ELF dump."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptharness.guest import Guest
from ptlab.cli import anomaly_json, run_json, walk_budget
from ptlab.cli import main as ptlab_main
from ptlab.memory import ElfCore
from ptlab.svgmap import COLOURS
from ptlab.walk import Walker

TIMEOUT = 300  # seconds a ptlab subprocess may take on a loaded machine
SVG = "{http://www.w3.org/2000/svg}"


def cli(*argv: str) -> tuple[int, str]:
    """ptlab in this process: (exit status, stdout); nothing on stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = ptlab_main(list(argv), out=out, err=err)
    assert not err.getvalue(), err.getvalue()
    return code, out.getvalue()


def ptlab(*argv: str) -> subprocess.CompletedProcess[str]:
    """ptlab as a user runs it: its own process."""
    return subprocess.run([sys.executable, "-m", "ptlab.cli", *argv], capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def json_runs(text: str) -> list[dict[str, Any]]:
    """The run and anomaly objects of ``walk --json`` output (its summary line checked)."""
    objs = [json.loads(line) for line in text.splitlines()]
    assert objs and "runs" in objs[-1], text[-500:]
    return objs[:-1]


def disasm_stext(dump: Path, stext: int, n: int) -> tuple[list[dict[str, Any]], bytes]:
    """``ptlab disasm _stext N --json`` over ``dump``: the instruction objects (checked: N of
    them from _stext, read-only kernel executable) and their bytes joined."""
    code, out = cli("--dump", str(dump), "disasm", hex(stext), str(n), "--json")
    insns = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(insns) == n and insns[0]["va"] == hex(stext)
    assert insns[0]["attrs"].startswith("ro kern x")
    return insns, bytes.fromhex("".join(i["bytes"] for i in insns))


def harness_walk(g: Guest, root: int, start: int | None) -> list[dict[str, Any]]:
    """The harness's walk of ``root`` over the guest's shared RAM, as ``walk --json`` objects."""
    fmt, mem = g.kernel_format(), g.memory
    walker = Walker(fmt, mem, root, **walk_budget(mem))
    out = [run_json(fmt, r) for r in walker.run_table(start, None)]
    return out + [anomaly_json(a) for a in walker.anomalies]


def check_map(dump: Path, tmp: Path, markers: set[str]) -> tuple[ET.Element, bytes]:
    """``map --svg --png`` of ``dump``: the SVG names the region ``markers``, has read-only
    executable runs and no W+X one (the real kernels pass DEBUG_WX); returns the SVG root and
    the PNG's bytes (both files removed)."""
    svg, png = tmp / "map.svg", tmp / "map.png"
    try:
        code, _ = cli("--dump", str(dump), "map", "--svg", str(svg), "--png", str(png))
        assert code == 0
        root = ET.parse(svg).getroot()
        texts = {t.text for t in root.iter(f"{SVG}text")}
        assert markers <= texts, markers - texts
        fills = {r.get("fill") for r in root.iter(f"{SVG}rect")
                 if r.find(f"{SVG}title") is not None}
        assert COLOURS["rx"] in fills and COLOURS["W+X"] not in fills
        return root, png.read_bytes()
    finally:
        svg.unlink(missing_ok=True)
        png.unlink(missing_ok=True)


def check_walk_resumes(g: Guest, *argv: str) -> None:
    """``ptlab ARGV`` (a ``--qmp`` walk, its own process) on the running guest ``g``: it says it
    stopped the guest, prints its runs, says it resumed it; the guest runs on and its agent
    answers."""
    live = ptlab(*argv)
    assert live.returncode == 0, live.stderr
    assert live.stderr.splitlines()[0] == "ptlab: guest stopped while reading"
    assert "ptlab: guest resumed" in live.stderr.splitlines()
    assert " runs, " in live.stdout.splitlines()[-1]
    assert g.running
    assert isinstance(g.agent("ping"), dict)  # raises unless the agent answers


def planted_copy(dump: Path, tmp: Path) -> Path:
    """A private copy of the ELF dump ``dump`` in ``tmp``, to plant changes into."""
    planted = tmp / "planted.elf"
    shutil.copyfile(dump, planted)
    planted.chmod(0o600)
    return planted


def elf_file_offset(core: ElfCore, pa: int) -> int:
    """The file offset of the 8 bytes at guest PA ``pa`` in the ELF dump ``core``."""
    for ld in core.loads:
        if ld.paddr <= pa and pa + 8 <= ld.paddr + ld.filesz:
            return ld.offset + pa - ld.paddr
    raise AssertionError(f"PA {pa:#x} is not in the dump")


def patch_u64s(path: Path, bits: Sequence[tuple[int, int, int]],
               words: Sequence[tuple[int, bytes]] = ()) -> None:
    """Edit the little-endian 64-bit words of the file ``path`` in place: at each offset of
    ``bits`` (offset, bits to set, bits to clear), then write each of ``words``."""
    with open(path, "r+b") as f:
        for off, set_, clear in bits:
            f.seek(off)
            raw = int.from_bytes(f.read(8), "little")
            f.seek(off)
            f.write(((raw | set_) & ~clear & ((1 << 64) - 1)).to_bytes(8, "little"))
        for off, data in words:
            f.seek(off)
            f.write(data)
