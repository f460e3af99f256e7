"""A module's core layout from its sysfs sections, and its load / unload on a model table."""

from __future__ import annotations

from typing import Any

import pytest
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.arch import arch_for
from ptlab.engine import PageTable
from ptlab.formats.catalog import by_name
from ptlab.kernel.modules import (
    CoreLayout,
    ModuleLayoutError,
    ModuleMemory,
    load,
    load_areas,
    unload,
    unload_areas,
)
from ptlab.memory.sparse import SparseMemory
from ptlab.walk import Walker

K4 = 4096
BASE = 0xFFFF_FFFF_C023_1000
# qemu_fw_cfg on Debian 6.1.0-57-amd64, /sys/module/qemu_fw_cfg/sections/* (coresize 20480)
SECTIONS = {
    ".bss": BASE + 0x3640, ".data": BASE + 0x3020, ".exit.data": BASE + 0x3240,
    ".exit.text": BASE + 0xD30, ".gnu.linkonce.this_module": BASE + 0x32C0,
    ".init.data": BASE + 0x11000, ".init.text": BASE + 0x10000, ".note.Linux": BASE + 0x1024,
    ".note.gnu.build-id": BASE + 0x1000, ".orc_unwind": BASE + 0x14EC,
    ".orc_unwind_ip": BASE + 0x16D2, ".rodata": BASE + 0x1200, ".rodata.str1.1": BASE + 0x10D0,
    ".strtab": BASE + 0x12DB0, ".symtab": BASE + 0x12000, ".text": BASE,
    ".text.unlikely": BASE + 0xD55, "__bug_table": BASE + 0x3000, "__dyndbg": BASE + 0x3248,
    "__jump_table": BASE + 0x2000, "__mcount_loc": BASE + 0x1060,
}


def test_layout_of_real_sections():
    lay = CoreLayout.of(SECTIONS, 20480)
    assert (lay.base, lay.ro, lay.ro_after_init, lay.data, lay.end) == (
        BASE, BASE + K4, BASE + 2 * K4, BASE + 3 * K4, BASE + 5 * K4)
    assert lay.guard == BASE + 5 * K4
    pk = arch_for("x86_64").page_kernel
    text, ro, roai, data = (lay.attrs(BASE + i * K4, pk) for i in (0, 1, 2, 4))
    assert text.exec and not text.writable
    assert not ro.exec and not ro.writable and not roai.writable
    assert data.writable and not data.exec and data.global_
    with pytest.raises(ModuleLayoutError, match="outside"):
        lay.attrs(lay.guard, pk)


def test_no_ro_after_init_group():
    s = {n: a for n, a in SECTIONS.items() if n != "__jump_table"}
    s = {n: (a - K4 if a >= BASE + 3 * K4 and a < BASE + 0x10000 else a) for n, a in s.items()}
    lay = CoreLayout.of(s, 16384)
    assert lay.ro_after_init == lay.data == BASE + 2 * K4


@pytest.mark.parametrize("sections, size, problem", [
    (SECTIONS, 0, "coresize"), (SECTIONS, 1000, "coresize"),
    ({".data": BASE}, 4096, "no .text"),
    ({".text": BASE, ".rodata": BASE + K4}, 8192, "lack rodata or data"),
    ({".text": BASE, ".rodata": BASE + K4, ".data": BASE}, 8192, "out of order"),
])
def test_bad_layouts(sections, size, problem):
    with pytest.raises(ModuleLayoutError, match=problem):
        CoreLayout.of(sections, size)


def test_load_then_unload():
    fmt = by_name("x86_64-4level")
    mem = SparseMemory(1 << 34)
    pt = PageTable(fmt, mem, alloc=NormalAllocator(PhysPool(mem, 1 << 30, 64 << 20)))
    lay = CoreLayout.of(SECTIONS, 20480)
    pas = {BASE + i * K4: (0x5000 + 7 * i) * K4 for i in range(5)}  # scattered, as vmalloc
    pk = arch_for("x86_64").page_kernel
    assert load(pt, lay, pas.__getitem__, pk) == 5
    runs = list(Walker(fmt, mem, pt.root, ignore_ad=True).run_table(BASE, BASE + 6 * K4))
    assert [(r.va, r.pa, r.page_size) for r in runs] == [(v, p, K4) for v, p in pas.items()]
    assert [(r.attrs.writable, r.attrs.exec) for r in runs] == [
        (False, True), (False, False), (False, False), (True, False), (True, False)]
    assert not pt.translate(lay.guard).mapped
    tables = pt.table_count()
    unload(pt, lay)
    assert not list(Walker(fmt, mem, pt.root).run_table(BASE, BASE + 6 * K4))
    assert pt.table_count() == tables  # vunmap keeps the page tables


def _x86_direct_map() -> tuple[PageTable, int, Any]:
    """An x86 4-level table with 64 MiB of direct map in 2M leaves (PAGE_KERNEL, NX), for the
    alias tests: the table, the direct map's base VA and PAGE_KERNEL."""
    mem = SparseMemory(1 << 34)
    pt = PageTable(by_name("x86_64-4level"), mem,
                   alloc=NormalAllocator(PhysPool(mem, 1 << 30, 64 << 20)))
    dm = 0xFFFF_8880_0000_0000
    pk = arch_for("x86_64").page_kernel
    pt.map(dm, 0, 64 << 20, pk.with_(exec=False, uexec=False), page_sizes=[1 << 21])
    return pt, dm, pk


def test_aliases_ro_on_load_reset_on_unload():
    """x86 cpa_process_alias: set_memory_ro on a module page makes its direct-map alias RO
    (splitting the 2M leaf holding it), NX changes do not reach the alias; vfree's
    vm_remove_mappings leaves the alias RW and non-global, the split kept."""
    pt, dm, pk = _x86_direct_map()
    lay = CoreLayout.of(SECTIONS, 20480)
    pas = {BASE + i * K4: (0x1000 + 3 * i) * K4 for i in range(5)}
    load(pt, lay, pas.__getitem__, pk, alias=lambda pa: dm + pa)

    def alias_attrs() -> list[tuple[bool, bool, bool]]:
        out = []
        for pa in pas.values():
            t = pt.translate(dm + pa)
            out.append((t.attrs.writable, t.attrs.exec, t.attrs.global_))
        return out

    assert alias_attrs() == [(False, False, True)] * 3 + [(True, False, True)] * 2
    assert pt.translate(dm + pas[BASE]).level == 0  # the 2M leaf was split
    assert pt.translate(dm + 0x1001 * K4).attrs.writable  # the neighbours keep RW
    unload(pt, lay, alias=lambda pa: dm + pa)
    assert alias_attrs() == [(True, False, False)] * 5
    assert not pt.translate(BASE).mapped


def test_arm64_alias_covers_the_whole_area_and_gp():
    """arm64 change_memory_common with rodata_full: a PTE_RDONLY change reaches the linear
    alias of every page of the vm area (data included); set_memory_x sets PTE_GP with BTI;
    vm_remove_mappings makes the aliases writable again."""
    from ptlab.kernel.set_direct_map import GP_SW, Arm64Config

    fmt = by_name("arm64-4k-48")
    mem = SparseMemory(1 << 34)
    pt = PageTable(fmt, mem, alloc=NormalAllocator(PhysPool(mem, 1 << 30, 64 << 20)))
    lm = 0xFFFF_0000_0000_0000
    pk = arch_for("arm64").page_kernel
    pt.map(lm, 0, 64 << 20, pk, page_sizes=[K4])  # rodata=full: page-granular
    base = 0xFFFF_8000_0100_0000
    sections = {n: a - BASE + base for n, a in SECTIONS.items()}
    lay = CoreLayout.of(sections, 20480)
    pas = {base + i * K4: (0x1000 + 3 * i) * K4 for i in range(5)}
    load(pt, lay, pas.__getitem__, pk, alias=lambda pa: lm + pa, arm64=Arm64Config(bti=True))
    assert [pt.translate(lm + pa).attrs.writable for pa in pas.values()] == [False] * 5
    assert pt.translate(lm + 0x1001 * K4).attrs.writable  # not a module page
    assert [bool(pt.translate(v).attrs.sw & GP_SW) for v in pas] == [True] + [False] * 4
    assert [pt.translate(v).attrs.exec for v in pas] == [True] + [False] * 4
    unload(pt, lay, alias=lambda pa: lm + pa)
    assert [pt.translate(lm + pa).attrs.writable for pa in pas.values()] == [True] * 5
    assert [pt.translate(lm + pa).attrs.dbm for pa in pas.values()] == [True] * 5


def test_init_layout_from_sections_and_the_walk_at_do_free_init():
    """The init layout: sysfs sections outside the core, its pages as mapped when
    do_free_init began, up to the guard page; a walk that stops short is refused."""
    from ptharness.module_init_watch import init_layout
    from ptlab.walk import Run

    lay = CoreLayout.of(SECTIONS, 20480)
    pk = arch_for("x86_64").page_kernel
    init = BASE + 0x10000  # .init.text; .strtab at + 0x12DB0
    runs = [Run(init, 2 * K4, 0x7000_0000, K4, 0, pk, 2),
            Run(init + 2 * K4, K4, 0x5000_0000, K4, 0, pk, 1)]
    assert init_layout(SECTIONS, lay.contains, runs) == [
        (init, [0x7000_0000, 0x7000_1000, 0x5000_0000])]
    with pytest.raises(ValueError, match="not mapped at do_free_init"):
        init_layout(SECTIONS, lay.contains, runs[:1])
    core_only = {n: a for n, a in SECTIONS.items() if BASE <= a < BASE + 20480}
    assert init_layout(core_only, lay.contains, runs) == []


# qemu_fw_cfg on Debian 6.12.117+deb12-amd64 (coresize 20480): one vm area per memory type,
# each followed by its guard page; the init areas (.init.text, .init.data with the symtab)
# are freed and unmapped
B12 = 0xFFFF_FFFF_C020_9000
SECTIONS_612 = {
    ".text": B12, ".exit.text": B12 + 0xEB0,
    "__bug_table": B12 + 0xB000, "__patchable_function_entries": B12 + 0xB018,
    ".data": B12 + 0xB0A0, ".exit.data": B12 + 0xB2A0, "__dyndbg": B12 + 0xB2A8,
    ".gnu.linkonce.this_module": B12 + 0xB340, ".bss": B12 + 0xB840,
    "__mcount_loc": B12 + 0xE000, ".rodata.str1.1": B12 + 0xE070, ".rodata": B12 + 0xE1A0,
    ".orc_unwind": B12 + 0xE694, ".note.Linux": B12 + 0xEA1C, ".orc_header": B12 + 0xEA60,
    "__jump_table": B12 + 0x2E000, ".init.text": B12 + 0x30000, ".init.data": B12 + 0x32000,
    ".symtab": B12 + 0x32008, ".strtab": B12 + 0x32F38,
}
MAPPED_612 = [(B12, 1), (B12 + 0xB000, 2), (B12 + 0xE000, 1), (B12 + 0x2E000, 1),
              (B12 + 0x2000, 3)]  # the last: another module's area


def mapped_612(va: int) -> bool:
    return any(b <= va < b + n * K4 for b, n in MAPPED_612)


def test_612_one_area_per_memory_type():
    mm = ModuleMemory.of(SECTIONS_612, 20480, mapped_612)
    assert [(a.kind, a.base, a.size) for a in mm.areas] == [
        ("text", B12, K4), ("data", B12 + 0xB000, 2 * K4), ("rodata", B12 + 0xE000, K4),
        ("ro_after_init", B12 + 0x2E000, K4)]
    assert mm.guards == [B12 + K4, B12 + 0xD000, B12 + 0xF000, B12 + 0x2F000]
    assert not mm.contains(B12 + 0x30000) and mm.contains(B12 + 0xC000)
    pk = arch_for("x86_64").page_kernel
    assert [(w.writable, w.exec) for w in (mm.attrs(v, pk) for v in mm.pages())] == [
        (False, True), (True, False), (True, False), (False, False), (False, False)]
    with pytest.raises(ModuleLayoutError, match="outside"):
        mm.attrs(B12 + K4, pk)


@pytest.mark.parametrize("drop, size, problem", [
    (None, 16384, "coresize 0x4000"), (".gnu.linkonce.this_module", 20480, "no .gnu"),
    (None, 0, "positive page multiple"),
])
def test_612_bad_layouts(drop, size, problem):
    s = {n: a for n, a in SECTIONS_612.items() if n != drop}
    with pytest.raises(ModuleLayoutError, match=problem):
        ModuleMemory.of(s, size, mapped_612)


def test_612_two_areas_of_one_type_refused():
    s = {**SECTIONS_612, ".data..ro_after_init": B12 + 0xE100}  # rodata's area
    with pytest.raises(ModuleLayoutError, match="two areas"):
        ModuleMemory.of(s, 20480, mapped_612)


def test_612_load_then_unload_with_aliases():
    """Each area mapped at the kernel's PAs with its guard page left out; text RO+X, data
    RW+NX, rodata and ro_after_init RO+NX; x86 aliases RO for every area but the data;
    unload clears every area's PTEs and resets each alias (RW, non-global)."""
    pt, dm, pk = _x86_direct_map()
    mm = ModuleMemory.of(SECTIONS_612, 20480, mapped_612)
    pas = {v: (0x1000 + 5 * i) * K4 for i, v in enumerate(mm.pages())}
    assert load_areas(pt, mm, pas.__getitem__, pk, alias=lambda pa: dm + pa) == 5
    got = [(pt.translate(v).attrs.writable, pt.translate(v).attrs.exec) for v in pas]
    assert got == [(False, True), (True, False), (True, False), (False, False), (False, False)]
    assert not any(pt.translate(g).mapped for g in mm.guards)
    assert [pt.translate(dm + pa).attrs.writable for pa in pas.values()] == [
        False, True, True, False, False]
    tables = pt.table_count()
    unload_areas(pt, mm, alias=lambda pa: dm + pa)
    assert not any(pt.translate(v).mapped for v in pas)
    assert [(pt.translate(dm + pa).attrs.writable, pt.translate(dm + pa).attrs.global_)
            for pa in pas.values()] == [(True, False)] * 5
    assert pt.table_count() == tables


def test_612_arm64_alias_per_area():
    """arm64 rodata_full: a PTE_RDONLY change reaches the linear alias of its own area only,
    so (unlike 6.1's single core area) the data's aliases stay writable."""
    from ptlab.kernel.set_direct_map import Arm64Config

    fmt = by_name("arm64-4k-48")
    mem = SparseMemory(1 << 34)
    pt = PageTable(fmt, mem, alloc=NormalAllocator(PhysPool(mem, 1 << 30, 64 << 20)))
    lm = 0xFFFF_0000_0000_0000
    pk = arch_for("arm64").page_kernel
    pt.map(lm, 0, 64 << 20, pk, page_sizes=[K4])
    shift = 0xFFFF_8000_0100_0000 - B12
    mm = ModuleMemory.of({n: a + shift for n, a in SECTIONS_612.items()}, 20480,
                         lambda va: mapped_612(va - shift))
    pas = {v: (0x1000 + 3 * i) * K4 for i, v in enumerate(mm.pages())}
    load_areas(pt, mm, pas.__getitem__, pk, alias=lambda pa: lm + pa,
               arm64=Arm64Config(bti=True))
    assert [pt.translate(lm + pa).attrs.writable for pa in pas.values()] == [
        False, True, True, False, False]
    assert [pt.translate(v).attrs.exec for v in pas] == [True] + [False] * 4
