"""Guest lifecycle on real kernels: boot + agent, failure detection, cleanup, roots vs registers."""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from ptharness.guest import Guest, GuestError
from ptharness.profiles import PROFILES

pytestmark = pytest.mark.qemu

FAIL_FAST_S = 10  # a dead guest must be reported within this many seconds


def gone(pid: int) -> bool:
    """True if ``pid`` no longer exists (reaped) — a zombie still counts as a leak."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_cleaned(pid: int | None, rundir: Path) -> None:
    assert pid is not None and gone(pid), f"QEMU {pid} still exists"
    assert not rundir.exists(), f"run directory {rundir} left behind"


@pytest.mark.parametrize("profile", ["x86_64"])
def test_boot_and_agent_info(profile):
    with Guest(profile) as g:
        pid, rundir = g.pid, g.rundir
        assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
        assert {"qmp.sock", "gdb.sock", "serial.log"} <= set(os.listdir(rundir))
        assert "ram0" not in os.listdir(rundir)  # mapped, then unlinked
        info = g.agent("info")
        assert info == g.info or info.keys() == g.info.keys()
        assert g.image.kernel_version in str(info)
        assert g.boot_seconds is not None and 0 < g.boot_seconds < g.boot_timeout
        rc, out, _ = g.ssh("cat /proc/cmdline")
        assert rc == 0 and "secretmem.enable=1" in out and "ptlab.key=" in out
        assert g.ssh("exit 7")[0] == 7
        assert g.running
        g.stop()
        assert not g.running
        t = time.monotonic()
        with pytest.raises(GuestError, match="did not finish"):
            g.ssh("true", timeout=2)  # a paused guest is a hung SSH: bounded, reported
        assert time.monotonic() - t < 5
        g.cont()
        assert g.running
        assert g.ssh("echo back")[1] == "back\n"  # the session survives the timeout
        assert "Linux version" in g.console_tail(10_000) or "PTLAB-READY" in g.console_tail(200)
    assert_cleaned(pid, rundir)


@pytest.mark.parametrize("profile", ["x86_64"])
def test_killed_qemu_is_reported_quickly(profile):
    g = Guest(profile)
    with pytest.raises(GuestError) as err, g:
        pid, rundir = g.pid, g.rundir
        assert pid is not None
        threading.Timer(0.5, os.kill, (pid, 9)).start()
        t = time.monotonic()
        try:
            g.ssh("sleep 60", timeout=120)  # blocked in the guest when QEMU dies
        finally:
            elapsed = time.monotonic() - t
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.1f} s to notice the dead QEMU"
    assert "QEMU exited" in str(err.value) and "console tail" in str(err.value)
    with pytest.raises(GuestError):
        g.agent("info")  # stays dead, says so at once
    assert_cleaned(pid, rundir)


@pytest.mark.parametrize("profile", ["x86_64"])
def test_panic_is_reported_with_console(profile):
    g = Guest(profile)
    with pytest.raises(GuestError) as err, g:
        pid, rundir = g.pid, g.rundir
        t = time.monotonic()
        try:
            g.ssh("echo c > /proc/sysrq-trigger", timeout=120)
        finally:
            elapsed = time.monotonic() - t
    assert elapsed < FAIL_FAST_S
    msg = str(err.value)
    assert "kernel panic" in msg and "sysrq triggered crash" in msg
    assert "console tail" in msg and msg.count("\n") > 5
    assert_cleaned(pid, rundir)


@pytest.mark.parametrize("profile", ["x86_64"])
def test_boot_failure_cleans_up(profile):
    from ptharness.image import ensure_image

    img = ensure_image("x86_64", progress=lambda *a: None)
    broken = dataclasses.replace(img, initrd=Path("/nonexistent/initrd"))
    g = Guest(profile, image=broken, boot_timeout=30)
    with pytest.raises(GuestError, match="did not start"):
        g.start()
    assert g.pid is None and not g._paths.rundir.exists()
    t = time.monotonic()
    g = Guest(profile, boot_timeout=1.5)
    with pytest.raises(GuestError, match="within"):
        g.start()
    assert time.monotonic() - t < FAIL_FAST_S
    assert not g._paths.rundir.exists()


@pytest.mark.profile("x86_64")
def test_keyboard_interrupt_in_enter_cleans_up(monkeypatch):
    g = Guest("x86_64")

    def interrupted(deadline: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(g, "_wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        g.start()
    assert g.pid is None and not g._paths.rundir.exists()


@pytest.mark.parametrize("profile", list(PROFILES))
def test_registers_agree_with_vmcoreinfo(profile):
    with Guest(profile) as g:
        p = g.profile
        vi = g.vmcoreinfo()
        assert vi.osrelease == g.image.kernel_version
        root = g.kernel_root()  # raises GuestError on any disagreement
        assert root == vi.kernel_root(p.arch)
        fmt = g.kernel_format()
        assert fmt.levels == p.levels, f"{profile}: {fmt.levels}-level, expected {p.levels}"
        regs = g.registers()
        g.stop()
        # the root table is in RAM, and its kernel half is not empty
        top = g.memory.read_table(root, 512)
        assert (top[256:] != 0).sum() > 0
        assert (g.pmem().read_table(root, 512) == top).all()  # the fallback backend agrees
        if p.arch == "x86_64":
            assert regs["cr4"] & (1 << 12) == (1 << 12 if p.levels == 5 else 0)
            assert vi.pgtable_l5_enabled == (p.levels == 5)
        else:
            ttbr1 = g.registers()["ttbr1_el1"] & 0xFFFF_FFFF_F000
            assert ttbr1 in (root, root - 0x2000)
            assert 64 - ((regs["tcr_el1"] >> 16) & 0x3F) == fmt.va_bits
            assert not g.running  # reading registers over the gdbstub kept it stopped
        g.cont()
        assert g.running


@pytest.mark.parametrize("profile", ["x86_64"])
def test_checkpoint_reset(profile):
    with Guest(profile) as g:
        g.checkpoint()
        g.ssh("echo dirty > /tmp/ptlab-reset-probe")
        t = time.monotonic()
        g.reset()
        elapsed = time.monotonic() - t
        rc, _, _ = g.ssh("test -e /tmp/ptlab-reset-probe")
        assert rc == 1, "reset did not bring the guest back to the checkpoint"
        assert g.agent("info")
        assert elapsed < g.boot_seconds, f"reset {elapsed:.2f} s is no faster than a boot"


def memory_blocks(g: Guest) -> int:
    rc, out, _ = g.ssh("ls -d /sys/devices/system/memory/memory* | wc -l")
    assert rc == 0
    return int(out)


def mem_total_kib(g: Guest) -> int:
    rc, out, _ = g.ssh("grep MemTotal /proc/meminfo")
    assert rc == 0
    return int(out.split()[1])


@pytest.mark.parametrize("profile", ["x86_64"])
def test_x86_dimm_hotplug(profile):
    with Guest(profile, hotplug=True) as g:
        before = memory_blocks(g)
        dev = g.plug_dimm(256)
        addr = g.dimm_address(dev)
        assert addr >= 1 << 32 and g.memory.contains(addr, 256 << 20)
        g.memory.write(addr + 0x1000, b"ptlab-dimm")  # host writes land in the DIMM
        assert g.pmem().read(addr + 0x1000, 10) == b"ptlab-dimm"
        deadline = time.monotonic() + 20
        while memory_blocks(g) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert memory_blocks(g) == before + 2  # two 128 MiB blocks
        g.unplug_dimm(dev)  # the blocks were never onlined: ejecting succeeds
        assert not g.memory.contains(addr)
        assert memory_blocks(g) == before
        with pytest.raises(KeyError):
            g.unplug_dimm(dev)


@pytest.mark.parametrize("profile", ["arm64"])
def test_arm64_virtio_mem_resize(profile):
    with Guest(profile, hotplug=True) as g:
        base = next(d["data"] for d in g.qmp("query-memory-devices")
                    if d["type"] == "virtio-mem")["memaddr"]
        assert g.memory.contains(base, 8)
        total = mem_total_kib(g)
        g.virtio_mem_resize(256)
        deadline = time.monotonic() + 20
        while mem_total_kib(g) < total + (256 << 10) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mem_total_kib(g) == total + (256 << 10)
        g.virtio_mem_resize(0)
        assert mem_total_kib(g) == total
        with pytest.raises(ValueError):
            g.virtio_mem_resize(1 << 20)


def user_mode_registers(g: Guest) -> dict[str, int] | None:
    """Registers sampled while a busy user process runs, or None if never caught in user mode."""
    g.ssh("setsid sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &")
    for _ in range(40):
        g.stop()
        regs = g.registers()
        user = regs["cpl"] == 3 if "cpl" in regs else (regs["cpsr"] >> 2) & 3 == 0
        if user:
            return regs  # left stopped
        g.cont()
        time.sleep(0.05)
    return None


@pytest.mark.parametrize("profile", ["x86_64-pti", "arm64-kpti"])
def test_isolation_roots_in_user_mode(profile):
    """Under KPTI, user mode runs on the user root: x86 CR3 = kernel PGD + 4 KiB, arm64 TTBR1 =
    tramp_pg_dir; kernel_root() still finds and verifies swapper/init_top_pgt."""
    with Guest(profile) as g:
        regs = user_mode_registers(g)
        assert regs is not None, "never stopped the guest in user mode"
        root = g.kernel_root()
        if g.profile.arch == "x86_64":
            assert regs["cr3"] & 0x1000, f"CR3 {regs['cr3']:#x} in user mode is not the user PGD"
            assert root == g.vmcoreinfo().kernel_root("x86_64")
        else:
            ttbr1 = regs["ttbr1_el1"] & 0xFFFF_FFFF_F000
            assert ttbr1 == root - 0x2000, f"TTBR1 {ttbr1:#x} at EL0 is not tramp_pg_dir"
        g.cont()
