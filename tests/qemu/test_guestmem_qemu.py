"""Memory backends against a real but kernel-less QEMU (-S): shared RAM vs pmemsave, hotplug."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from ptharness.guestmem import PmemsaveRAM, SharedRAM, attach_pmemsave
from ptharness.qmp import Monitor, parse_mtree_ram

pytestmark = pytest.mark.qemu

MACHINES = {
    "x86_64": ("qemu-system-x86_64", "q35", ["-m", "256M,slots=2,maxmem=1G"], 0),
    "arm64": ("qemu-system-aarch64", "virt", ["-m", "256M", "-cpu", "max"], 0x4000_0000),
}


def require(binary: str) -> None:
    """QEMU is a declared dependency (``make host-deps``): its absence fails, never skips."""
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed (run `make host-deps`)", pytrace=False)


@pytest.fixture(params=list(MACHINES))
def tiny(request):
    binary, machine, extra, base = MACHINES[request.param]
    require(binary)
    rundir = Path(tempfile.mkdtemp(prefix="ptlab-test-", dir="/dev/shm"))
    qmp = rundir / "qmp.sock"
    argv = [binary, "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-machine", f"{machine},memory-backend=ram0", *extra,
            "-object", f"memory-backend-file,id=ram0,size=256M,mem-path={rundir}/ram0,share=on",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    mon = Monitor(qmp)
    try:
        mon.connect(time.monotonic() + 20, alive=lambda: proc.poll() is None)
        yield request.param, mon, rundir, base
    finally:
        mon.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(rundir)


def test_shared_ram_equals_pmemsave(tiny):
    arch, mon, rundir, base = tiny
    layout = parse_mtree_ram(mon.hmp("info mtree -f"), {"ram0"})
    assert layout and layout[0].pa == base
    assert sum(r.size for r in layout) <= 256 << 20
    mem = SharedRAM()
    mem.map_file("ram0", rundir / "ram0", 256 << 20)
    for r in layout:
        mem.add_range(r.pa, r.size, r.backend, r.offset)
    pattern = np.random.default_rng(7).integers(0, 1 << 63, 512, dtype=np.uint64)
    target = base + (200 << 20)
    mem.write_table(target, pattern)  # host writes into guest RAM...

    def dump(pa: int, size: int, path: Path) -> None:
        mon.cmd("pmemsave", val=pa, size=size, filename=str(path))

    pm = PmemsaveRAM(dump, mem.ranges(), rundir)
    assert (pm.read_table(target, 512) == pattern).all()  # ...and QEMU sees it
    assert pm.read(base + 0x1000, 4096) == mem.read(base + 0x1000, 4096)
    assert not mem.contains(base + (256 << 20)) and not pm.contains(base + (256 << 20))
    mem.close()
    pm.close()
    assert sorted(os.listdir(rundir)) == ["qmp.sock", "ram0"]


@pytest.mark.parametrize("tiny", ["x86_64"], indirect=True)  # pc-dimm: arm64 uses virtio-mem
def test_dimm_layout_from_qmp(tiny):
    arch, mon, rundir, _base = tiny
    mon.cmd("object-add", qom_type="memory-backend-file", id="m1", size=128 << 20,
            mem_path=str(rundir / "m1"), share=True)
    mon.cmd("device_add", driver="pc-dimm", id="d1", memdev="m1")
    dev = mon.cmd("query-memory-devices")[0]["data"]
    layout = parse_mtree_ram(mon.hmp("info mtree -f"), {"m1"})
    assert [(r.pa, r.size) for r in layout] == [(dev["addr"], 128 << 20)]
    mem = SharedRAM()
    mem.map_file("m1", rundir / "m1", 128 << 20)
    mem.add_range(dev["addr"], 128 << 20, "m1")
    mem.write_u64(dev["addr"] + 8, 0x1122334455667788)
    out = rundir / "dump"
    mon.cmd("pmemsave", val=dev["addr"] + 8, size=8, filename=str(out))
    assert int.from_bytes(out.read_bytes(), "little") == 0x1122334455667788
    mem.close()


def test_attach_pmemsave_to_foreign_qemu(tiny):
    arch, mon, rundir, base = tiny
    mon.close()  # QEMU's monitor takes one client at a time here
    mem = SharedRAM()
    mem.map_file("ram0", rundir / "ram0", 256 << 20)
    mem.add_range(base, 256 << 20 if arch == "arm64" else 0xA0000, "ram0")
    mem.write(base + 0x8000, b"ptlab-canary")
    pm = attach_pmemsave(rundir / "qmp.sock", rundir)
    assert pm.ranges()[0][0] == base
    assert pm.read(base + 0x8000, 12) == b"ptlab-canary"
    pm.close()
    mem.close()


def test_q35_split_above_4g():
    """q35 with 3 GiB: RAM below 2 GiB, the rest at 4 GiB, both from one backend file."""
    require("qemu-system-x86_64")
    rundir = Path(tempfile.mkdtemp(prefix="ptlab-test-", dir="/dev/shm"))
    qmp = rundir / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
         "-machine", "q35,memory-backend=ram0", "-m", "3G",
         "-object", f"memory-backend-file,id=ram0,size=3G,mem-path={rundir}/ram0,share=on",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mon = Monitor(qmp)
    try:
        mon.connect(time.monotonic() + 20, alive=lambda: proc.poll() is None)
        layout = parse_mtree_ram(mon.hmp("info mtree -f"), {"ram0"})
        high = [r for r in layout if r.pa >= 1 << 32]
        assert [(r.pa, r.size, r.offset) for r in high] == [(1 << 32, 1 << 30, 2 << 30)]
        assert max(r.end for r in layout if r.pa < 1 << 32) == 2 << 30
        mem = SharedRAM()
        mem.map_file("ram0", rundir / "ram0", 3 << 30)
        for r in layout:
            mem.add_range(r.pa, r.size, r.backend, r.offset)
        mem.write((1 << 32) + 0x2000, b"above-4g")
        out = rundir / "dump"
        mon.cmd("pmemsave", val=(1 << 32) + 0x2000, size=8, filename=str(out))
        assert out.read_bytes() == b"above-4g"
        mem.close()
    finally:
        mon.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(rundir)
