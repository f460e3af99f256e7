"""ELF helpers of the image build: symlink resolution inside a root, library closure,
PVH vmlinux extraction (on the cached Debian kernel when present)."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest
from ptharness import image as image_mod
from ptharness.image_elf import (
    ElfError,
    elf_notes,
    library_closure,
    pvh_entry,
    resolve_in_root,
    vmlinux_from_bzimage,
)


def fake_elf_with_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    note = struct.pack("<III", len(name) + 1, len(desc), ntype) + name + b"\0"
    note += b"\0" * (-len(note) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + phdr + note


def test_pvh_note_and_bzimage_payload():
    elf = fake_elf_with_note(b"Xen", 18, struct.pack("<I", 0x1000850))
    assert elf_notes(elf) == [("Xen", 18, struct.pack("<I", 0x1000850))]
    assert pvh_entry(elf) == 0x1000850
    assert pvh_entry(fake_elf_with_note(b"GNU", 3, b"abcd")) is None
    setup = b"MZ" + b"\xfd7zXZ\x00 not a stream" + bytes(range(7, 107))  # not xz either
    bz = setup + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\x10\x20\x30\x40"
    assert vmlinux_from_bzimage(bz) == elf
    no_pvh = setup + lzma.compress(fake_elf_with_note(b"GNU", 3, b"x"), format=lzma.FORMAT_XZ)
    with pytest.raises(ElfError, match="PVH"):
        vmlinux_from_bzimage(no_pvh)
    with pytest.raises(ElfError, match="no xz"):
        vmlinux_from_bzimage(b"MZ" + b"\0" * 1000)


def test_resolve_in_root_stays_inside(tmp_path):
    root = tmp_path / "root"
    (root / "lib/aarch64-linux-gnu").mkdir(parents=True)
    (root / "lib/aarch64-linux-gnu/ld-2.36.so").write_bytes(b"loader")
    (root / "lib/ld-linux-aarch64.so.1").symlink_to("aarch64-linux-gnu/ld-2.36.so")
    (root / "lib/abs.so").symlink_to("/lib/aarch64-linux-gnu/ld-2.36.so")
    (root / "lib/escape.so").symlink_to("/etc/passwd")
    (root / "usr").mkdir()
    (root / "usr/lib").symlink_to("../lib")
    want = root / "lib/aarch64-linux-gnu/ld-2.36.so"
    assert resolve_in_root(root, "/lib/ld-linux-aarch64.so.1") == want
    assert resolve_in_root(root, "/lib/abs.so") == want
    assert resolve_in_root(root, "/usr/lib/abs.so") == want
    assert resolve_in_root(root, "/lib/escape.so") is None      # host /etc/passwd not used
    assert resolve_in_root(root, "/lib/missing.so") is None


def test_library_closure_of_host_dropbear():
    """dropbear-bin and binutils (readelf) are host dependencies (images/host-packages.txt)."""
    libs = library_closure(Path("/usr/sbin/dropbear"), Path("/"),
                           ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"])
    assert "/lib64/ld-linux-x86-64.so.2" in libs
    names = {Path(p).name for p in libs}
    assert {"libc.so.6", "libz.so.1", "libtomcrypt.so.1"} <= names
    for host in libs.values():
        assert host.read_bytes()[:4] == b"\x7fELF"
    with pytest.raises(ElfError, match="not found"):
        library_closure(Path("/usr/sbin/dropbear"), Path("/"), ["/nonexistent"])


def test_real_bzimage_has_pvh_vmlinux():
    """The Debian amd64 bzImage of the current x86_64 image (built if missing)."""
    img = image_mod.ensure_image("x86_64", progress=lambda s: None)
    vmlinux = vmlinux_from_bzimage(img.kernel.read_bytes())
    entry = pvh_entry(vmlinux)
    assert entry is not None and 0x1000000 <= entry < 0x4000000    # physical, near 16 MiB
    assert struct.unpack_from("<H", vmlinux, 18)[0] == 62           # EM_X86_64


def zstd_bzimage(payload_elf: bytes, *, setup_sects: int = 3) -> bytes:
    """A bzImage whose setup header (boot protocol 2.08) locates a zstd payload that carries
    its decompressed size in 4 trailing bytes, as Debian's 6.12 (CONFIG_KERNEL_ZSTD) does."""
    import cramjam

    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    payload = bytes(cramjam.zstd.compress(payload_elf)) + struct.pack("<I", len(payload_elf))
    body = b"\x90" * 0x2CC + payload + b"\0" * 64  # decompressor code before, padding after
    struct.pack_into("<II", setup, 0x248, 0x2CC, len(payload))
    return bytes(setup) + body


def test_zstd_bzimage_payload():
    elf = fake_elf_with_note(b"Xen", 18, struct.pack("<I", 0x1000850))
    assert vmlinux_from_bzimage(zstd_bzimage(elf)) == elf
    with pytest.raises(ElfError, match="PVH"):
        vmlinux_from_bzimage(zstd_bzimage(fake_elf_with_note(b"GNU", 3, b"x")))
    with pytest.raises(ElfError, match="not an ELF64"):
        vmlinux_from_bzimage(zstd_bzimage(b"\x7fELF\x01" + b"\0" * 100))
    broken = bytearray(zstd_bzimage(elf))
    broken[4 * 512 + 0x2CC + 8] ^= 0xFF  # inside the zstd frame
    with pytest.raises(ElfError, match="zstd"):
        vmlinux_from_bzimage(bytes(broken))
