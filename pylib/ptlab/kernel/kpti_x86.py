"""x86 KPTI: the user PGD built from the kernel PGD as arch/x86/mm/pti.c (6.1) does.

* :func:`pti_init` — ``pti_init()``: ``pti_clone_user_shared`` (the CPU entry area's p4d
  entry, and each CPU's ``cpu_tss_rw`` page mapped ``PAGE_KERNEL`` — no ``_PAGE_GLOBAL``
  under PTI, ``__default_kernel_pte_mask``), ``pti_set_kernel_image_nonglobal``
  (``set_memory_nonglobal`` over [_text, ALIGN(_end, PMD_SIZE))), ``pti_clone_entry_text``
  (``pti_clone_pgtable(.., PTI_CLONE_PMD)``: each present kernel pmd of the entry text gets
  ``_PAGE_GLOBAL`` and is copied, so both roots share its pte table), ``pti_setup_espfix64``
  (the ESPFIX p4d entry), ``pti_setup_vsyscall`` (the vsyscall pte, when mapped).
* :func:`pti_finalize` — ``pti_finalize()``: the entry text again and, when
  ``pti_kernel_image_global_ok()`` (no PCID, pti=auto, no RANDSTRUCT),
  ``pti_clone_kernel_text`` up to ``__end_rodata_aligned`` + ``set_memory_global``.
* :func:`pti_set_user_pgtbl` — ``__pti_set_user_pgtbl()``: a user-half top-level entry is
  copied to the user PGD and the kernel's copy gets NX when it is USER|PRESENT.

The user tables below the copied entries come from ``alloc`` (``_KERNPG_TABLE`` entries,
no large pages: ``pti_user_pagetable_walk_*``). The kernel symbols are inputs
(:class:`PtiLayout`, from the guest's kallsyms), so a harness can predict a real guest's
user PGD (CR3 | 0x1000) and compare it run for run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..alloc import Allocator
from ..arch import x86_64
from ..engine import PageTable
from ..formats.base import Kind
from .set_direct_map import set_memory

PAGE = 4096
P4D_LEVEL, PMD_LEVEL = 3, 1  # generic_pt levels of the p4d (the pgd in 4-level) and pmd
VSYSCALL_ADDR = 0xFFFF_FFFF_FF60_0000  # arch/x86/include/uapi/asm/vsyscall.h
PAGE_KERNEL_PTI = x86_64.PAGE_KERNEL.with_(global_=False)  # PAGE_KERNEL & ~_PAGE_GLOBAL


@dataclass(frozen=True)
class PtiLayout:
    """The kernel symbols pti.c reads (VAs in the high kernel map)."""

    entry_text: tuple[int, int]  # __entry_text_start, __entry_text_end
    text: int  # _text
    etext: int  # _etext
    end_rodata_aligned: int  # __end_rodata_aligned
    end: int  # _end
    cpu_tss: Sequence[int] = ()  # &per_cpu(cpu_tss_rw, cpu) for each possible CPU


def _clone_p4d(kernel: PageTable, user: PageTable, va: int) -> None:
    """``pti_clone_p4d``: the user p4d entry becomes the kernel's, so both share its pud
    table. (An empty kernel entry is left out; 5-level pti.c would still allocate the
    user p4d table above it.)"""
    size = kernel.fmt.entry_size(P4D_LEVEL)
    base = va - va % size
    step = next((s for s in kernel.translate(base).steps if s.level == P4D_LEVEL), None)
    if step is not None and step.entry.kind is Kind.TABLE:
        user.share(kernel, base, size, P4D_LEVEL, replace=True)


def pti_clone_pgtable(kernel: PageTable, user: PageTable, start: int, end: int) -> int:
    """``pti_clone_pgtable(start, end, PTI_CLONE_PMD)``: copy every present kernel pmd over
    [start, end), setting ``_PAGE_GLOBAL`` in both copies; returns the pmds cloned."""
    pmd = kernel.fmt.entry_size(PMD_LEVEL)
    addr, count = start - start % pmd, 0
    while addr < end:
        step = next((s for s in kernel.translate(addr).steps if s.level == PMD_LEVEL), None)
        if step is not None and step.entry.kind is Kind.LEAF and step.entry.attrs.present:
            if not step.entry.attrs.global_:
                kernel.protect(addr, pmd, set={"global_": True})
        elif step is not None and step.entry.kind is Kind.TABLE:
            if not step.entry.attrs.global_:
                kernel.set_table_attrs(addr, PMD_LEVEL, step.entry.attrs.with_(global_=True))
        else:
            addr += pmd  # pud_none / pmd_none: skipped
            continue
        user.share(kernel, addr, pmd, PMD_LEVEL, replace=True)
        count += 1
        addr += pmd
    return count


def pti_init(kernel: PageTable, lay: PtiLayout, alloc: Allocator,
             user_root: int | None = None) -> PageTable:
    """Build the user PGD of ``kernel`` (at ``user_root`` if given, e.g. the kernel
    PGD + 4 KiB of an overlay page cleared for the purpose; else a new table)."""
    user = PageTable(kernel.fmt, kernel.mem, root=user_root, alloc=alloc,
                     gather=kernel.gather)
    _clone_p4d(kernel, user, x86_64.CPU_ENTRY_AREA_BASE)  # pti_clone_user_shared
    for va in lay.cpu_tss:
        pa = kernel.translate(va).pa
        if pa is None:
            raise ValueError(f"cpu_tss_rw at {va:#x} is not mapped in the kernel")
        user.map(va - va % PAGE, pa - pa % PAGE, PAGE, PAGE_KERNEL_PTI, page_sizes=[PAGE],
                 replace=True)
    start, end = lay.text - lay.text % PAGE, -(-lay.end // (1 << 21)) * (1 << 21)
    set_memory(kernel, "nonglobal", start, (end - start) // PAGE)
    pti_clone_pgtable(kernel, user, *lay.entry_text)  # pti_clone_entry_text
    _clone_p4d(kernel, user, x86_64.ESPFIX_BASE)  # pti_setup_espfix64
    vs = kernel.translate(VSYSCALL_ADDR)  # pti_setup_vsyscall
    if vs.fault is None and vs.level == 0:
        e = vs.steps[-1].entry
        user.map(VSYSCALL_ADDR, e.oa, PAGE, e.attrs, page_sizes=[PAGE], replace=True)
    return user


def pti_finalize(kernel: PageTable, user: PageTable, lay: PtiLayout,
                 image_global_ok: bool = False) -> None:
    """Clone the entry text again; with ``image_global_ok`` also the kernel text and
    rodata (pti_clone_kernel_text), making [_text, _etext) global again."""
    pti_clone_pgtable(kernel, user, *lay.entry_text)
    if image_global_ok:
        start = lay.text - lay.text % PAGE
        pti_clone_pgtable(kernel, user, start, lay.end_rodata_aligned)
        set_memory(kernel, "global", start, (-(-lay.etext // PAGE) * PAGE - start) // PAGE)


def pti_set_user_pgtbl(kernel: PageTable, user: PageTable) -> int:
    """Copy every present user-half top-level entry of ``kernel`` to ``user`` and set NX
    on the kernel's copy of the USER ones; returns the entries copied."""
    fmt, top = kernel.fmt, kernel.fmt.levels - 1
    size, count = fmt.entry_size(top), 0
    for va in range(0, fmt.va_span // 2, size):
        step = kernel.translate(va).steps[0]
        if step.entry.kind is Kind.EMPTY:
            continue
        user.share(kernel, va, size, top, replace=True)
        a = step.entry.attrs
        if step.entry.kind is Kind.TABLE and a.user and a.present:
            kernel.set_table_attrs(va, top, a.with_(exec=False, uexec=False))
        count += 1
    return count


def as_populated(kernel: PageTable) -> int:
    """Undo ``__pti_set_user_pgtbl``'s NX on the kernel copy of each present USER top-level
    entry of the user half: the value ``p4d/pgd_populate`` wrote (``_PAGE_TABLE``, no NX).
    A harness starting from a real process's kernel PGD calls this, then
    :func:`pti_set_user_pgtbl`. Returns the entries changed."""
    fmt, top = kernel.fmt, kernel.fmt.levels - 1
    count = 0
    for va in range(0, fmt.va_span // 2, fmt.entry_size(top)):
        e = kernel.translate(va).steps[0].entry
        if e.kind is Kind.TABLE and e.attrs.user and e.attrs.present and not e.attrs.exec:
            kernel.set_table_attrs(va, top, e.attrs.with_(exec=True, uexec=True))
            count += 1
    return count
