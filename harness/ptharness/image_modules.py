"""Kernel modules for the initramfs: .modinfo parsing and load order from `depends=`.

Debian's kernel packages carry no modules.dep, so the dependency graph is read from each
module's .modinfo section (NUL-separated "key=value" strings written by modpost).
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

_KO_SUFFIXES = (".ko", ".ko.xz")


class ModuleError(RuntimeError):
    """A requested module is missing or its dependency graph is broken."""


def module_name(path: str | Path) -> str:
    """The kernel's name for a module file: basename without .ko[.xz], '-' as '_'."""
    base = Path(path).name
    for suffix in _KO_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


SIG_MAGIC = b"~Module signature appended~\n"  # include/linux/module_signature.h MODULE_SIG_STRING
SIG_INFO = struct.Struct(">BBBBBxxxI")  # struct module_signature: 5 bytes, pad, sig_len (BE)


def read_ko(path: Path) -> bytes:
    """The module's ELF bytes, decompressing .ko.xz."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def strip_signature(ko: bytes) -> bytes:
    """``ko`` without its appended signature (the part kernel/module/signing.c cuts off before
    it lays the module out). Unchanged if unsigned.

    The guest's /init loads modules stripped: the kernel (CONFIG_MODULE_SIG without _FORCE,
    no lockdown without Secure Boot) then skips the PKCS#7/RSA check, which costs 0.1-0.2 s
    of a TCG boot's first module load, and sets taint E (TAINT_UNSIGNED_MODULE). The module's
    code and data, and so its place in the page tables, are the same."""
    if not ko.endswith(SIG_MAGIC):
        return ko
    end = len(ko) - len(SIG_MAGIC)
    if end < SIG_INFO.size:
        raise ModuleError("module signature trailer without its info block")
    sig_len = SIG_INFO.unpack_from(ko, end - SIG_INFO.size)[-1]
    start = end - SIG_INFO.size - sig_len
    if start < 0:
        raise ModuleError(f"module signature length {sig_len} exceeds the module")
    return ko[:start]


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Parse the .modinfo section of a little-endian ELF64 module into key -> values."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ModuleError("not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shoff == 0 or shnum == 0 or shoff + shnum * shentsize > len(elf):
        raise ModuleError("module has no valid section headers")

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    _, stroff, strsize = section(shstrndx)
    strtab = elf[stroff:stroff + strsize]
    for i in range(shnum):
        name, off, size = section(i)
        end = strtab.find(b"\0", name)
        if strtab[name:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
            return info
    raise ModuleError("module has no .modinfo section")


def depends(info: dict[str, list[str]]) -> list[str]:
    """Module names from `depends=` (comma separated, may be empty)."""
    out: list[str] = []
    for value in info.get("depends", []):
        out += [d.replace("-", "_") for d in value.split(",") if d]
    return out


@dataclass(frozen=True)
class Module:
    name: str
    path: Path      # file in the extracted package
    relpath: str    # path under lib/modules/<kver>/, always ending in .ko
    depends: tuple[str, ...]


class ModuleTree:
    """The modules of one extracted kernel (lib/modules/<kver>/)."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.files: dict[str, Path] = {}
        for path in sorted((moddir / "kernel").rglob("*.ko*")):
            if path.name.endswith(_KO_SUFFIXES):
                self.files.setdefault(module_name(path), path)
        self.builtin: set[str] = set()
        builtin = moddir / "modules.builtin"
        if builtin.exists():
            self.builtin = {module_name(line) for line in builtin.read_text().split()}

    def module(self, name: str) -> Module:
        path = self.files.get(name.replace("-", "_"))
        if path is None:
            raise ModuleError(f"module {name!r} not found under {self.moddir}")
        rel = path.relative_to(self.moddir).as_posix()
        if rel.endswith(".xz"):
            rel = rel[:-3]
        return Module(name, path, rel, tuple(depends(modinfo(read_ko(path)))))

    def load_order(self, wanted: list[str]) -> list[Module]:
        """`wanted` plus their dependencies, each after everything it depends on.

        Built-in modules are skipped; a missing module or a dependency cycle raises.
        """
        order: list[Module] = []
        done: set[str] = set()
        active: list[str] = []

        def visit(name: str) -> None:
            name = name.replace("-", "_")
            if name in done:
                return
            if name in active:
                raise ModuleError("module dependency cycle: " + " -> ".join(active + [name]))
            if name in self.builtin and name not in self.files:
                done.add(name)
                return
            mod = self.module(name)
            active.append(name)
            for dep in mod.depends:
                visit(dep)
            active.pop()
            done.add(name)
            order.append(mod)

        for name in wanted:
            visit(name)
        return order
