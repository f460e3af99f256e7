"""kdump-compressed dumps of real guests: QEMU's ``dump-guest-memory`` formats kdump-zlib and
kdump-lzo (QEMU 7.2 writes the flattened makedumpfile stream).

At one stop of a booted guest: ptlab's walk of the kernel half over each kdump file (flattened,
read in place, and rearranged by ``makedumpfile -R``) equals the live walk of the guest's shared
RAM; the dump holds exactly the guest's RAM ranges; pages read through ptlab's reader equal the
live RAM and what libkdumpfile (Debian's python3-libkdumpfile, a reader ptlab did not write)
reads from the rearranged file.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ptharness import scenarios
from ptharness.guest import Guest
from ptlab.arch import arch_for
from ptlab.cli import main as ptlab_main
from ptlab.cli import run_text
from ptlab.memory.kdump import KdumpCompressed, NotInDump
from ptlab.memory.kdumpwrite import diskdump_bytes

pytestmark = pytest.mark.qemu

# QEMU's own kdump writer (Debian's QEMU 7.2 offers only zlib: "kdump-lzo/-snappy is not
# available now"; Debian's makedumpfile 1.7.2 does not support Linux 6.1 and crashes refiltering
# QEMU's dump), and ptlab.memory.kdumpwrite over the live RAM at the same stop: lzo pages, zero
# pages filtered out as makedumpfile's dump level 1 does.
FORMATS = ("qemu-kdump-zlib", "written-lzo-d1")
SAMPLE_PAGES = 300
WITNESS = """
import hashlib, json, sys, kdumpfile
k = kdumpfile.kdumpfile(sys.argv[1])
ps = int(sys.argv[3])
out = {}
for pfn in json.loads(sys.argv[2]):
    try:
        data = bytes(k.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * ps, ps))
        out[pfn] = hashlib.sha256(data).hexdigest()
    except kdumpfile.exceptions.NoDataException:
        out[pfn] = "nodata"
print(json.dumps(out))
"""


def report(name: str, value: float, unit: str) -> None:
    print(f"{name}: {value:.4g} {unit}", file=sys.stderr)


def cli(*argv: str, filtered: bool = False) -> tuple[int, list[str]]:
    """Run ptlab; a filtered dump may add the "not in dump" warning on stderr, nothing else."""
    out, err = io.StringIO(), io.StringIO()
    code = ptlab_main(list(argv), out=out, err=err)
    text = err.getvalue()
    assert code in (0, 1), text
    assert not text or (filtered and text.startswith("ptlab: warning:")
                        and "not in dump" in text and text.count("\n") == 1), text
    return code, out.getvalue().splitlines()


@pytest.fixture(scope="module", params=["x86_64", "arm64"])
def profile(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def stop(profile: str, tmp_path_factory: pytest.TempPathFactory, guest_pool: Any) -> Any:
    """The profile's pool guest stopped once; its live walk and its dumps in every kdump
    format at that stop."""
    tmp = tmp_path_factory.mktemp(f"kdump-{profile}")
    g = guest_pool.acquire(profile)
    dumps: dict[str, Path] = {}
    try:
        root, fmt = g.kernel_root(), g.kernel_format()
        g.stop()
        walk = scenarios.walk_kernel(fmt, g.memory, root)
        path = tmp / "qemu-kdump-zlib.flat"
        t0 = time.perf_counter()
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}", format="kdump-zlib")
        report(f"dump_s[{profile},kdump-zlib]", time.perf_counter() - t0, "s")
        dumps["qemu-kdump-zlib"] = path
        t0 = time.perf_counter()
        dumps["written-lzo-d1"] = write_filtered(g, fmt, tmp / "written-lzo-d1.kdump")
        report(f"write_s[{profile},lzo-d1]", time.perf_counter() - t0, "s")
        for name, path in dumps.items():
            report(f"dump_mib[{profile},{name}]", path.stat().st_size / 2**20, "MiB")
        yield {"g": g, "root": root, "fmt": fmt, "walk": walk, "dumps": dumps}
    finally:
        for path in dumps.values():
            path.unlink(missing_ok=True)


class LiveNonZeroPages(Mapping[int, bytes]):
    """The guest's non-zero RAM pages by PFN, read from its shared RAM when asked."""

    def __init__(self, g: Guest, page: int) -> None:
        self.g, self.page = g, page
        self.ram: set[int] = set()
        self.pfns: list[int] = []
        for start, end in g.memory.ranges():
            self.ram.update(range(start // page, end // page))
            words = np.frombuffer(g.memory.view(start, end - start), dtype="<u8")
            nonzero = words.reshape(-1, page // 8).any(axis=1)
            self.pfns += (np.flatnonzero(nonzero) + start // page).tolist()

    def __getitem__(self, pfn: int) -> bytes:
        return self.g.memory.read(pfn * self.page, self.page)

    def __iter__(self) -> Iterator[int]:
        return iter(self.pfns)

    def __len__(self) -> int:
        return len(self.pfns)


def write_filtered(g: Guest, fmt: Any, path: Path) -> Path:
    ps = fmt.table_bytes
    pages = LiveNonZeroPages(g, ps)
    max_mapnr = max(end for _, end in g.memory.ranges()) // ps
    path.write_bytes(diskdump_bytes(pages, max_mapnr, ram=pages.ram, compression="lzo",
                                    machine=arch_for(fmt).uname_machines[0], dump_level=1,
                                    page_size=ps))
    return path


def layouts(path: Path) -> list[Path]:
    """``path``, and when it is a flattened stream, the diskdump ``makedumpfile -R`` makes."""
    if path.read_bytes()[:12] != b"makedumpfile":
        return [path]
    out = path.with_suffix(".kdump")
    if not out.exists():
        with open(path, "rb") as f:
            p = subprocess.run(["makedumpfile", "-R", str(out)], stdin=f, capture_output=True,
                               timeout=300)
        assert p.returncode == 0, p.stderr
    return [path, out]


def filtered(name: str) -> bool:
    return name.endswith("-d1")


@pytest.mark.parametrize("name", FORMATS)
def test_walk_of_kdump_equals_live_walk(stop: Any, name: str):
    """The runs equal the live walk's; in a filtered dump, the only difference is tables the
    dump does not hold, each reported "not in dump", and each all zeros in the live RAM (the
    dump level drops zero pages; page tables are never free, cache or user pages)."""
    g, fmt, root = stop["g"], stop["fmt"], stop["root"]
    lo, _ = scenarios.kernel_half(fmt)
    want = [run_text(fmt, r) for r in stop["walk"].runs]
    assert want, "the live walk found no runs"
    path = stop["dumps"][name]
    if name.startswith("qemu"):  # QEMU 7.2 writes the flattened stream
        assert path.read_bytes()[:12] == b"makedumpfile"
    for p in layouts(path):
        t0 = time.perf_counter()
        _, walked = cli("--dump", str(p), "--format", fmt.name, "--root", hex(root),
                        "walk", "--start", hex(lo), filtered=filtered(name))
        report(f"walk_kdump_s[{name},{p.suffix}]", time.perf_counter() - t0, "s")
        runs = [ln for ln in walked if not ln.startswith("#")]
        anomalies = [ln for ln in walked if ln.startswith("# anomaly")]
        assert walked[-1].startswith(f"# {len(want)} runs,"), walked[-1]
        assert runs == want
        if not filtered(name):
            assert not anomalies and walked[-1].endswith(" 0 anomalies"), walked[-1]
        for ln in anomalies:
            m = re.search(r"table at (0x[0-9a-f]+) unreadable: .*not in dump", ln)
            assert m is not None, ln
            pa = int(m[1], 16)
            assert not g.memory.read(pa, fmt.table_bytes).strip(b"\0"), ln
    _, info = cli("--dump", str(path), "--format", fmt.name, "--root", hex(root), "info")
    text = "\n".join(info)
    assert "kdump: " in text and ("lzo" if "lzo" in name else "zlib") in text, text


@pytest.mark.parametrize("name", FORMATS)
def test_pages_equal_live_ram_and_libkdumpfile(stop: Any, name: str,
                                               seeded_rng: random.Random):
    """Sampled pages read by ptlab equal the live RAM and libkdumpfile's reads; the pages
    libkdumpfile has no data for are exactly those ptlab calls not in dump."""
    g = stop["g"]
    path = stop["dumps"][name]
    with KdumpCompressed(path) as mem:
        ps = mem.page_size
        if not filtered(name):  # QEMU dumps whole RAM blocks: all of RAM, maybe more
            have = mem.ranges()
            for start, end in g.memory.ranges():
                assert any(a <= start and end <= b for a, b in have), (start, end, have)
        assert not mem.incomplete
        pfns = {stop["root"] // ps}
        for start, end in g.memory.ranges():
            pfns |= {start // ps, (end - 1) // ps}
        ranges = g.memory.ranges()
        while len(pfns) < SAMPLE_PAGES:
            start, end = seeded_rng.choice(ranges)
            pfns.add(seeded_rng.randrange(start // ps, end // ps))
        order = sorted(pfns)
        p = subprocess.run(["/usr/bin/python3", "-c", WITNESS, str(layouts(path)[-1]),
                            json.dumps(order), str(ps)], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        witness = {int(k): v for k, v in json.loads(p.stdout).items()}
        missing = 0
        for pfn in order:
            if witness[pfn] == "nodata":
                missing += 1
                with pytest.raises(NotInDump):
                    mem.read(pfn * ps, ps)
                assert not g.memory.read(pfn * ps, ps).strip(b"\0"), f"PFN {pfn:#x} dropped"
                continue
            page = mem.read(pfn * ps, ps)
            assert page == g.memory.read(pfn * ps, ps), f"PFN {pfn:#x} differs from live RAM"
            assert hashlib.sha256(page).hexdigest() == witness[pfn], (
                f"PFN {pfn:#x} differs from libkdumpfile")
        assert (missing > 0) == filtered(name), missing
