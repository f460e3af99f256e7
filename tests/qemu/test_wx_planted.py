"""The W+X audit's positive case on real kernels: one planted W+X leaf, reported alone.

The real guests all pass DEBUG_WX, so comparing verdicts with dmesg only ever checks
"passed". Here each test takes its profile's pool guest (tests/qemu/conftest.py: the planted
entry is put back, and the next scope gets the guest reset to its checkpoint anyway), stops it
in the kernel regime, takes one present 4K leaf of the kernel half that is writable and not
executable (x86 pte with _PAGE_RW and _PAGE_NX; arm64 descriptor without PTE_RDONLY, with
PTE_PXN) under table entries that restrict nothing (not the arm64 linear map, whose tables
carry PXNTable), clears NX / PXN in guest RAM through the harness's shared-RAM backend, and
checks:

* ptlab's audit (``ptlab.dump.check_wx`` over the live RAM, and ``ptlab wx`` over a QEMU ELF
  dump of the planted guest) reports exactly that page and nothing else (before: passed);
  the dump and the CLI on one profile per architecture (:data:`DUMPED`): the others would
  repeat the same reader and audit at ~1.5 s each, and tests/qemu/test_cli_qemu.py's
  ``check`` of a planted dump covers x86-64 with PTI;
* witnesses ptlab did not write: QEMU's own walk uses that entry for that VA (the entry made
  not-present, gva2gpa says Unmapped); x86: ``info tlb`` differs from before in exactly that
  line, now printed W without X, and QEMU's leaves printed W without X are exactly it;
  arm64 (no ``info tlb``): QEMU reads back the planted descriptor (``xp``) and still
  translates the VA to the same PA.

The entry is restored before the guest runs again, and ``info tlb`` / the audit are then as
before.
"""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
from ptharness import oracle, scenarios
from ptharness.guest import Guest
from ptharness.guestmem import planted_u64
from ptlab.cli import main as ptlab_main
from ptlab.dump import check_wx
from ptlab.walk import translate

pytestmark = pytest.mark.qemu

PAGE = 4096
PRESENT = 1 << 0  # x86 _PAGE_PRESENT; arm64 PTE_VALID
X86_RW, X86_NX = 1 << 1, 1 << 63  # arch/x86/include/asm/pgtable_types.h
ARM64_RDONLY, ARM64_PXN = 1 << 7, 1 << 53  # arch/arm64/include/asm/pgtable-hwdef.h
ARM64_PXN_TABLE, ARM64_AP_TABLE_RO = 1 << 59, 1 << 62  # PMD_TABLE_PXN, APTable[1]
DUMPED = frozenset({"x86_64", "arm64"})  # profiles whose planted guest is dumped for `ptlab wx`


def restricting(g: Guest, table_entry: int) -> bool:
    """Whether a table entry takes write or execute permission away from what it maps (the
    kernel's bits: x86 no _PAGE_RW or _PAGE_NX; arm64 PXNTable or APTable[1])."""
    if g.profile.arch == "x86_64":
        return not table_entry & X86_RW or bool(table_entry & X86_NX)
    return bool(table_entry & (ARM64_PXN_TABLE | ARM64_AP_TABLE_RO))


def pick_leaf(g: Guest, fmt: Any, root: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A random present, writable, non-executable 4K kernel leaf whose table entries restrict
    nothing (so that clearing NX/PXN in the leaf makes it W+X by any count): (VA, PA, entry
    PA, raw entry). Its raw bits are checked with the kernel's constants, not ptlab's decoder."""
    walk = scenarios.walk_kernel(fmt, g.memory, root)
    cands = [r for r in walk.runs
             if r.page_size == PAGE and r.attrs.writable and not r.attrs.exec]
    rng.shuffle(cands)
    for run in cands:
        va = run.va + PAGE * rng.randrange(run.count)
        steps = translate(fmt, g.memory, root, va).steps
        if any(restricting(g, s.raw) for s in steps[:-1]):
            continue  # e.g. the arm64 linear map: its tables carry PXNTable
        raw = steps[-1].raw
        if g.profile.arch == "x86_64":
            assert raw & PRESENT and raw & X86_RW and raw & X86_NX, f"{va:#x}: pte {raw:#x}"
        else:
            assert raw & 3 == 3 and not raw & ARM64_RDONLY and raw & ARM64_PXN, (
                f"{va:#x}: descriptor {raw:#x}")
        return va, run.pa + (va - run.va), steps[-1].entry_pa, raw
    raise AssertionError(f"none of {len(cands)} writable 4K leaf runs has unrestricted tables")


def wx_executable(g: Guest, raw: int) -> int:
    """``raw`` made kernel-executable: x86 NX cleared, arm64 PXN cleared."""
    return raw & ~(X86_NX if g.profile.arch == "x86_64" else ARM64_PXN)


def cli_wx(argv: list[str]) -> tuple[int, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    code = ptlab_main(argv, out=out, err=err)
    assert code in (0, 1), err.getvalue()
    return code, out.getvalue().splitlines()


@pytest.mark.parametrize("profile", ["x86_64", "x86_64-la57", "x86_64-pti", "arm64",
                                     "arm64-kpti"])
def test_planted_wx_leaf_is_reported_alone(profile, seeded_rng, dump_dir, guest_pool):
    g = guest_pool.acquire(profile)
    code, dmesg, _ = g.ssh("dmesg")
    assert code == 0 and "Checked W+X mappings: passed" in dmesg
    root, fmt = g.kernel_root(), g.kernel_format()
    scenarios.stop_where(g, lambda r: scenarios.in_kernel_regime(g, r, root),
                         rng=seeded_rng)
    x86 = g.profile.arch == "x86_64"
    lo, hi = scenarios.kernel_half(fmt)
    before = check_wx(fmt, g.memory, root)
    assert before.passed, before.message
    va, pa, entry_pa, raw = pick_leaf(g, fmt, root, seeded_rng)
    print(f"planting W+X at VA {va:#x} (PA {pa:#x}), entry @{entry_pa:#x} = {raw:#x}")
    assert oracle.gva2gpa(g.hmp, va) == pa
    if x86:
        tlb_before = set(oracle.info_tlb(g.hmp)[0])
        assert not oracle.tlb_wx(tlb_before, lo, hi), "QEMU sees W+X leaves already"

    # the entry ptlab found is the one QEMU's walk uses for this VA
    with planted_u64(g.memory, entry_pa, raw & ~PRESENT):
        assert oracle.gva2gpa(g.hmp, va) is None

    planted = wx_executable(g, raw)
    core = dump_dir / "core.elf"
    with planted_u64(g.memory, entry_pa, planted) as old:
        assert old == raw
        assert oracle.read_phys_u64s(g.hmp, entry_pa, 1) == [planted]  # QEMU sees it
        assert oracle.gva2gpa(g.hmp, va) == pa
        if x86:
            tlb = set(oracle.info_tlb(g.hmp)[0])
            gone, new = tlb_before - tlb, tlb - tlb_before
            assert len(gone) == 1 and len(new) == 1, (gone, new)
            (was,), (now,) = gone, new
            assert now.va == was.va == va and now.pa == was.pa
            assert was.flags[0] == "X" and now.flags == "-" + was.flags[1:]
            assert oracle.tlb_wx(tlb, lo, hi) == [now]
        report = check_wx(fmt, g.memory, root)
        if profile in DUMPED:
            g.qmp("dump-guest-memory", paging=False, protocol=f"file:{core}")
    assert oracle.read_phys_u64s(g.hmp, entry_pa, 1) == [raw]  # restored

    assert report.wx_pages == 1 and report.uxn_pages == 0, report.message
    assert [(r.va, r.size, r.pa) for r in report.runs] == [(va, PAGE, pa)]
    assert not report.passed and "1 W+X pages found" in report.message
    if profile in DUMPED:
        code, out = cli_wx(["wx", "--elf", str(core), "--vmcoreinfo", "scan"])
        core.unlink()
        listed = [ln for ln in out if ln.startswith("W+X ")]
        assert code == 1 and len(listed) == 1, out[-5:]
        assert listed[0].startswith(f"W+X {va:#018x}-{va + PAGE:#018x} "), listed
        assert "FAILED, 1 W+X pages found" in out[-1], out[-1]

    # restored: QEMU and the audit see the guest as before, and it runs on
    if x86:
        assert set(oracle.info_tlb(g.hmp)[0]) == tlb_before
    assert check_wx(fmt, g.memory, root).passed
    g.cont()
    assert g.ssh("echo alive")[1] == "alive\n"
