"""A small diskdump (kdump-compressed) writer for tests, like :mod:`.elfwrite` for ELF cores:
plain or flattened, any of the four page compressions, filtered and incomplete dumps. It shares
no code with the reader (:mod:`.kdump`); tests check what the reader makes of its files against
libkdumpfile (Debian's python3-libkdumpfile) and ``makedumpfile -R``. ``pages`` may be a lazy
mapping (each page is read once), so a dump of a real guest's RAM can be written from it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import struct
import zlib
from collections.abc import Mapping

import cramjam

FLAGS = {"zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20, None: 0}
INCOMPLETE = 0x8


@functools.cache
def _lzo() -> tuple[ctypes.CDLL, ctypes.Array[ctypes.c_char]]:
    """liblzo2 and a work area for lzo1x_1_compress (LZO1X_1_MEM_COMPRESS is 128 KiB on
    64-bit; 1 MiB is ample)."""
    return (ctypes.CDLL(ctypes.util.find_library("lzo2") or "liblzo2.so.2"),
            ctypes.create_string_buffer(1 << 20))


def _lzo_compress(data: bytes) -> bytes:
    lib, work = _lzo()
    out = ctypes.create_string_buffer(len(data) + len(data) // 16 + 64 + 3)
    n = ctypes.c_size_t(len(out))
    rc = lib.lzo1x_1_compress(data, ctypes.c_size_t(len(data)), out, ctypes.byref(n), work)
    if rc != 0:
        raise RuntimeError(f"lzo1x_1_compress returned {rc}")
    return out.raw[: n.value]


COMPRESS = {
    "zlib": zlib.compress,
    "lzo": _lzo_compress,
    "snappy": lambda d: bytes(cramjam.snappy.compress_raw(d)),
    "zstd": lambda d: bytes(cramjam.zstd.compress(d)),
}


def _uts(machine: str, release: str) -> bytes:
    fields = ["Linux", "ptlab-test", release, "#1 SMP", machine, "(none)"]
    return b"".join(f.encode().ljust(65, b"\0") for f in fields)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def diskdump_bytes(pages: Mapping[int, bytes], max_mapnr: int, *, ram: set[int] | None = None,
                   compression: str | None = "zlib", machine: str = "x86_64",
                   vmcoreinfo: str | None = None, notes: bytes = b"", version: int = 6,
                   dump_level: int = 31, page_size: int = 4096,
                   incomplete_after: int | None = None) -> bytes:
    """The diskdump file holding ``pages`` (pfn -> bytes); ``ram`` (default: the pages) is
    the first bitmap. ``incomplete_after``: only the first N page descriptors are written and
    the header says INCOMPLETE."""
    bs = page_size
    bitmap_half = -(-max_mapnr // 8 // bs) * bs or bs
    bitmap_blocks = 2 * bitmap_half // bs
    vmci = (vmcoreinfo or "").encode()
    sub_fixed = 104
    off_vmci = bs + sub_fixed
    off_note = off_vmci + len(vmci)
    sub_hdr_size = -(-(sub_fixed + len(vmci) + len(notes)) // bs)
    bitmap_off = (1 + sub_hdr_size) * bs
    desc_off = bitmap_off + bitmap_blocks * bs
    pfns = sorted(pages)  # the pages in the dump; ``ram`` adds RAM pages filtered out
    data_off = desc_off + len(pfns) * 24
    status = FLAGS[compression] | (INCOMPLETE if incomplete_after is not None else 0)

    def bitmap(bits: set[int]) -> bytes:
        b = bytearray(bitmap_half)
        for p in bits:
            b[p >> 3] |= 1 << (p & 7)
        return bytes(b)

    descs, data = bytearray(), bytearray()
    zero_at: tuple[int, int, int] | None = None
    for i, pfn in enumerate(pfns):
        page = pages[pfn]
        if len(page) != bs:
            raise ValueError(f"page {pfn:#x} holds {len(page)} bytes, not {bs}")
        if incomplete_after is not None and i >= incomplete_after:
            descs += bytes(24)
            continue
        if not page.strip(b"\0") and zero_at is not None:
            descs += struct.pack("<QIIQ", *zero_at, 0)
            continue
        body, flags = page, 0
        if compression:
            c = COMPRESS[compression](page)
            if len(c) < bs:
                body, flags = c, FLAGS[compression]
        entry = (data_off + len(data), len(body), flags)
        if not page.strip(b"\0"):
            zero_at = entry
        descs += struct.pack("<QIIQ", *entry, 0)
        data += body
    header = struct.pack("<8si390s6xqqIiiIIIIIIi", b"KDUMP   ", version,
                         _uts(machine, "6.1.0-test"), 0, 0, status, bs, sub_hdr_size,
                         bitmap_blocks, min(max_mapnr, 0xFFFFFFFF), 0, 0, 0, 0, 1)
    sub = struct.pack("<QiiQQQQQQQQQQQ", 0, dump_level, 0, 0, 0, off_vmci if vmci else 0,
                      len(vmci), off_note if notes else 0, len(notes), 0, 0, 0, 0, max_mapnr)
    out = bytearray(header.ljust(bs, b"\0"))
    out += (sub + vmci + notes).ljust(sub_hdr_size * bs, b"\0")
    out += bitmap(set(pfns) if ram is None else ram | set(pfns)) + bitmap(set(pfns))
    out += descs + data
    return bytes(out)


def flatten(dump: bytes, chunk: int = 5000, rewrite_header: bool = True) -> bytes:
    """The flattened makedumpfile stream of ``dump``: records of ``chunk`` bytes written in a
    shuffled order, the header first as garbage and rewritten at the end (later wins)."""
    out = bytearray(struct.pack(">16sqq", b"makedumpfile", 1, 1).ljust(4096, b"\0"))
    pieces = [(o, dump[o : o + chunk]) for o in range(0, len(dump), chunk)]
    pieces = pieces[1::2] + pieces[0::2]  # out of order
    if rewrite_header:
        pieces.insert(0, (0, b"\xff" * 600))
        pieces.append((0, dump[:600]))
    for off, data in pieces:
        out += struct.pack(">qq", off, len(data)) + data
    out += struct.pack(">qq", -1, -1)
    return bytes(out)
