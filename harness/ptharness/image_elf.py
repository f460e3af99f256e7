"""ELF helpers for the image build: the PVH vmlinux inside a bzImage, and shared-library
closure of a dynamically linked program (the DT_NEEDED chain)."""

from __future__ import annotations

import lzma
import struct
import subprocess
from pathlib import Path

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18   # include/xen/interface/elfnote.h: the PVH entry point


class ElfError(RuntimeError):
    """A kernel or program is not the ELF the image build expects."""


def _is_elf64le(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1


def elf_notes(elf: bytes) -> list[tuple[str, int, bytes]]:
    """All (name, type, desc) notes of the PT_NOTE segments of a little-endian ELF64."""
    if not _is_elf64le(elf):
        raise ElfError("not a little-endian ELF64 file")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    notes: list[tuple[str, int, bytes]] = []
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, off)
            name_off = off + 12
            desc_off = name_off + ((namesz + 3) & ~3)
            name = elf[name_off:name_off + namesz].rstrip(b"\0").decode(errors="replace")
            notes.append((name, ntype, elf[desc_off:desc_off + descsz]))
            off = desc_off + ((descsz + 3) & ~3)
    return notes


def pvh_entry(elf: bytes) -> int | None:
    """The PVH 32-bit entry point (Xen note PHYS32_ENTRY), or None without one."""
    for name, ntype, desc in elf_notes(elf):
        if name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
            return struct.unpack_from("<I", desc)[0]
    return None


def _zstd_payload(bzimage: bytes) -> bytes | None:
    """The decompressed zstd payload (CONFIG_KERNEL_ZSTD, Debian's 6.12), found through the
    setup header's payload_offset/payload_length (boot protocol 2.08, Documentation/arch/x86/
    boot.rst), or None if the payload is not zstd. The kernel's build appends the
    decompressed size (4 bytes) to the zstd frame (scripts/Makefile.lib zstd22_with_size)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    start = ((bzimage[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[start + offset:start + offset + length]
    if payload[:4] != ZSTD_MAGIC or length < 8:
        return None
    import cramjam

    try:
        return bytes(cramjam.zstd.decompress(payload[:-4]))
    except cramjam.DecompressionError as e:
        raise ElfError(f"the bzImage's zstd payload does not decompress: {e}") from None


def vmlinux_from_bzimage(bzimage: bytes) -> bytes:
    """Decompress the xz or zstd payload of an x86 bzImage into the ELF vmlinux it carries.

    The setup code comes first; a zstd payload is where the setup header says, an xz one
    starts at an xz stream magic (every candidate magic is tried). The result must be an
    ELF64 with a PVH entry note.
    """
    out = _zstd_payload(bzimage)
    if out is not None:
        if not _is_elf64le(out):
            raise ElfError("the bzImage's zstd payload is not an ELF64 vmlinux")
        if pvh_entry(out) is None:
            raise ElfError("the bzImage's vmlinux has no PVH entry note (CONFIG_PVH)")
        return out
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            out = b""
        if _is_elf64le(out):
            if pvh_entry(out) is None:
                raise ElfError("the bzImage's vmlinux has no PVH entry note (CONFIG_PVH)")
            return out
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise ElfError("no xz- or zstd-compressed ELF payload in the bzImage")


def needed(path: Path) -> list[str]:
    """DT_NEEDED sonames of an ELF file (via binutils' readelf; [] for static programs)."""
    proc = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ElfError(f"readelf -d {path}: {proc.stderr.strip()}")
    out = []
    for line in proc.stdout.splitlines():
        if "(NEEDED)" in line and "[" in line:
            out.append(line[line.index("[") + 1:line.rindex("]")])
    return out


def interpreter(path: Path) -> str | None:
    """The PT_INTERP path of an ELF program, or None for a static one."""
    data = path.read_bytes()
    if not _is_elf64le(data):
        raise ElfError(f"{path} is not a little-endian ELF64 file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _f, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    return None


def resolve_in_root(root: Path, guest_path: str, _depth: int = 0) -> Path | None:
    """The regular file a guest path names under `root`, following symlinks (absolute
    ones relative to `root`, never onto the host); None if it does not exist."""
    if _depth > 20:
        return None
    cur = root
    parts = [p for p in guest_path.split("/") if p]
    for i, part in enumerate(parts):
        nxt = cur / part
        if nxt.is_symlink():
            target = str(nxt.readlink())
            base = "/" + "/".join(parts[:i]) if not target.startswith("/") else ""
            rest = "/".join(parts[i + 1:])
            joined = f"{base}/{target}" + (f"/{rest}" if rest else "")
            return resolve_in_root(root, _normalize(joined), _depth + 1)
        if not nxt.exists():
            return None
        cur = nxt
    return cur if cur.is_file() else None


def _normalize(path: str) -> str:
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
        else:
            out.append(part)
    return "/" + "/".join(out)


def library_closure(program: Path, root: Path, libdirs: list[str]) -> dict[str, Path]:
    """Every library `program` needs, transitively, plus its loader.

    Returns {path inside the guest: file on the host}; libraries are looked up in `libdirs`
    (guest paths such as "/lib/x86_64-linux-gnu") under `root` (the host's / or an
    extracted package tree). A soname that cannot be found raises.
    """
    found: dict[str, Path] = {}
    interp = interpreter(program)
    if interp is not None:
        host = resolve_in_root(root, interp)
        if host is None:
            raise ElfError(f"loader {interp} of {program.name} not found under {root}")
        found[interp] = host
    todo = needed(program)
    seen: set[str] = set()
    while todo:
        soname = todo.pop(0)
        if soname in seen:
            continue
        seen.add(soname)
        for d in libdirs:
            host = resolve_in_root(root, f"{d.rstrip('/')}/{soname}")
            if host is not None:
                found[f"{d.rstrip('/')}/{soname}"] = host
                todo += needed(host)
                break
        else:
            raise ElfError(f"{soname} (needed by {program.name}) not found in {libdirs}"
                           f" under {root}")
    return found
