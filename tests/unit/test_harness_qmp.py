"""Monitor-text parsers (HMP info registers, info mtree -f) and the Monitor: failure handling
without QEMU, then commands, HMP, events and a dying peer against a real QEMU."""

from __future__ import annotations

import time

import pytest
from ptharness.qmp import Monitor, MonitorError, RamRange, parse_info_registers, parse_mtree_ram

INFO_REGISTERS = """\
CPU#0
RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000001 RDX=0000000000000000
RIP=ffffffff81a592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=00000000004f0215 CR3=000000000610e000 CR4=00750ef0
DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000
EFER=0000000000000d01
CPU#1
CR0=80050033 CR2=0000000000000000 CR3=0000000000001000 CR4=00751ef0
"""

MTREE = """\
FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
  0000000000000010-000000000000001f (prio 0, i/o): io @0000000000000010

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): ram0
  00000000000c0000-00000000000c2fff (prio 0, ram): ram0 @00000000000c0000
  00000000000c3000-00000000000e7fff (prio 0, rom): ram0 @00000000000c3000
  00000000000e8000-00000000000effff (prio 0, ram): ram0 @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): ram0 @00000000000f0000
  0000000000100000-000000003fffffff (prio 0, ram): ram0 @0000000000100000
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio
  0000000100000000-000000010fffffff (prio 0, ram): dimm1-mem
  00000000fffc0000-00000000ffffffff (prio 0, romd): pc.bios
"""


def test_info_registers_first_cpu():
    regs = parse_info_registers(INFO_REGISTERS)
    assert regs["cr3"] == 0x610E000
    assert regs["cr4"] == 0x750EF0  # CPU#0's, not CPU#1's LA57 value
    assert regs["efer"] == 0xD01 and regs["rip"] == 0xFFFFFFFF81A592EB and regs["cpl"] == 0


def test_info_registers_missing_cr3():
    with pytest.raises(ValueError, match="CR3"):
        parse_info_registers("EAX=0 EBX=0")


def test_mtree_merges_and_filters():
    got = parse_mtree_ram(MTREE, {"ram0"})
    assert got == [
        RamRange(0, 0xC3000, "ram0", 0),
        RamRange(0xE8000, 0x8000, "ram0", 0xE8000),
        RamRange(0x100000, 0x3FF00000, "ram0", 0x100000),
    ]
    everything = parse_mtree_ram(MTREE)
    assert everything[-1] == RamRange(1 << 32, 0x10000000, "dimm1-mem", 0)
    assert all(r.backend != "dma-chan" for r in everything)


def test_mtree_without_memory_view():
    with pytest.raises(ValueError, match="memory"):
        parse_mtree_ram(MTREE.split("FlatView #1")[0])


def test_monitor_errors_are_bounded(tmp_path):
    m = Monitor(tmp_path / "qmp.sock")
    with pytest.raises(MonitorError, match="not connected"):
        m.cmd("query-status")
    t = time.monotonic()
    with pytest.raises(MonitorError, match="not ready"):
        m.connect(time.monotonic() + 0.3)
    assert time.monotonic() - t < 2
    with pytest.raises(MonitorError, match="exited"):
        m.connect(time.monotonic() + 5, alive=lambda: False)


def test_monitor_against_real_qemu(tmp_path):
    """Monitor over QEMU's own QMP server (no guest: machine none, vCPUs not started)."""
    import subprocess

    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    m = Monitor(sock, timeout=10, transcript=tmp_path / "qmp.log")
    try:
        m.connect(time.monotonic() + 20, alive=lambda: proc.poll() is None)
        status = m.cmd("query-status")
        assert (status["status"], status["running"]) == ("prelaunch", False)
        version = m.cmd("query-version")["qemu"]
        assert m.hmp("info version").startswith(f"{version['major']}.{version['minor']}.")
        with pytest.raises(MonitorError, match="no-such-command"):
            m.cmd("no-such-command")
        m.clear_events()
        m.cmd("cont")
        assert m.wait_event("RESUME", 10)["event"] == "RESUME"
        assert m.cmd("query-status")["running"] is True
        m.cmd("stop")
        m.clear_events()  # the STOP event is dropped: the next wait sees only newer ones
        with pytest.raises(MonitorError, match="no STOP event"):
            m.wait_event("STOP", 0.3)
        proc.kill()
        proc.wait(10)
        with pytest.raises(MonitorError, match="query-status"):
            m.cmd("query-status")  # QEMU gone: one MonitorError, no hang
    finally:
        m.close()
        m.close()  # idempotent
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()
    with pytest.raises(MonitorError, match="not connected"):
        m.cmd("query-status")
    # the transcript: every command sent, QEMU's replies as JSON, the errors
    lines = [ln.split(" ", 1)[1] for ln in (tmp_path / "qmp.log").read_text().splitlines()]
    assert lines[0] == '-> {"execute": "query-status"}'
    assert lines[1].startswith('<- {"status": "prelaunch"')
    assert any(ln.startswith("<-! ") and "no-such-command" in ln for ln in lines)
    assert lines[-2] == '-> {"execute": "query-status"}' and lines[-1].startswith("<-! ")
