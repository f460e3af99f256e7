"""``ptlab kaslr``: the kernel image's virtual and physical base from the page tables alone
(for dumps without VMCOREINFO). The kernel's text is the longest kernel-executable stretch of
the architecture's image range (``ArchOps.image_range``; module text and generated code are
far smaller); the KASLR displacement is its start minus the link-time ``_text``
(``ArchOps.image_base``), rounded down to the 2 MiB both x86-64 (CONFIG_PHYSICAL_ALIGN) and
arm64 (MIN_KIMG_ALIGN) displace the image by; ``_text`` is the link-time address plus it
(arm64 maps its first 64 KiB, the image header, non-executable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arch import arch_for
from .formats.base import Format
from .walk import Walker

KASLR_ALIGN = 2 << 20


@dataclass(frozen=True)
class KernelBase:
    va: int  # _text
    pa: int  # its physical address (the image is physically contiguous)
    offset: int  # va - the link-time _text (VMCOREINFO's KERNELOFFSET)
    text: tuple[int, int]  # the executable stretch found


def find_kernel_base(fmt: Format, mem: Any, root: int, **walker_kw: int) -> KernelBase | None:
    ops = arch_for(fmt)
    lo, hi = ops.image_range(fmt)
    stretches: list[list[int]] = []  # [start, end, pa of start]
    for r in Walker(fmt, mem, root, **walker_kw).runs(lo, hi):  # type: ignore[arg-type]
        if not r.attrs.exec or r.attrs.user:
            continue
        if stretches and stretches[-1][1] == r.va:
            stretches[-1][1] = r.va + r.size
        else:
            stretches.append([r.va, r.va + r.size, r.pa])
    if not stretches:
        return None
    start, end, pa = max(stretches, key=lambda s: s[1] - s[0])
    base = ops.image_base(fmt)
    offset = (start - base) // KASLR_ALIGN * KASLR_ALIGN
    va = base + offset
    return KernelBase(va, pa - (start - va), offset, (start, end))
