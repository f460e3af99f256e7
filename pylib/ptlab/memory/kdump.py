"""kdump-compressed dumps (the diskdump format) as read-only physical memory.

Layout (makedumpfile's diskdump_mod.h, as QEMU's dump/dump.c and makedumpfile write it; checked
against libkdumpfile's reader): block 0 is ``struct disk_dump_header`` (signature ``KDUMP   ``,
``header_version``, ``utsname``, ``status`` with the compression flags, ``block_size`` = the page
size, ``sub_hdr_size`` and ``bitmap_blocks`` in blocks, 32-bit ``max_mapnr``); block 1 the
``kdump_sub_header`` (``phys_base``, ``dump_level``, the VMCOREINFO and ELF-note offsets, from
version 6 a 64-bit ``max_mapnr_64``); then the bitmaps: when ``max_mapnr`` fits in half of them,
the first half marks the machine's RAM pages and the second the pages in the dump, else there is
only the second; then one 24-byte ``struct page_desc`` (offset, size, flags, page_flags) per page
in the dump, in PFN order; then the page data, each page raw (``size == block_size``) or
compressed with zlib, lzo, snappy or zstd (``flags``). Zero pages typically share one descriptor.

The *flattened* layout (makedumpfile ``-F``, QEMU's ``kdump-*`` formats) is a 4 KiB header
(``makedumpfile``, type 1, version 1, big-endian) and records ``(offset, size)`` + data that write
the diskdump file piecewise, ending with offset -1; later records win where they overlap, and
bytes no record writes read as zero. It is read in place (no ``makedumpfile -R`` needed).

A page of RAM that is not in the dump (filtered by the dump level, or not written: an
``incomplete`` dump) raises :class:`NotInDump`, never zeros.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..arch import ArchOps, all_arches, arch_for_uname, vmcoreinfo_arch
from .base import MemoryError_, OutOfRange, PhysMemory
from .elfcore import NT_PRSTATUS, CpuState, Note, cpu_states, parse_notes
from .raw import open_regular, pread_exact
from .vmcoreinfo import MAX_NOTE, VmcoreInfo

SIG_KDUMP, SIG_DISKDUMP, SIG_FLAT = b"KDUMP   ", b"DISKDUMP", b"makedumpfile"
# struct disk_dump_header (64-bit): signature, header_version, utsname (6 x 65), pad to 8,
# timestamp (2 x 8), status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr,
# total_ram_blocks, device_blocks, written_blocks, current_cpu, nr_cpus
HEADER = struct.Struct("<8si390s6xqqIiiIIIIIIi")
UTS_LEN = 65
UTS_MACHINE = 4  # sysname, nodename, release, version, machine, domainname
# struct kdump_sub_header (64-bit)
SUB_HEADER = struct.Struct("<QiiQQQQQQQQQQQ")
PAGE_DESC = np.dtype([("offset", "<u8"), ("size", "<u4"), ("flags", "<u4"),
                      ("page_flags", "<u8")])
FLAT_HEADER = struct.Struct(">16sqq")
FLAT_HEADER_SIZE = 4096
FLAT_RECORD = struct.Struct(">qq")

DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_INCOMPLETE = 0x8  # header status: the dump was cut short
DUMP_DH_EXCLUDED_VMEMMAP = 0x10
DUMP_DH_COMPRESSED_ZSTD = 0x20
COMPRESSIONS = {DUMP_DH_COMPRESSED_ZLIB: "zlib", DUMP_DH_COMPRESSED_LZO: "lzo",
                DUMP_DH_COMPRESSED_SNAPPY: "snappy", DUMP_DH_COMPRESSED_ZSTD: "zstd"}
ANY_COMPRESSION = sum(COMPRESSIONS)

BITMAP_CHUNK = 4096  # bitmap bytes per rank-index entry (32768 PFNs)
DESC_BLOCK = 256  # page descriptors read at a time (6 KiB)
MAX_BITMAP_BYTES = 1 << 30  # 2**33 PFNs: 32 TiB of 4 KiB pages
CACHE_BYTES = 16 << 20  # decompressed pages kept
SCAN_LIMIT = 1 << 30  # bytes a search (find) decompresses at most: a few seconds
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class KdumpError(MemoryError_, ValueError):
    """A file that is not a usable kdump-compressed dump, or a corrupt part of one."""


class NotInDump(OutOfRange):
    """A page of the machine's RAM that the dump does not hold (filtered out or not written)."""


def is_kdump(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a kdump-compressed dump (either layout)."""
    return head.startswith((SIG_KDUMP, SIG_DISKDUMP, SIG_FLAT))


# --- decompressors ----------------------------------------------------------------------------
def _lzo() -> Callable[[bytes, int], bytes]:
    """``lzo1x_decompress_safe`` from the system's liblzo2 (what makedumpfile, QEMU and
    libkdumpfile use)."""
    import ctypes.util  # here: it imports shutil, subprocess, tempfile (~10 ms per process)

    name = ctypes.util.find_library("lzo2") or "liblzo2.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise KdumpError("lzo-compressed dump: liblzo2 is not installed "
                         "(Debian: apt-get install liblzo2-2)") from None
    fn = lib.lzo1x_decompress_safe
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
    fn.restype = ctypes.c_int

    def decompress(data: bytes, size: int) -> bytes:
        out = ctypes.create_string_buffer(size)
        n = ctypes.c_size_t(size)
        rc = fn(data, len(data), out, ctypes.byref(n), None)
        if rc != 0:
            raise ValueError(f"lzo1x_decompress_safe returned {rc}")
        return out.raw[: n.value]

    return decompress


def _cramjam(kind: str) -> Callable[[bytes, int], bytes]:
    try:
        import cramjam
    except ImportError:
        raise KdumpError(f"{kind}-compressed dump: the cramjam package is not installed "
                         "(pip install cramjam)") from None
    into = cramjam.snappy.decompress_raw_into if kind == "snappy" else cramjam.zstd.decompress_into

    def decompress(data: bytes, size: int) -> bytes:
        out = bytearray(size)  # a fixed buffer: a page claiming more is an error, not a blow-up
        n = into(data, out)
        return bytes(out[:n])

    return decompress


def decompressor(flag: int) -> Callable[[bytes, int], bytes]:
    """``f(data, page_size) -> page`` for one DUMP_DH_COMPRESSED_* flag."""
    if flag == DUMP_DH_COMPRESSED_ZLIB:
        def inflate(data: bytes, size: int) -> bytes:
            d = zlib.decompressobj()
            page = d.decompress(data, size)  # at most size bytes, whatever the data claims
            if d.unconsumed_tail:
                raise ValueError(f"inflates to more than {size} bytes")
            return page

        return inflate
    if flag == DUMP_DH_COMPRESSED_LZO:
        return _lzo()
    if flag in (DUMP_DH_COMPRESSED_SNAPPY, DUMP_DH_COMPRESSED_ZSTD):
        return _cramjam(COMPRESSIONS[flag])
    raise KdumpError(f"unknown page compression flags {flag:#x}")


# --- the two layouts --------------------------------------------------------------------------
class _Plain:
    """The diskdump file itself."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd, self.size, self.path = fd, size, path

    def pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise KdumpError(f"{self.path}: {n} bytes at offset {offset:#x} lie past the end of "
                             f"the file ({self.size:#x} bytes): truncated or corrupt")
        return pread_exact(self.fd, n, offset, self.path)


class _Flattened:
    """The diskdump file a flattened stream describes, read in place: record ``i`` writes
    ``size[i]`` bytes at ``dest[i]`` from stream offset ``src[i]``."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd, self.path = fd, path
        sig, ftype, version = FLAT_HEADER.unpack(pread_exact(fd, FLAT_HEADER.size, 0, path))
        if ftype != 1 or version != 1:
            raise KdumpError(f"{path}: flattened makedumpfile stream of type {ftype} version "
                             f"{version}; ptlab reads type 1 version 1")
        dests, sizes, srcs = [], [], []
        pos = FLAT_HEADER_SIZE
        while True:
            if pos + FLAT_RECORD.size > size:
                raise KdumpError(f"{path}: flattened stream ends at {size:#x} without its end "
                                 "record (truncated)")
            dest, n = FLAT_RECORD.unpack(pread_exact(fd, FLAT_RECORD.size, pos, path))
            pos += FLAT_RECORD.size
            if dest == -1:
                break
            if dest < 0 or n <= 0 or pos + n > size:
                raise KdumpError(f"{path}: bad flattened record at {pos - 16:#x} (offset {dest}, "
                                 f"size {n}; stream {size:#x} bytes): truncated or corrupt")
            dests.append(dest)
            sizes.append(n)
            srcs.append(pos)
            pos += n
        self.dest, self.end, self.src = _paint(dests, sizes, srcs)
        self.size = self.end[-1] if self.end else 0
        self.records = len(dests)

    def pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise KdumpError(f"{self.path}: {n} bytes at offset {offset:#x} lie past the end of "
                             f"the flattened dump ({self.size:#x} bytes): truncated or corrupt")
        out = bytearray()
        i = bisect.bisect_right(self.dest, offset) - 1
        while n > 0:
            if i >= 0 and offset < self.end[i]:
                k = min(n, self.end[i] - offset)
                out += pread_exact(self.fd, k, self.src[i] + offset - self.dest[i], self.path)
            else:  # a gap no record wrote: zeros (as makedumpfile -R leaves it)
                nxt = self.dest[i + 1] if i + 1 < len(self.dest) else offset + n
                k = min(n, nxt - offset)
                out += bytes(k)
            offset, n, i = offset + k, n - k, i + 1
        return bytes(out)


def _paint(dests: list[int], sizes: list[int],
           srcs: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Non-overlapping (dest, end, src) runs sorted by dest; later records win."""
    order = sorted(range(len(dests)), key=lambda i: dests[i])
    d = [dests[i] for i in order]
    e = [dests[i] + sizes[i] for i in order]
    if all(e[k] <= d[k + 1] for k in range(len(d) - 1)):
        return d, e, [srcs[i] for i in order]
    runs: list[tuple[int, int, int]] = []  # painted so far, sorted, disjoint
    for i in range(len(dests)):  # overlapping rewrites (rare): paint in stream order
        lo, hi, src = dests[i], dests[i] + sizes[i], srcs[i]
        kept = []
        for a, b, s in runs:
            if b <= lo or a >= hi:
                kept.append((a, b, s))
                continue
            if a < lo:
                kept.append((a, lo, s))
            if b > hi:
                kept.append((hi, b, s + hi - a))
        kept.append((lo, hi, src))
        runs = sorted(kept)
    return [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]


def _arch_from_notes(notes: list[Note]) -> ArchOps | None:
    """The architecture whose ``struct elf_prstatus`` size every CORE/NT_PRSTATUS note has."""
    sizes = {len(n.desc) for n in notes if n.name == "CORE" and n.type == NT_PRSTATUS}
    found = [ops for ops in all_arches() if sizes == {ops.prstatus_size}]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True, slots=True)
class KdumpHeader:
    """What the headers say (for ``ptlab info``)."""

    signature: str
    version: int
    machine: str  # utsname.machine
    release: str  # utsname.release
    status: int
    block_size: int
    max_mapnr: int
    phys_base: int
    dump_level: int
    two_bitmaps: bool
    flattened: bool

    @property
    def incomplete(self) -> bool:
        return bool(self.status & DUMP_DH_COMPRESSED_INCOMPLETE)

    @property
    def compression(self) -> str:
        names = [n for f, n in COMPRESSIONS.items() if self.status & f]
        return "+".join(names) or "none"


class KdumpCompressed(PhysMemory):
    """Physical memory of a kdump-compressed dump, plain or flattened (read-only).

    Attributes like :class:`~ptlab.memory.ElfCore`'s: ``machine`` (a ptlab architecture name,
    or None), ``notes``, ``cpus``, ``vmcoreinfo``; plus ``header`` (:class:`KdumpHeader`),
    ``page_size``, ``pages_in_dump``. ``read`` raises :class:`NotInDump` for a RAM page the dump
    does not hold and :class:`OutOfRange` past the machine's RAM; a corrupt page or header
    raises :class:`KdumpError`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None
        fd, size = open_regular(path)
        try:
            self._open(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    # --- parsing --------------------------------------------------------------------------
    def _fail(self, msg: str) -> KdumpError:
        return KdumpError(f"{self.path}: {msg}")

    def _open(self, fd: int, size: int) -> None:
        self.file_size = size
        head = pread_exact(fd, min(size, HEADER.size), 0, self.path)
        flattened = head.startswith(SIG_FLAT)
        if flattened:
            self._file: _Plain | _Flattened = _Flattened(fd, size, self.path)
            head = self._file.pread(0, min(self._file.size, HEADER.size))
        else:
            self._file = _Plain(fd, size, self.path)
        if not head.startswith((SIG_KDUMP, SIG_DISKDUMP)):
            raise self._fail("not a kdump-compressed dump (no KDUMP signature)")
        if len(head) < HEADER.size:
            raise self._fail(f"truncated header ({len(head)} of {HEADER.size} bytes)")
        (sig, version, uts, _sec, _usec, status, block_size, sub_hdr_size, bitmap_blocks,
         max_mapnr, *_rest) = HEADER.unpack(head)
        if block_size < 4096 or block_size > 1 << 16 or block_size & (block_size - 1):
            raise self._fail(f"block size {block_size} is not a page size (4 KiB .. 64 KiB)")
        if version < 1:
            raise self._fail(f"header version {version}: too old (no sub-header)")
        if sub_hdr_size < 1 or bitmap_blocks < 1:
            raise self._fail(f"sub-header of {sub_hdr_size} and bitmaps of {bitmap_blocks} "
                             "blocks: corrupt")
        fields = [uts[i * UTS_LEN:(i + 1) * UTS_LEN].split(b"\0", 1)[0].decode("ascii", "replace")
                  for i in range(6)]
        bs = self.page_size = block_size
        sub = self._file.pread(bs, SUB_HEADER.size)
        (phys_base, dump_level, split, _spfn, _epfn, off_vmci, size_vmci, off_note, size_note,
         _off_erase, _size_erase, _spfn64, _epfn64, max_mapnr_64) = SUB_HEADER.unpack(sub)
        if version >= 2 and split:
            raise self._fail("one part of a split dump (makedumpfile --split): join the parts "
                             "with makedumpfile --reassemble")
        if version >= 6:
            max_mapnr = max_mapnr_64
        bitmap_off = (1 + sub_hdr_size) * bs
        bitmap_bytes = bitmap_blocks * bs
        if bitmap_bytes * 8 < max_mapnr:
            raise self._fail(f"bitmaps of {bitmap_bytes * 8} bits cannot cover max_mapnr "
                             f"{max_mapnr}: corrupt")
        two = max_mapnr <= bitmap_bytes * 8 // 2
        half = bitmap_bytes // 2 if two else bitmap_bytes
        self._ram_bitmap = bitmap_off if two else None
        self._dump_bitmap = bitmap_off + (half if two else 0)
        self._bitmap_bytes = min(half, (max_mapnr + 7) // 8)
        if self._bitmap_bytes > MAX_BITMAP_BYTES:
            raise self._fail(f"max_mapnr {max_mapnr}: more than {MAX_BITMAP_BYTES * 8} pages")
        self._desc_off = bitmap_off + bitmap_bytes
        if self._desc_off > self._file.size:
            raise self._fail(f"bitmaps end at {self._desc_off:#x}, past the end of the dump "
                             f"({self._file.size:#x} bytes): truncated")
        self.max_mapnr = max_mapnr
        self.header = KdumpHeader(sig.decode("ascii", "replace").strip(), version, fields[4],
                                  fields[2], status, bs, max_mapnr, phys_base, dump_level, two,
                                  flattened)
        self._rank = self._rank_index()
        self.pages_in_dump = int(self._rank[-1])
        self.incomplete = self.header.incomplete
        last_desc = self._desc_off + self.pages_in_dump * PAGE_DESC.itemsize
        if last_desc > self._file.size and not self.incomplete:
            raise self._fail(f"the bitmap lists {self.pages_in_dump} pages but their descriptors "
                             f"would end at {last_desc:#x}, past the end of the dump "
                             f"({self._file.size:#x} bytes): truncated or a lying bitmap")
        self._decompress: dict[int, Callable[[bytes, int], bytes]] = {}
        for flag in COMPRESSIONS:
            if status & flag:
                self._decompress[flag] = decompressor(flag)  # unsupported: fail now
        self.notes: list[Note] = []
        if version >= 4 and size_note:
            self.notes = parse_notes(self._blob(off_note, size_note, "ELF notes"),
                                     f"{self.path}: notes")
        vmci = None
        if version >= 3 and size_vmci:
            vmci = VmcoreInfo(self._blob(off_vmci, size_vmci, "VMCOREINFO"))
        else:
            found = [n for n in self.notes if n.name == "VMCOREINFO"]
            vmci = VmcoreInfo(found[0].desc) if found else None
        self.vmcoreinfo: VmcoreInfo | None = vmci
        # QEMU 7.2 writes utsname.machine "Unknown" for arm64 guests: then VMCOREINFO or the
        # size of the CPU notes (struct elf_prstatus differs per architecture) tell
        ops = (arch_for_uname(fields[4]) or (vmcoreinfo_arch(vmci) if vmci else None)
               or _arch_from_notes(self.notes))
        self.machine: str | None = ops.name if ops else None
        self.cpus: list[CpuState] = cpu_states(self.notes, self.machine) if ops else []
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_pages = max(16, CACHE_BYTES // bs)
        self._chunk: tuple[int, np.ndarray, np.ndarray] | None = None
        self._descs: tuple[int, np.ndarray] | None = None
        self.not_in_dump = 0  # reads refused with NotInDump so far (what a command missed)
        self.first_not_in_dump: int | None = None  # the PA of the first

    def _blob(self, offset: int, size: int, what: str) -> bytes:
        if size > MAX_NOTE * 64:
            raise self._fail(f"{what} of {size} bytes: corrupt")
        return self._file.pread(offset, size)

    def _rank_index(self) -> np.ndarray:
        """Pages in the dump before each BITMAP_CHUNK of the dump bitmap (and in all, last)."""
        counts = []
        step = BITMAP_CHUNK * 256
        for at in range(0, self._bitmap_bytes, step):
            n = min(step, self._bitmap_bytes - at)
            b = np.frombuffer(self._file.pread(self._dump_bitmap + at, n), dtype=np.uint8)
            b = self._clip_tail(b, at)
            pad = -len(b) % BITMAP_CHUNK
            per = _POPCOUNT[np.concatenate([b, np.zeros(pad, np.uint8)])].reshape(
                -1, BITMAP_CHUNK).sum(axis=1, dtype=np.int64)
            counts.append(per)
        per_chunk = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(per_chunk)]).astype(np.int64)

    def _clip_tail(self, b: np.ndarray, at: int) -> np.ndarray:
        """Clear bits at or past max_mapnr in bitmap bytes ``b`` starting at byte ``at``."""
        last = self.max_mapnr - at * 8  # bits of b that count
        if last >= len(b) * 8:
            return b
        b = b.copy()
        byte, bit = divmod(last, 8)
        if byte < len(b):
            b[byte] &= (1 << bit) - 1
            b[byte + 1:] = 0
        return b

    # --- bitmaps and descriptors ----------------------------------------------------------
    def _bit(self, bitmap: int, pfn: int) -> bool:
        return bool(self._file.pread(bitmap + (pfn >> 3), 1)[0] >> (pfn & 7) & 1)

    def _dump_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Bytes of chunk ``c`` of the dump bitmap and their running popcount (kept for the
        last chunk used: a walk reads nearby pages)."""
        if self._chunk is None or self._chunk[0] != c:
            at = c * BITMAP_CHUNK
            n = min(BITMAP_CHUNK, self._bitmap_bytes - at)
            raw = self._clip_tail(np.frombuffer(self._file.pread(self._dump_bitmap + at, n),
                                                dtype=np.uint8), at)
            self._chunk = (c, raw, np.cumsum(_POPCOUNT[raw], dtype=np.int64))
        return self._chunk[1], self._chunk[2]

    def _desc_index(self, pfn: int) -> int | None:
        """Index of the page descriptor of ``pfn``, None when the page is not in the dump."""
        if pfn >= self.max_mapnr:
            return None
        byte = pfn >> 3
        c, within = divmod(byte, BITMAP_CHUNK)
        raw, cum = self._dump_chunk(c)
        b = int(raw[within])
        if not b >> (pfn & 7) & 1:
            return None
        before = int(cum[within - 1]) if within else 0
        return int(self._rank[c]) + before + int(_POPCOUNT[b & ((1 << (pfn & 7)) - 1)])

    def _desc(self, idx: int) -> tuple[int, int, int] | None:
        """(offset, size, flags) of page descriptor ``idx``; None past the end of the file.
        Descriptors are read DESC_BLOCK at a time (the last block is kept)."""
        blk, i = divmod(idx, DESC_BLOCK)
        if self._descs is None or self._descs[0] != blk:
            at = self._desc_off + blk * DESC_BLOCK * PAGE_DESC.itemsize
            n = min(DESC_BLOCK * PAGE_DESC.itemsize, self._file.size - at)
            n -= n % PAGE_DESC.itemsize
            self._descs = (blk, np.frombuffer(self._file.pread(at, n), dtype=PAGE_DESC)
                           if n > 0 else np.zeros(0, PAGE_DESC))
        block = self._descs[1]
        if i >= len(block):
            return None
        pd = block[i]
        return int(pd["offset"]), int(pd["size"]), int(pd["flags"])

    def in_ram(self, pfn: int) -> bool:
        """Whether the machine had RAM at ``pfn`` (the first bitmap; the dump bitmap when the
        dump has only one)."""
        return self.contains(pfn * self.page_size, 1)

    def in_dump(self, pfn: int) -> bool:
        return pfn < self.max_mapnr and self._bit(self._dump_bitmap, pfn)

    def page(self, pfn: int) -> bytes:
        """The ``page_size`` bytes of page ``pfn``."""
        hit = self._cache.get(pfn)
        if hit is not None:
            self._cache.move_to_end(pfn)
            return hit
        data = self._read_page(pfn)
        self._cache[pfn] = data
        if len(self._cache) > self._cache_pages:
            self._cache.popitem(last=False)
        return data

    def _not_in_dump(self, pfn: int, why: str) -> NotInDump:
        self.not_in_dump += 1
        if self.first_not_in_dump is None:
            self.first_not_in_dump = pfn * self.page_size
        return NotInDump(f"PA {pfn * self.page_size:#x} not in dump ({why})")

    def _read_page(self, pfn: int) -> bytes:
        bs = self.page_size
        idx = self._desc_index(pfn)
        if idx is None:
            if not self.in_ram(pfn):
                raise OutOfRange(f"PA {pfn * bs:#x} is not in the RAM of {self.path}")
            raise self._not_in_dump(pfn, f"excluded by dump level {self.header.dump_level}")
        desc = self._desc(idx)
        if desc is None:  # past the end of the file: only an incomplete dump gets here
            raise self._not_in_dump(pfn, "the dump is incomplete")
        off, size, flags = desc
        if self.incomplete and (off == 0 or size == 0 or off + size > self._file.size):
            raise self._not_in_dump(pfn, "the dump is incomplete")
        where = f"page descriptor #{idx} (PA {pfn * bs:#x})"
        if size == 0 or size > 2 * bs or off + size > self._file.size:
            raise self._fail(f"{where}: {size} bytes at {off:#x}: corrupt")
        data = self._file.pread(off, size)
        comp = flags & ANY_COMPRESSION
        if not comp:
            if size != bs:
                raise self._fail(f"{where}: uncompressed page of {size} bytes, not {bs}")
            return data
        if comp & (comp - 1):
            raise self._fail(f"{where}: several compression flags {flags:#x}")
        fn = self._decompress.get(comp)
        if fn is None:  # a page compressed otherwise than the header said
            fn = self._decompress[comp] = decompressor(comp)
        try:
            page = fn(data, bs)
        except KdumpError:
            raise
        except Exception as e:
            raise self._fail(f"{where}: {COMPRESSIONS[comp]} data does not decompress: "
                             f"{e}") from None
        if len(page) != bs:
            raise self._fail(f"{where}: {COMPRESSIONS[comp]} data gives {len(page)} bytes, "
                             f"not {bs}")
        return page

    # --- PhysMemory -----------------------------------------------------------------------
    def read(self, pa: int, size: int) -> bytes:
        if size < 0 or pa < 0:
            raise OutOfRange(f"bad read PA {pa:#x} size {size}")
        if self._fd is None:
            raise KdumpError(f"{self.path} is closed")
        bs = self.page_size
        out = bytearray()
        while size > 0:
            pfn, rel = divmod(pa, bs)
            n = min(size, bs - rel)
            page = self.page(pfn)
            out += page[rel : rel + n]
            pa, size = pa + n, size - n
        return bytes(out)

    def read_table(self, pa: int, n: int) -> np.ndarray:
        rel = pa % self.page_size
        if rel + n * 8 <= self.page_size and self._fd is not None:
            return np.frombuffer(self.page(pa // self.page_size), dtype="<u8", count=n,
                                 offset=rel)
        return np.frombuffer(self.read(pa, n * 8), dtype="<u8")

    def contains(self, pa: int, size: int = 8) -> bool:
        """Whether every byte of [pa, pa+size) is the machine's RAM (the first bitmap). A RAM
        page the dump does not hold is contained, and reading it raises :class:`NotInDump`:
        a walk then reports "not in dump" rather than "outside memory"."""
        if pa < 0 or size < 0:
            return False
        first, last = pa // self.page_size, (pa + max(size, 1) - 1) // self.page_size
        if last >= self.max_mapnr:
            return False
        bitmap = self._ram_bitmap if self._ram_bitmap is not None else self._dump_bitmap
        lo, hi = first >> 3, (last >> 3) + 1
        if hi - lo > MAX_BITMAP_BYTES // 64:
            return False
        bits = np.unpackbits(np.frombuffer(self._file.pread(bitmap + lo, hi - lo),
                                           dtype=np.uint8), bitorder="little")
        return bool(bits[first - lo * 8 : last - lo * 8 + 1].all())

    def ranges(self) -> list[tuple[int, int]]:
        """Physical ranges the dump holds (its pages, not all of RAM), as [start, end) pairs."""
        out: list[tuple[int, int]] = []
        bs = self.page_size
        step = BITMAP_CHUNK * 256
        for at in range(0, self._bitmap_bytes, step):
            n = min(step, self._bitmap_bytes - at)
            b = self._clip_tail(np.frombuffer(self._file.pread(self._dump_bitmap + at, n),
                                              dtype=np.uint8), at)
            bits = np.unpackbits(b, bitorder="little").astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], bits, [0]])))
            for s, e in zip(edges[::2], edges[1::2], strict=True):
                lo, hi = (at * 8 + int(s)) * bs, (at * 8 + int(e)) * bs
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
        return out

    scan_limit = SCAN_LIMIT

    def find(self, needle: bytes, start: int = 0, limit: int | None = None) -> Iterator[int]:
        """PAs >= ``start`` where ``needle`` occurs within one page in the dump, decompressing
        at most ``limit`` (default :data:`SCAN_LIMIT`) bytes of dumped pages."""
        left = min(limit, self.scan_limit) if limit is not None else self.scan_limit
        for lo, hi in self.ranges():
            for pa in range(max(lo, start - start % self.page_size), hi, self.page_size):
                if left <= 0:
                    return
                left -= self.page_size
                page = self.page(pa // self.page_size)
                i = page.find(needle)
                while i >= 0:
                    if pa + i >= start:
                        yield pa + i
                    i = page.find(needle, i + 1)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._cache.clear()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return (f"<KdumpCompressed {self.path} {self.header.compression} "
                f"{self.pages_in_dump} pages>")
