"""Synthetic dumps of big machines, built with the engine: a raw image whose tables the engine
wrote, for walks at sizes no test guest has.

:func:`linear_map_image` makes an arm64 (4K granule, 48-bit VA) machine whose linear map covers
all of RAM with 4K pages, as ``rodata=full`` (the arm64 default) maps it: 64 GiB of RAM is 16 M
PTEs in 32,768 tables. Only the table pages are written (the image file is sparse).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ARM64_RAM = 0x4000_0000  # QEMU virt: RAM starts at 1 GiB
ARM64_LINEAR = 0xFFFF_0000_0000_0000  # PAGE_OFFSET with 48-bit VAs (Linux >= 5.4)
FORMAT = "arm64-4k-48"


@dataclass(frozen=True)
class Image:
    """A raw image: its file holds RAM [ram_base, ram_base + ram) from offset 0."""

    path: str
    format: str
    root: int
    ram_base: int
    ram: int
    linear: int  # VA of the first RAM byte in the linear map

    def cli_args(self) -> list[str]:
        """``ptlab`` input options for this image."""
        return ["--raw", self.path, "--region", f"{self.ram_base:#x}:0:{self.ram:#x}",
                "--format", self.format, "--root", f"{self.root:#x}"]


def linear_map_image(path: str | os.PathLike[str], ram: int) -> Image:
    """Write the image of an arm64 machine with ``ram`` bytes of RAM (a multiple of 2 MiB)
    whose linear map the engine maps with 4K pages only; the tables live in the last
    1/256 of RAM (at least 16 MiB)."""
    from ..alloc import NormalAllocator, PhysPool
    from ..engine import PageTable
    from ..formats.base import Attrs
    from ..formats.catalog import by_name
    from ..memory.sparse import SparseMemory

    if ram <= 0 or ram % (2 << 20):
        raise ValueError(f"RAM size {ram:#x} is not a positive multiple of 2 MiB")
    fmt = by_name(FORMAT)
    mem = SparseMemory()
    pool_size = max(16 << 20, ram // 256)
    if pool_size >= ram:
        raise ValueError(f"RAM size {ram:#x} leaves no room for its tables")
    pool = PhysPool(mem, ARM64_RAM + ram - pool_size, pool_size)
    pt = PageTable(fmt, mem, alloc=NormalAllocator(pool))
    rw = Attrs(present=True, writable=True, global_=True, accessed=True, dirty=True,
               shareability=3)  # PAGE_KERNEL: inner shareable, never executable
    pt.map(ARM64_LINEAR, ARM64_RAM, ram, rw, page_sizes=(4096,))
    with open(path, "wb") as f:
        f.truncate(ram)
        for pfn, data in mem.snapshot().items():
            os.pwrite(f.fileno(), data, pfn * 4096 - ARM64_RAM)
    return Image(os.fspath(path), fmt.name, pt.root, ARM64_RAM, ram, ARM64_LINEAR)
