"""Guest lifecycle on real kernels: boot + agent, failure detection, cleanup, roots vs registers."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from pathlib import Path

import pytest
from conftest import FAIL_FAST_S, assert_cleaned
from ptharness import oracle, scenarios
from ptharness.guest import Guest, GuestError
from ptharness.profiles import PROFILES
from ptlab.arch import arm64 as arm64_arch

pytestmark = pytest.mark.qemu



def ram_ranges(info: dict) -> list[tuple[int, int]]:
    """``ptagent info``'s System RAM as [start, end) pairs."""
    return [(r["start"], r["end"]) for r in info["system_ram"]]


def iomem_system_ram(g: Guest) -> list[tuple[int, int]]:
    """Top-level "System RAM" lines of /proc/iomem, read with cat (inclusive ends made
    exclusive)."""
    rc, out, _ = g.ssh("cat /proc/iomem")
    assert rc == 0
    ranges = []
    for line in out.splitlines():
        span, _, name = line.partition(" : ")
        if not line.startswith(" ") and name.strip() == "System RAM":
            lo, hi = span.split("-")
            ranges.append((int(lo, 16), int(hi, 16) + 1))
    return ranges


def kcore(g: Guest, va: int, size: int) -> bytes:
    """``size`` bytes at kernel VA ``va`` as the kernel reads them (/proc/kcore via ptagent)."""
    reply = g.agent("kread", hex(va), str(size))
    assert reply["va"] == va
    return bytes.fromhex(reply["hex"])


@pytest.mark.parametrize("profile", ["x86_64"])
def test_boot_and_agent_info(profile, guest_pool):
    """The pool's booted guest: its run directory, the agent's info against busybox reads,
    SSH exit codes, a paused guest's SSH timeout, the console's ready mark. (A guest's clean
    close is checked when the pool closes; a killed QEMU's by test_cli_live_qemu.)"""
    g = guest_pool.acquire(profile)
    rundir = g.rundir
    assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
    assert {"qmp.sock", "gdb.sock", "serial.log"} <= set(os.listdir(rundir))
    assert "ram0" not in os.listdir(rundir)  # mapped, then unlinked
    info = g.agent("info")
    # the agent's info against the guest's own files, read by busybox over SSH
    assert info["uname"]["release"] == g.image.kernel_version == g.ssh("uname -r")[1].strip()
    assert info["cmdline"] == g.ssh("cat /proc/cmdline")[1].strip()
    pa, size = (int(x, 16) for x in g.ssh("cat /sys/kernel/vmcoreinfo")[1].split())
    assert (info["vmcoreinfo"]["paddr"], info["vmcoreinfo"]["size"]) == (pa, size)
    assert ram_ranges(info) == iomem_system_ram(g)
    names = sorted(info["kallsyms"])[:5] + ["init_top_pgt"]  # the kernel root's symbol too
    syms = {n: info["kallsyms"][n] for n in names}
    assert syms and scenarios.grep_kallsyms(g, list(syms)) == syms
    assert g.boot_seconds is not None and 0 < g.boot_seconds < g.boot_timeout
    rc, out, _ = g.ssh("cat /proc/cmdline")
    assert rc == 0 and "secretmem.enable=1" in out and "ptlab.key=" in out
    assert g.ssh("exit 7")[0] == 7
    # /init forks the agent daemon without an exec (guest/PROTOCOL.md): the kernel's view of
    # it, and the daemon's own limits stay its own (an SSH shell has the kernel's default)
    daemon = g.agent("ping")["pid"]
    assert g.ssh(f"cat /proc/{daemon}/comm")[1] == "ptagent-serve\n"
    limits = g.ssh(f"grep 'locked memory' /proc/{daemon}/limits /proc/self/limits")[1]
    assert [ln.split()[3:5] for ln in limits.splitlines()] == [
        ["unlimited", "unlimited"], ["8388608", "8388608"]], limits
    usage = g.ssh("dropbear -h 2>&1")[1]  # password logins compiled out: no -s to disable them
    assert "-p [address:]port" in usage and "\n-s" not in usage, usage
    assert g.running
    g.stop()
    assert not g.running
    t = time.monotonic()
    with pytest.raises(GuestError, match="did not finish"):
        g.ssh("true", timeout=0.5)  # a paused guest is a hung SSH: bounded, reported
    assert time.monotonic() - t < 4
    g.cont()
    assert g.running
    assert g.ssh("echo back")[1] == "back\n"  # the session survives the timeout
    console = g.console_tail(10_000).splitlines()
    ready = [i for i, ln in enumerate(console) if ln.strip() == "PTLAB-READY"]
    assert len(ready) == 1, "PTLAB-READY not printed exactly once on the console"
    assert console[ready[0] - 1].startswith("ptlab-init: uptime init="), console[ready[0] - 1]


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
    g = Guest(profile, boot_timeout=0.6)  # QEMU is up in ~0.15 s, the kernel needs 1.5 s+
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


X86_CR3_ADDR = 0x000F_FFFF_FFFF_F000  # CR3 bits 51:12 (arch/x86: CR3_ADDR_MASK)
X86_PTI_USER_BIT = 1 << 12  # PTI_USER_PGTABLE_MASK
ARM64_TTBR_BADDR = 0x0000_FFFF_FFFF_FFFE  # TTBRn_EL1.BADDR


def canonical(va: int, bits: int) -> bool:
    """Whether ``va`` is sign-extended from bit ``bits - 1``."""
    top = va >> (bits - 1)
    return top in (0, (1 << (65 - bits)) - 1)


def xp_table(g: Guest, pa: int) -> list[int]:
    """The 512 entries of the table at ``pa`` as QEMU reads guest memory (HMP xp)."""
    return oracle.read_phys_u64s(g.hmp, pa, 512)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_kernel_root_has_witnesses(profile, seeded_rng, guest_pool):
    """kernel_root() (from VMCOREINFO, cross-checked with the registers) is the table that
    QEMU and the kernel themselves name: QEMU's own translation (gva2gpa) of the kernel's VA of
    its root table (x86 init_top_pgt from /proc/kallsyms, arm64 SYMBOL(swapper_pg_dir) from the
    kernel's VMCOREINFO text) gives it, its bytes as the kernel reads them through /proc/kcore
    equal guest RAM there, and the live registers (CR3 over QMP, TTBR1_EL1 over the gdbstub)
    point at it or at a table with the same kernel half."""
    g = guest_pool.acquire(profile)
    p = g.profile
    vi = g.vmcoreinfo()
    assert vi.osrelease == g.image.kernel_version
    root = g.kernel_root()
    fmt = g.kernel_format()
    levels = p.levels_on(g.kernel_series)
    assert fmt.levels == levels, f"{profile}: {fmt.levels}-level, expected {levels}"
    if p.arch == "x86_64":
        # /proc/kallsyms as the agent read it (test_boot_and_agent_info checks the agent's
        # symbols against busybox grep; a grep of kallsyms costs ~1.3 s of guest CPU)
        root_va = g.info["kallsyms"]["init_top_pgt"]
        # 5-level paging: the direct map base (the kernel's own variable, read through
        # /proc/kcore by the agent) is a 57-bit address, no 48-bit one
        pob = g.info["kvars"]["page_offset_base"]
        assert canonical(pob, 48) == (p.levels == 4), f"page_offset_base {pob:#x}"
        assert canonical(pob, 57)
        # PVH boots without KASLR; the la57 entry sets KASLR_FLAG as the decompressor does, so
        # the kernel randomises its direct map base (arch/x86/mm/kaslr.c; 1 GiB steps over
        # ~2^56 bytes: never the default by chance)
        default = 0xFF11_0000_0000_0000 if p.levels == 5 else 0xFFFF_8880_0000_0000
        assert (pob != default) == (p.entry == "la57"), f"page_offset_base {pob:#x}"
    else:
        root_va = vi.symbol("swapper_pg_dir")
        assert vi.kernel_va_bits == fmt.va_bits
        # the layout ptlab infers from the format is the kernel's own (its exported
        # MODULES/VMALLOC/VMEMMAP ranges): 6.1's, or 6.12's 6.9+ layout
        assert arm64_arch.layout_from_vmcoreinfo(vi) == arm64_arch.layout(
            fmt.va_bits, fmt.page_shift)
    in_kcore = kcore(g, root_va, 4096)  # while the guest runs
    regs = scenarios.stop_where(
        g, lambda r: scenarios.in_kernel_regime(g, r, root), rng=seeded_rng)
    assert oracle.gva2gpa(g.hmp, root_va) == root, f"gva2gpa({root_va:#x}) is not the root"
    top = g.memory.read_table(root, 512)
    assert (top != 0).sum() > 0
    assert bytes(top) == in_kcore, "guest RAM at the root differs from /proc/kcore"
    assert xp_table(g, root) == [int(x) for x in top]  # QEMU reads the same
    assert (g.pmem().read_table(root, 512) == top).all()  # and so does pmemsave
    if p.arch == "x86_64":
        pgd = regs["cr3"] & X86_CR3_ADDR & ~X86_PTI_USER_BIT
        assert xp_table(g, pgd)[256:] == [int(x) for x in top[256:]], (
            f"CR3 {regs['cr3']:#x}: kernel half is not init_top_pgt's")
    else:
        assert regs["ttbr1_el1"] & ARM64_TTBR_BADDR == root, f"TTBR1 {regs['ttbr1_el1']:#x}"
        assert not g.running  # reading registers over the gdbstub kept it stopped
    g.cont()
    assert g.running


@pytest.mark.parametrize("profile", ["x86_64", "arm64"])
def test_checkpoint_reset(profile, guest_pool, seeded_rng):
    """The guest comes back to its checkpoint: files, processes and guest RAM the host
    overwrote (the kernel root, a zero page) are as they were, and the same boot runs on.
    (The checkpoint replaces the pool's: the same boot, a moment later.)"""
    g = guest_pool.acquire(profile)
    boot_id = g.ssh("cat /proc/sys/kernel/random/boot_id")[1]  # made on its first read
    daemon = g.agent("ping")["pid"]
    g.checkpoint()
    # RAM copied by the harness, not saved by QEMU: no virtqueue in a ROM blob's RAM (arm64
    # boots with retain_initrd, ptharness.profiles.BOARDS, and the kernel says it kept it)
    assert g.checkpoint_fast
    if g.profile.arch == "arm64":
        assert "Freeing initrd memory" not in g.ssh("dmesg")[1]
    g.ssh("echo dirty > /tmp/ptlab-reset-probe")
    g.stop()
    root = g.kernel_root()
    top = g.memory.read(root, 4096)
    start, end = max(g.memory.ranges(), key=lambda r: r[1] - r[0])
    zero = next(pa for pa in (seeded_rng.randrange(start, end) & ~0xFFF for _ in range(1000))
                if not g.memory.read(pa, 4096).strip(b"\0"))
    g.memory.write(root, b"\xa5" * 4096)  # a stopped guest: nothing runs on it until reset
    g.memory.write(zero, b"\x5a" * 4096)
    t = time.monotonic()
    g.reset()  # the SSH session is made by the first command after it: timed with it
    assert g.agent("ping")["pid"] == daemon
    elapsed = time.monotonic() - t
    print(f"reset_s[{profile}]: {elapsed:.3f} (boot {g.boot_seconds:.2f} s)")
    assert g.memory.read(root, 4096) == top
    assert g.memory.read(zero, 4096) == bytes(4096)
    rc, _, _ = g.ssh("test -e /tmp/ptlab-reset-probe")
    assert rc == 1, "reset did not bring the guest back to the checkpoint"
    assert g.ssh("cat /proc/sys/kernel/random/boot_id")[1] == boot_id
    assert elapsed < g.boot_seconds, f"reset {elapsed:.2f} s is no faster than a boot"
    # the session a reset leaves to the first command is made within that command's bound
    g.reset()
    g.stop()
    t = time.monotonic()
    with pytest.raises(GuestError, match="SSH after reset"):
        g.ssh("true", timeout=1)
    assert time.monotonic() - t < 3
    g.cont()
    assert g.ssh("echo back")[1] == "back\n"


def memory_blocks(g: Guest) -> int:
    rc, out, _ = g.ssh("ls -d /sys/devices/system/memory/memory* | wc -l")
    assert rc == 0
    return int(out)


def mem_total_kib(g: Guest) -> int:
    rc, out, _ = g.ssh("grep MemTotal /proc/meminfo")
    assert rc == 0
    return int(out.split()[1])


SECRET_BEYOND_MEMLOCK = 2100  # pages: more than the default RLIMIT_MEMLOCK (8 MiB, 2048 pages)
CAPPED_SOCK = "/tmp/ptlab-capped.sock"  # a second agent daemon's, with a 64 KiB memlock limit


@pytest.mark.parametrize("profile", ["x86_64", "arm64"])
def test_agent_holds_secretmem_beyond_the_memlock_default(profile, guest_pool, seeded_rng):
    """secretmem pages are locked memory, and the kernel refused (SIGBUS) a page beyond the
    8 MiB RLIMIT_MEMLOCK default, which killed the agent daemon and everything it held. The
    daemon lifts its own limit (the kernel's /proc/PID/limits says so); it then holds more
    than 8 MiB, the pages gone from the direct map (QEMU's gva2gpa, in the kernel regime, of
    a sample of their direct-map VAs: unmapped; of the kernel root's: mapped), and it still
    answers afterwards. A page the kernel refuses is an error reply, not a dead daemon."""
    g = guest_pool.acquire(profile)
    daemon = g.agent("ping")["pid"]
    limits = g.ssh(f"cat /proc/{daemon}/limits")[1]
    locked = next(ln for ln in limits.splitlines() if ln.startswith("Max locked memory"))
    assert locked.split()[3:5] == ["unlimited", "unlimited"], locked
    held = g.agent("secretmem", str(SECRET_BEYOND_MEMLOCK))
    pfns = held["pfns"]
    assert len(pfns) == SECRET_BEYOND_MEMLOCK and None not in pfns and len(set(pfns)) == len(pfns)
    root = g.kernel_root()
    assert g.info  # (x86: page_offset_base's address, fetched while the guest runs)
    scenarios.stop_where(g, lambda r: scenarios.in_kernel_regime(g, r, root), rng=seeded_rng)
    try:
        dm = scenarios.direct_map(g)
        sample = pfns[:: len(pfns) // 50] + pfns[-1:]
        vas = [dm.va(root)] + [dm.va(p * 4096) for p in sample]
        assert oracle.gva2gpa_many(g.hmp, vas).gpas == [root] + [None] * len(sample)
    finally:
        g.cont()
    assert g.agent("release", str(held["id"]))["released"] == [held["id"]]
    assert g.agent("ping")["pid"] == daemon
    # a second daemon kept at 64 KiB (PTAGENT_MEMLOCK): the kernel refuses the 17th page; the
    # reply says so, nothing is held, and that daemon still answers (it used to die of SIGBUS)
    capped = f"PTAGENT_SOCK={CAPPED_SOCK}"
    rc, out, err = g.ssh(f"{capped} PTAGENT_MEMLOCK=65536 /bin/ptagent serve -d")
    assert rc == 0, (out, err)
    rc, out, _ = g.ssh(f"{capped} /bin/ptagent secretmem 64")
    assert rc == 1 and json.loads(out) == {
        "error": "secretmem: the kernel refused page 16 of 64 (SIGBUS)", "errno": 14}, out
    rc, out, _ = g.ssh(f"{capped} /bin/ptagent ping")
    assert rc == 0 and json.loads(out)["objects"] == 0, out


@pytest.mark.parametrize("profile", ["x86_64"])
def test_x86_dimm_hotplug(profile, guest_pool):
    """A DIMM plugged into the pool guest (which has hotplug slots) appears as two memory
    blocks and in the harness's RAM map, and goes away again; the pool then resets the guest
    (loadvm works once the DIMM and its backend are gone)."""
    g = guest_pool.acquire(profile)
    assert g.hotplug
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
    assert not g.dimms  # the pool can reset it


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
def test_isolation_roots_in_user_mode(profile, guest_pool):
    """Under KPTI, user mode runs on another root: x86 CR3 = the process's kernel PGD + 4 KiB,
    whose tables QEMU's own walk finds mapping the entry text but not the kernel's data;
    arm64 TTBR1_EL1 = tramp_pg_dir (two pages below swapper_pg_dir in vmlinux.lds.S), a table
    with one entry. Tables are read by QEMU (xp), translations are QEMU's (gva2gpa)."""
    g = guest_pool.acquire(profile)
    root = g.kernel_root()
    syms = g.info["kallsyms"]
    regs = user_mode_registers(g)
    assert regs is not None, "never stopped the guest in user mode"
    if g.profile.arch == "x86_64":
        assert regs["cr3"] & X86_PTI_USER_BIT, f"CR3 {regs['cr3']:#x} in user mode"
        pgd = regs["cr3"] & X86_CR3_ADDR & ~X86_PTI_USER_BIT
        assert pgd != root, "a user process runs on init_top_pgt"
        assert xp_table(g, pgd)[256:] == xp_table(g, root)[256:]
        assert oracle.gva2gpa(g.hmp, syms["__entry_text_start"]) is not None
        for name in ("init_top_pgt", "linux_banner"):
            assert oracle.gva2gpa(g.hmp, syms[name]) is None, f"{name} is mapped"
    else:
        ttbr1 = regs["ttbr1_el1"] & ARM64_TTBR_BADDR
        assert ttbr1 == root - 0x2000, f"TTBR1 {ttbr1:#x} at EL0 is not tramp_pg_dir"
        tramp = xp_table(g, ttbr1)
        assert sum(e != 0 for e in tramp) == 1, "the trampoline table maps one region"
    g.cont()
