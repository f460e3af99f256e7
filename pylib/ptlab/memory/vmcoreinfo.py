"""VMCOREINFO: the kernel's ``KEY=VALUE`` description of itself for dump tools.

Formats are the kernel's (include/linux/vmcore_info.h, formerly crash_core.h):
``SYMBOL(x)=%lx`` (hex, no prefix), ``NUMBER(x)=%ld`` (signed decimal; arm64 writes most of
its numbers as ``0x%llx``), ``SIZE/OFFSET/LENGTH(x)=%lu``, ``PAGESIZE=%ld``,
``KERNELOFFSET=%lx``, ``OSRELEASE=%s``, ``CONFIG_X=y``. Values stay text until accessed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping

from ..arch import ArchError, ArchOps, arch_for, vmcoreinfo_arch
from .base import MemoryError_, PhysMemory

_HEX_KEYS = ("SYMBOL(", "KERNELOFFSET", "PAGE_OFFSET", "VMALLOC_START", "VMEMMAP_START")


class VmcoreInfoError(MemoryError_, LookupError):
    """A key VMCOREINFO lacks, or a value it cannot hold."""


def _number(text: str) -> int:
    """``%ld`` decimal or ``0x%llx`` hex, either possibly negative."""
    t = text.strip()
    neg = t.startswith("-")
    body = t[1:] if neg else t
    v = int(body, 16) if body[:2].lower() == "0x" else int(body, 10)
    return -v if neg else v


def _hex(text: str) -> int:
    t = text.strip()
    return int(t[2:] if t[:2].lower() == "0x" else t, 16)


class VmcoreInfo(Mapping[str, str]):
    """Parsed VMCOREINFO text: a read-only mapping ``key -> value text`` plus typed accessors.

    Lines without ``=`` are kept in :attr:`malformed` instead of failing the whole note.
    """

    def __init__(self, text: str | bytes) -> None:
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).split(b"\0", 1)[0].decode("utf-8", "replace")
        self.text = text
        self._d: dict[str, str] = {}
        self.malformed: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep or not key:
                self.malformed.append(line)
            else:
                self._d[key] = value

    # --- Mapping --------------------------------------------------------------------------
    def __getitem__(self, key: str) -> str:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"<VmcoreInfo {len(self)} keys, OSRELEASE={self.get('OSRELEASE')!r}>"

    # --- typed access ---------------------------------------------------------------------
    def _conv(self, key: str, conv: type[int] | object) -> int:
        try:
            text = self._d[key]
        except KeyError:
            raise VmcoreInfoError(f"VMCOREINFO has no {key}") from None
        try:
            return conv(text)  # type: ignore[operator]
        except ValueError:
            raise VmcoreInfoError(f"VMCOREINFO {key}={text!r} is not a number") from None

    def value(self, key: str) -> int:
        """Any key as an integer, with the kernel's radix for that kind of key."""
        if key.startswith(_HEX_KEYS):
            return self._conv(key, _hex)
        return self._conv(key, _number)

    def symbol(self, name: str) -> int:
        """``SYMBOL(name)``: the symbol's run-time virtual address (KASLR included)."""
        return self._conv(f"SYMBOL({name})", _hex)

    def number(self, name: str) -> int:
        """``NUMBER(name)``: signed decimal or ``0x`` hex."""
        return self._conv(f"NUMBER({name})", _number)

    def offset(self, struct: str, field: str) -> int:
        return self._conv(f"OFFSET({struct}.{field})", _number)

    def size(self, name: str) -> int:
        return self._conv(f"SIZE({name})", _number)

    def length(self, name: str) -> int:
        return self._conv(f"LENGTH({name})", _number)

    def has(self, kind: str, name: str) -> bool:
        """Whether ``KIND(name)`` is present, e.g. ``has("SYMBOL", "init_top_pgt")``."""
        return f"{kind}({name})" in self._d

    def config(self, name: str) -> bool:
        """Whether ``CONFIG_name=y`` is present."""
        return self._d.get(f"CONFIG_{name}") == "y"

    @property
    def osrelease(self) -> str | None:
        return self._d.get("OSRELEASE")

    @property
    def page_size(self) -> int | None:
        return self._conv("PAGESIZE", _number) if "PAGESIZE" in self._d else None

    @property
    def kernel_offset(self) -> int | None:
        """KASLR displacement of the kernel image (``KERNELOFFSET``)."""
        return self._conv("KERNELOFFSET", _hex) if "KERNELOFFSET" in self._d else None

    # --- architecture facts (the rules are ptlab.arch's) ------------------------------------
    @property
    def arch(self) -> str | None:
        """``"x86_64"`` or ``"arm64"`` judged from the arch-specific keys, else None."""
        ops = vmcoreinfo_arch(self)
        return ops.name if ops is not None else None

    @property
    def pgtable_l5_enabled(self) -> bool | None:
        """x86 5-level paging (``NUMBER(pgtable_l5_enabled)``), None if not recorded."""
        if not self.has("NUMBER", "pgtable_l5_enabled"):
            return None
        return self.number("pgtable_l5_enabled") != 0

    @property
    def va_bits(self) -> int | None:
        """arm64 ``NUMBER(VA_BITS)`` (the configured maximum)."""
        return self.number("VA_BITS") if self.has("NUMBER", "VA_BITS") else None

    @property
    def tcr_el1_t1sz(self) -> int | None:
        return self.number("TCR_EL1_T1SZ") if self.has("NUMBER", "TCR_EL1_T1SZ") else None

    @property
    def kernel_va_bits(self) -> int | None:
        """arm64 VA bits the kernel half really uses: 64 - TCR_EL1.T1SZ, else VA_BITS."""
        t1sz = self.tcr_el1_t1sz
        return 64 - t1sz if t1sz else self.va_bits

    def pa_symbol(self, name: str, arch: str | None = None) -> int:
        """``__pa_symbol(name)``: the PA of a kernel-image symbol, by the rule of ``arch``
        (default: :attr:`arch`)."""
        return self._ops(arch).pa_symbol(self, name)

    def kernel_root(self, arch: str | None = None) -> int:
        """PA of the kernel's top page table (x86 ``init_top_pgt``, arm64 ``swapper_pg_dir``)
        for ``arch`` (default: :attr:`arch`)."""
        ops = self._ops(arch)
        pa = ops.vmcoreinfo_root(self)
        if pa < 0 or pa >= 1 << 52 or pa & 0xFFF:
            raise VmcoreInfoError(f"VMCOREINFO gives {ops.root_symbol} at PA {pa:#x}: "
                                  "not a table address")
        return pa

    def _ops(self, arch: str | None) -> ArchOps:
        arch = arch or self.arch
        if arch is None:
            raise VmcoreInfoError("VMCOREINFO does not say which architecture it describes")
        try:
            return arch_for(arch)
        except ArchError as e:
            raise VmcoreInfoError(str(e)) from None


NOTE_NAME = b"VMCOREINFO\0\0"  # name padded to 4 bytes, after a 12-byte Elf64_Nhdr
MAX_NOTE = 1 << 20


def find_vmcoreinfo(mem: PhysMemory, limit: int | None = None) -> tuple[int, VmcoreInfo] | None:
    """Find the kernel's VMCOREINFO ELF note in physical memory (``paddr_vmcoreinfo_note()``,
    what ``/sys/kernel/vmcoreinfo`` points to): the note header (namesz 11, type 0) followed by
    text starting ``OSRELEASE=``. Returns (PA of the note, parsed text) or None.
    Needs a backend with ``find`` (the file-backed ones); others are read in 1 MiB chunks.
    ``limit`` bounds the bytes scanned (from the lowest PA up)."""
    for at in _occurrences(mem, NOTE_NAME, limit):
        hdr = at - 12
        if hdr < 0 or not mem.contains(hdr, 12 + len(NOTE_NAME) + 10):
            continue
        namesz, descsz, ntype = struct.unpack("<III", mem.read(hdr, 12))
        if namesz != 11 or ntype != 0 or not 10 <= descsz <= MAX_NOTE:
            continue
        text_pa = at + len(NOTE_NAME)
        if mem.read(text_pa, 10) != b"OSRELEASE=" or not mem.contains(text_pa, descsz):
            continue
        return hdr, VmcoreInfo(mem.read(text_pa, descsz))
    return None


def _occurrences(mem: PhysMemory, needle: bytes, limit: int | None = None) -> Iterator[int]:
    find = getattr(mem, "find", None)
    if find is not None:
        yield from find(needle, limit=limit)
        return
    chunk = 1 << 20
    left = limit if limit is not None else 1 << 64
    for start, end in mem.ranges():
        pa = start
        while pa < end and left > 0:
            left -= chunk
            n = min(chunk + len(needle) - 1, end - pa)
            data = mem.read(pa, n)
            i = data.find(needle)
            while i >= 0:
                yield pa + i
                i = data.find(needle, i + 1)
            pa += chunk
