"""The CLI on a real arm64 guest (profile ``arm64``: 4K granule, 48-bit VA, KASLR and so KPTI at
EL0): one guest run with ``-device vmcoreinfo`` and a second QMP monitor, stopped at EL1 on
swapper_pg_dir and dumped with QEMU's ``dump-guest-memory`` (ELF with the kernel's VMCOREINFO).

Witnesses ptlab did not write: QEMU's ``gva2gpa`` at the same stop, drgn 0.3.0's
``follow_phys`` over the same dump, the kernel's own reads through ``/proc/kcore`` (the agent's
``kread``), ``/proc/kallsyms``, the agent's canary and secretmem PFNs (``/proc/self/pagemap``),
and TTBR1_EL1 read through QEMU's gdbstub.

* ``translate --json --file``: sampled kernel VAs (mapped and not) agree with gva2gpa and drgn;
  the one-VA trace of ``_stext`` ends at gva2gpa's PA.
* ``check``: nothing on the clean guest, text = kallsyms' _stext.._etext, the KPTI trampoline
  table found at swapper_pg_dir - 0x2000; a copy of the dump with four planted changes reports
  exactly them (PXN cleared on a writable linear-map page: ``wx``; AP[1] set: ``user-kernel``;
  UXN cleared: ``el0-exec``; the kernel image's top-level entry copied into tramp_pg_dir:
  ``user-root`` findings covering _stext).
* ``diff``: tramp_pg_dir adds nothing to swapper_pg_dir and leaves out the kernel text; two
  dumps around the agent's ``secretmem`` differ by the secret pages leaving the linear map.
* ``search HEX`` of the agent's canary through the agent's own root: the user VA and the
  linear-map alias (gva2gpa), both at the agent's pagemap PFN.
* ``disasm _stext``: the instructions' bytes are /proc/kcore's; ``kaslr``: the executable
  image starts at kallsyms' _stext and the offset agrees with VMCOREINFO's KERNELOFFSET.
* ``map --svg --png``: arm64's regions, kernel text ``rx``, no W+X.
* QEMU's kdump-zlib dump of the same stop: 64 KiB blocks with a 4 KiB-page VMCOREINFO note,
  read by block (live RAM) and walked as the ELF dump is.
* ``--qmp`` on the live guest: arm64's monitor shows no TTBR, so ptlab finds the kernel's
  VMCOREINFO note in guest RAM; its root is the gdbstub's TTBR1_EL1 (swapper_pg_dir) and its
  walk equals the harness's walk of the shared RAM, in place and through pmemsave; a running
  guest is stopped only while ptlab reads.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import pytest
from cli_helpers import (
    check_map,
    check_walk_resumes,
    cli,
    disasm_stext,
    elf_file_offset,
    harness_walk,
    json_runs,
    patch_u64s,
    planted_copy,
    ptlab,
)
from ptharness import oracle, scenarios
from ptharness.guest import Guest
from ptlab.memory import ElfCore
from ptlab.memory.kdump import KdumpCompressed
from ptlab.walk import Walker, translate

pytestmark = [pytest.mark.qemu, pytest.mark.profile("arm64")]

PROFILE = "arm64"
SAMPLE, WILD = 2_000, 300  # VAs from runs / anywhere in the kernel half, checked with gva2gpa
PXN, UXN, AP_EL0 = 1 << 53, 1 << 54, 1 << 6
TTBR_BADDR = ((1 << 48) - 1) & ~1
TRAMP_OFFSET = 0x2000  # tramp_pg_dir = swapper_pg_dir - 2 pages (arch/arm64/kernel/vmlinux.lds.S)
SECRET_PAGES = 4
LINEAR_SPAN = 1 << 40  # VA span searched for linear-map runs (the guest has 1 GiB of RAM)


@pytest.fixture(scope="module")
def arm(tmp_path_factory: pytest.TempPathFactory, rng_factory: Any) -> Any:
    """The booted guest (second QMP monitor at ``sock``), its kallsyms, linear map, canary and
    the kcore bytes of _stext; an ELF dump taken at a stop at EL1 on swapper_pg_dir (the guest
    is left stopped there), and the gdbstub's registers at that stop."""
    tmp = tmp_path_factory.mktemp("cli-arm64")
    sock, path = tmp / "live.sock", tmp / "vmcore.elf"
    mon = ("-chardev", f"socket,id=qmp1,path={sock},server=on,wait=off",
           "-mon", "chardev=qmp1,mode=control")
    try:
        with Guest(PROFILE, devices=("vmcoreinfo",), qemu_args=mon) as g:
            syms = scenarios.kallsyms(g, ("_stext", "_etext"))
            assert set(syms) == {"_stext", "_etext"}, syms
            reply = g.agent("kread", hex(syms["_stext"]), "64")
            stext_bytes = bytes.fromhex(reply["hex"])
            canary = g.agent("canary")  # held by the agent daemon until the guest goes
            root, fmt = g.kernel_root(), g.kernel_format()
            # Debian's 6.1: 48-bit VA, 4 levels; 6.12: ARM64_VA_BITS_52 + LPA2, 5 levels
            series = g.kernel_series
            levels = g.profile.levels_on(series)
            assert fmt.name == {4: "arm64-4k-48", 5: "arm64-4k-52"}[levels], fmt.name
            regs = scenarios.stop_where(g, lambda r: scenarios.in_kernel_regime(g, r, root),
                                        rng_factory("cli-arm64-stop"))
            g.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
            dm = scenarios.direct_map(g)
            yield {"g": g, "sock": sock, "path": path, "tmp": tmp, "syms": syms, "root": root,
                   "fmt": fmt, "regs": regs, "canary": canary, "dm": dm,
                   "stext_bytes": stext_bytes, "series": series}
    finally:
        path.unlink(missing_ok=True)


def test_translate_agrees_with_qemu_and_drgn(arm: Any, seeded_rng: random.Random) -> None:
    import _drgn
    import drgn

    g, path, fmt, root = arm["g"], arm["path"], arm["fmt"], arm["root"]
    lo, hi = scenarios.kernel_half(fmt)
    core = ElfCore(path)
    try:
        assert core.vmcoreinfo is not None, "no VMCOREINFO note: qemu_fw_cfg not loaded?"
        runs = list(Walker(fmt, core, root).runs(lo, hi))
        pgd = core.vmcoreinfo.symbol("swapper_pg_dir")
    finally:
        core.close()
    vas = [(r.va + seeded_rng.randrange(r.size)) & ~7 for r in seeded_rng.choices(runs, k=SAMPLE)]
    vas += [seeded_rng.randrange(lo, hi) & ~7 for _ in range(WILD)]
    vafile = arm["tmp"] / "vas.txt"
    vafile.write_text("".join(f"{va:#x}\n" for va in vas))
    code, out = cli("--dump", str(path), "translate", "--json", "--file", str(vafile))
    vafile.unlink()
    ours = [json.loads(line) for line in out.splitlines()]
    assert len(ours) == len(vas) and code == 1  # some random VAs are unmapped
    assert all(o["va"] == hex(va) for va, o in zip(vas, ours, strict=True))
    pas = [int(o["pa"], 16) if o["pa"] is not None else None for o in ours]
    qemu = oracle.gva2gpa_many(g.hmp, vas)
    bad = [(hex(va), p, q) for va, p, q in zip(vas, pas, qemu.gpas, strict=True) if p != q]
    assert not bad, bad[:10]
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    for va, p in zip(vas, pas, strict=True):
        try:
            theirs = _drgn._linux_helper_follow_phys(prog, pgd, va)
        except drgn.FaultError:
            theirs = None
        assert p == theirs, (hex(va), p, theirs)
    assert sum(p is not None for p in pas) >= SAMPLE  # every VA sampled from a run is mapped
    stext = arm["syms"]["_stext"]
    code, trace = cli("--dump", str(path), "translate", hex(stext))
    last = trace.splitlines()[-1]
    assert code == 0 and last.startswith(f"=> PA {oracle.gva2gpa(g.hmp, stext):#x} "), trace


def test_check_clean_guest(arm: Any) -> None:
    code, out = cli("--dump", str(arm["path"]), "check")
    lines = out.splitlines()
    root, syms = arm["root"], arm["syms"]
    assert code == 0 and len(lines) == 1, out
    # Observed: 6.1 fills tramp_pg_dir on this profile (no KPTI: QEMU's max CPU has E0PD),
    # 6.12 leaves it empty unless KPTI is on (the arm64-kpti profile, kpti=1, fills it)
    user = (f"KPTI tramp_pg_dir (swapper_pg_dir - 0x2000) at {root - TRAMP_OFFSET:#x}"
            if arm["series"] == "6.1" else "no user-side root")
    assert lines[0] == (f"# 0 finding(s); root {root:#x}, text {syms['_stext']:#x}-"
                        f"{syms['_etext']:#x}, {user}"), lines


def test_check_finds_planted_changes(arm: Any, seeded_rng: random.Random) -> None:
    fmt, root, stext = arm["fmt"], arm["root"], arm["syms"]["_stext"]
    planted = planted_copy(arm["path"], arm["tmp"])
    core = ElfCore(planted)
    try:
        base = arm["dm"].base
        linear = [r for r in Walker(fmt, core, root).runs(base, base + LINEAR_SPAN)
                  if r.page_size == 4096 and r.attrs.writable and not r.attrs.exec
                  and not r.attrs.user]
        picks = seeded_rng.sample(linear, 3)
        vas = [r.va + seeded_rng.randrange(r.size // 4096) * 4096 for r in picks]
        edits = []  # (file offset of a leaf, bits to set, bits to clear)
        for va, (set_, clear) in zip(vas, ((0, PXN), (AP_EL0, 0), (0, UXN)), strict=True):
            t = translate(fmt, core, root, va)
            assert t.pa is not None and t.steps[-1].level == 0, t
            edits.append((elf_file_offset(core, t.steps[-1].entry_pa), set_, clear))
        slot = fmt.index(stext & (fmt.va_span - 1), fmt.top_level) * 8
        kernel_entry = core.read(root + slot, 8)
        assert core.read(root - TRAMP_OFFSET + slot, 8) == bytes(8)
        tramp_slot = elf_file_offset(core, root - TRAMP_OFFSET + slot)
        print("planted: W+X {:#x}, EL0 access {:#x}, no UXN {:#x}, tramp slot {}".format(
            *vas, slot // 8))
    finally:
        core.close()
    patch_u64s(planted, edits, [(tramp_slot, kernel_entry)])
    code, out = cli("--dump", str(planted), "check", "--json")
    planted.unlink()
    found = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    for rule, va in zip(("wx", "user-kernel", "el0-exec"), vas, strict=True):
        got = [(f["va"], f["end"]) for f in found if f["rule"] == rule]
        assert got == [(hex(va), hex(va + 4096))], (rule, found)
    leaks = [f for f in found if f["rule"] == "user-root"]
    assert leaks and all(f["root"] == hex(root - TRAMP_OFFSET) for f in leaks), leaks
    assert any(int(f["va"], 16) <= stext < int(f["end"], 16) for f in leaks), leaks
    assert {f["rule"] for f in found} == {"wx", "user-kernel", "el0-exec", "user-root"}, found


def test_diff_swapper_vs_trampoline(arm: Any) -> None:
    """tramp_pg_dir maps only the entry trampoline, at the fixmap VA and PA swapper_pg_dir
    maps it too (map_entry_trampoline, arch/arm64/mm/mmu.c): it adds nothing, and the kernel
    text is in a range it leaves out."""
    root, stext = arm["root"], arm["syms"]["_stext"]
    code, out = cli("--dump", str(arm["path"]), "diff", "--root-b", hex(root - TRAMP_OFFSET),
                    "--json", "--compare-pa")
    changes = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and changes
    assert not [c for c in changes if c["kind"] != "removed"], changes[:5]
    hit = [c for c in changes if int(c["va"], 16) <= stext < int(c["end"], 16)]
    assert len(hit) == 1, hit


def test_search_finds_agent_canary(arm: Any) -> None:
    """``search HEX`` of the agent's canary through the agent's own root (found in the dump by
    its canary mapping): the agent's user VA and the linear-map alias gva2gpa translates, both
    at the PFN the agent read from /proc/self/pagemap."""
    canary, fmt, g = arm["canary"], arm["fmt"], arm["g"]
    va, pa = canary["va"], canary["pfn"] * 4096
    alias = arm["dm"].va(pa)
    assert oracle.gva2gpa(g.hmp, alias) == pa
    from ptlab.formats.arm64 import Arm64

    ufmt = Arm64(fmt.granule, 64 - (arm["regs"]["tcr_el1"] & 0x3F), upper=False)  # T0SZ
    core = ElfCore(arm["path"])
    try:
        roots = scenarios.find_user_roots(ufmt, core, {va: pa})
    finally:
        core.close()
    assert roots, "no table root maps the agent's canary"
    code, out = cli("--dump", str(arm["path"]), "--root", hex(roots[0]), "--format", ufmt.name,
                    "search", canary["pattern"], "--json")
    assert code == 0, out
    hits = {int(h["va"], 16): int(h["pa"], 16) for h in map(json.loads, out.splitlines())}
    assert hits.get(va) == pa, sorted((hex(v), hex(p)) for v, p in hits.items())
    code, out = cli("--dump", str(arm["path"]), "search", canary["pattern"], "--json")
    hits = {int(h["va"], 16): int(h["pa"], 16) for h in map(json.loads, out.splitlines())}
    assert code == 0 and hits.get(alias) == pa, sorted((hex(v), hex(p)) for v, p in hits.items())


def test_disasm_stext_matches_kcore(arm: Any) -> None:
    stext = arm["syms"]["_stext"]
    insns, got = disasm_stext(arm["path"], stext, 16)
    assert [int(i["va"], 16) for i in insns] == [stext + 4 * k for k in range(16)]
    assert got == arm["stext_bytes"], (got.hex(), arm["stext_bytes"].hex())


def test_kaslr_base(arm: Any) -> None:
    code, out = cli("--dump", str(arm["path"]), "kaslr", "--json")
    obj = json.loads(out)
    syms = arm["syms"]
    assert code == 0 and obj["agree"] and obj["vmcoreinfo_offset"] == obj["offset"], obj
    assert obj["exec"] == [hex(syms["_stext"]), hex(syms["_etext"])], obj
    # _text's header page is not mapped on arm64 (map_kernel starts at _stext): QEMU puts
    # _stext at _text's PA + the same distance
    text, phys = int(obj["text"], 16), int(obj["phys"], 16)
    assert oracle.gva2gpa(arm["g"].hmp, syms["_stext"]) == phys + syms["_stext"] - text


def test_map_svg_of_real_dump(arm: Any) -> None:
    root, data = check_map(arm["path"], arm["tmp"], {
        "Linear Mapping start", "vmalloc() area", "Fixmap start", "vmemmap start"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (int(root.get("width")), int(root.get("height")))


def test_kdump_with_vmcoreinfo_has_64k_blocks(arm: Any, seeded_rng: random.Random) -> None:
    """QEMU writes aarch64 kdump files in 64 KiB blocks whatever the guest's page size
    (target/arm/arch_dump.c: "aarch64 max pagesize"), and with ``-device vmcoreinfo`` the same
    file carries the kernel's note saying PAGESIZE=4096. ptlab reads by the header's block
    size: sampled blocks (the root's among them) equal the stopped guest's live RAM, and the
    walk of the kdump file equals the walk of the ELF dump of the same stop. (libkdumpfile
    takes its page size from the note and finds no data in such a file: README.)"""
    g, fmt = arm["g"], arm["fmt"]
    assert not g.running  # still at the stop of the ELF dump
    kd = arm["tmp"] / "vmcore.kdump-zlib"
    try:
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{kd}", format="kdump-zlib")
        with KdumpCompressed(kd) as mem:
            assert mem.page_size == 1 << 16
            assert mem.vmcoreinfo is not None and mem.vmcoreinfo.page_size == 4096
            blocks = {arm["root"] >> 16}
            for start, end in seeded_rng.choices(g.memory.ranges(), k=64):
                blocks.add(seeded_rng.randrange(start >> 16, end >> 16))
            for b in sorted(blocks):
                assert mem.read(b << 16, 1 << 16) == g.memory.read(b << 16, 1 << 16), hex(b)
        lo = hex(scenarios.kernel_half(fmt)[0])
        code, kdump_walk = cli("--dump", str(kd), "walk", "--start", lo)
        assert code == 0 and kdump_walk == cli("--dump", str(arm["path"]), "walk", "--start",
                                               lo)[1]
        assert len(kdump_walk.splitlines()) > 100
    finally:
        kd.unlink(missing_ok=True)


def test_diff_secretmem_dumps(arm: Any, seeded_rng: random.Random) -> None:
    """Two dumps around the agent's memfd_secret pages: ``diff A B`` reports each secret
    page's linear-map alias removed (set_direct_map_invalid_noflush)."""
    g, dm = arm["g"], arm["dm"]
    after = arm["tmp"] / "after.elf"
    g.cont()
    try:
        reply = g.agent("secretmem", str(SECRET_PAGES))
        pfns = reply["pfns"]
        assert len(set(pfns)) == SECRET_PAGES
        regs = scenarios.stop_where(g, lambda r: scenarios.in_kernel_regime(g, r, arm["root"]),
                                    seeded_rng)
        assert regs
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{after}")
        code, out = cli("--dump", str(arm["path"]), "diff", str(after), "--json",
                        "--start", hex(dm.base), "--end", hex(dm.base + LINEAR_SPAN))
        changes = [json.loads(line) for line in out.splitlines()]
        assert code == 1
        removed = [(int(c["va"], 16), int(c["end"], 16)) for c in changes
                   if c["kind"] == "removed"]
        for pfn in pfns:
            va = dm.va(pfn * 4096)
            assert any(s <= va and va + 4096 <= e for s, e in removed), (hex(va), changes)
            assert oracle.gva2gpa(g.hmp, va) is None  # QEMU: not mapped either
    finally:
        after.unlink(missing_ok=True)


def test_live_qmp(arm: Any) -> None:
    """``--qmp`` on arm64: format and root from the VMCOREINFO note ptlab finds in guest RAM,
    the root checked against TTBR1_EL1 from the gdbstub, the walk against the harness's."""
    g, sock, root = arm["g"], str(arm["sock"]), arm["root"]
    g.stop()
    regs = g.registers()  # gdbstub: TTBR1_EL1 is swapper_pg_dir, or tramp_pg_dir at EL0
    assert regs["ttbr1_el1"] & TTBR_BADDR in (root, root - TRAMP_OFFSET), regs
    lo, _ = scenarios.kernel_half(g.kernel_format())
    theirs = harness_walk(g, root, lo)
    assert len(theirs) > 100
    for extra in ((), ("--qmp-copy",)):
        info = ptlab("--qmp", sock, *extra, "info", "--json")
        assert info.returncode == 0 and not info.stderr, info.stderr
        obj = json.loads(info.stdout)
        assert obj["format"] == arm["fmt"].name and obj["root"] == hex(root), obj
        assert obj["cpus"] == [{"index": 0, "control": {}}], obj["cpus"]
        notes = " ".join(obj["notes"])
        assert "VMCOREINFO note found in memory" in notes, notes
        assert "no arm64 root register" in notes, notes
        walk = ptlab("--qmp", sock, *extra, "walk", "--json", "--start", hex(lo))
        assert walk.returncode == 0 and not walk.stderr, walk.stderr
        assert json_runs(walk.stdout) == theirs, extra
    assert not g.running  # stopped before: ptlab left it so
    g.cont()
    check_walk_resumes(g, "--qmp", sock, "walk", "--start", hex(lo))
