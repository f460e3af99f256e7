"""kdump-compressed dumps (ptlab.memory.kdump): every compression, both layouts, filtered and
incomplete dumps, bad files; page reads checked against libkdumpfile (Debian's
python3-libkdumpfile, run by /usr/bin/python3 in a subprocess) and the flattened writer checked
against ``makedumpfile -R``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import textwrap

import pytest
from ptlab.memory import OutOfRange, SparseMemory
from ptlab.memory.elfwrite import cpu_notes, loads_from_sparse, vmcoreinfo_note, write_core
from ptlab.memory.kdump import KdumpCompressed, KdumpError, NotInDump
from ptlab.memory.kdumpwrite import diskdump_bytes, flatten
from test_cli import RAM, build_x86, run

SYSTEM_PYTHON = "/usr/bin/python3"
PAGE = 4096
MAX_MAPNR = 70_000  # > 2 rank chunks of 32768 PFNs
COMPRESSIONS = ["zlib", "lzo", "snappy", "zstd", None]

WITNESS = textwrap.dedent("""
    import hashlib, json, sys, kdumpfile
    k = kdumpfile.kdumpfile(sys.argv[1])
    out = {}
    for pfn in json.loads(sys.argv[2]):
        try:
            data = bytes(k.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * 4096, 4096))
            out[pfn] = hashlib.sha256(data).hexdigest()
        except kdumpfile.exceptions.NoDataException as e:
            out[pfn] = "nodata"
    print(json.dumps(out))
""")


def libkdumpfile_pages(path: str, pfns: list[int]) -> dict[int, str]:
    """sha256 of each page as libkdumpfile reads it, or "nodata"."""
    p = subprocess.run([SYSTEM_PYTHON, "-c", WITNESS, path, json.dumps(pfns)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return {int(k): v for k, v in json.loads(p.stdout).items()}


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def sample_pages(seed: int = 5) -> tuple[dict[int, bytes], set[int]]:
    """Pages across three rank chunks: random, compressible, zero (shared descriptor); RAM
    is [0, 66000) with holes the dump filters."""
    rng = random.Random(seed)
    ram = set(range(0, 66_000))
    pages: dict[int, bytes] = {}
    for pfn in rng.sample(sorted(ram), 300):
        kind = pfn % 3
        if kind == 0:
            pages[pfn] = bytes(PAGE)
        elif kind == 1:
            pages[pfn] = rng.randbytes(PAGE)
        else:
            pages[pfn] = (rng.randbytes(64) * (PAGE // 64))
    return pages, ram


@pytest.fixture(scope="module")
def sample():
    return sample_pages()


def probe_pfns(pages: dict[int, bytes], ram: set[int]) -> list[int]:
    rng = random.Random(9)
    filtered = rng.sample(sorted(ram - set(pages)), 40)
    return sorted(pages) + filtered + [66_001, MAX_MAPNR - 1]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_pages_match_libkdumpfile(tmp_path, sample, compression):
    pages, ram = sample
    path = tmp_path / "dump.kdump"
    path.write_bytes(diskdump_bytes(pages, MAX_MAPNR, ram=ram, compression=compression,
                                    vmcoreinfo="OSRELEASE=6.1.0\nPAGESIZE=4096\n"))
    probe = probe_pfns(pages, ram)
    witness = libkdumpfile_pages(str(path), probe)
    with KdumpCompressed(path) as mem:
        assert mem.pages_in_dump == len(pages)
        assert mem.header.compression == (compression or "none")
        assert mem.vmcoreinfo is not None and mem.vmcoreinfo.osrelease == "6.1.0"
        assert mem.machine == "x86_64"
        for pfn in probe:
            if witness[pfn] == "nodata":
                with pytest.raises(OutOfRange) as e:
                    mem.read(pfn * PAGE, 8)
                assert (pfn in ram) == isinstance(e.value, NotInDump), pfn
                if pfn in ram:
                    assert "not in dump" in str(e.value)
            else:
                got = mem.read(pfn * PAGE, PAGE)
                assert sha(got) == witness[pfn] and got == pages[pfn], pfn
        # a table read inside a page, a read across two dumped pages
        pfn = min(p for p in pages if p + 1 in pages) if any(p + 1 in pages for p in pages) \
            else None
        if pfn is not None:
            assert mem.read(pfn * PAGE + PAGE - 8, 16) == pages[pfn][-8:] + pages[pfn + 1][:8]
        some = sorted(pages)[1]
        assert mem.read_table(some * PAGE + 64, 8).tobytes() == pages[some][64:128]
        assert mem.contains(some * PAGE) and not mem.contains(66_001 * PAGE)
        assert mem.ranges()[0][0] == min(pages) * PAGE


def test_flattened_reads_like_rearranged(tmp_path, sample):
    pages, ram = sample
    dump = diskdump_bytes(pages, MAX_MAPNR, ram=ram, compression="zlib")
    flat = tmp_path / "dump.flat"
    flat.write_bytes(flatten(dump))
    # the flattened writer is right: makedumpfile -R rebuilds the dump from it
    rearranged = tmp_path / "rearranged.kdump"
    with open(flat, "rb") as f:
        p = subprocess.run(["makedumpfile", "-R", str(rearranged)], stdin=f,
                           capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert rearranged.read_bytes()[: len(dump)] == dump
    witness = libkdumpfile_pages(str(rearranged), sorted(pages)[:50])
    with KdumpCompressed(flat) as mem:
        assert mem.header.flattened
        for pfn, digest in witness.items():
            assert sha(mem.read(pfn * PAGE, PAGE)) == digest


def test_incomplete_dump_says_not_in_dump(tmp_path, sample):
    pages, ram = sample
    path = tmp_path / "cut.kdump"
    path.write_bytes(diskdump_bytes(pages, MAX_MAPNR, ram=ram, incomplete_after=100))
    with KdumpCompressed(path) as mem:
        assert mem.incomplete
        pfns = sorted(pages)
        nonzero_written = [p for p in pfns[:100] if pages[p].strip(b"\0")]
        assert mem.read(nonzero_written[0] * PAGE, PAGE) == pages[nonzero_written[0]]
        with pytest.raises(NotInDump, match="incomplete"):
            mem.read(pfns[150] * PAGE, 8)


def test_truncated_incomplete_dump(tmp_path, sample):
    """An incomplete dump whose file ends inside the descriptors: still opens; pages whose
    descriptor is missing are not in the dump."""
    pages, ram = sample
    data = diskdump_bytes(pages, MAX_MAPNR, ram=ram, incomplete_after=10)
    path = tmp_path / "short.kdump"
    # keep the header .. the first 20 descriptors (drop the rest and the data of later pages)
    desc_off = data.index(b"\0" * 24 * 10, len(data) - len(data) // 2 - 24 * 300)
    path.write_bytes(data[: max(desc_off, 4096 * 8)])
    with KdumpCompressed(path) as mem:
        with pytest.raises(NotInDump, match="incomplete"):
            mem.read(sorted(pages)[-1] * PAGE, 8)


def header_patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    import struct

    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(("mutate", "pattern"), [
    (lambda d: d[:300], "truncated header"),
    (lambda d: d[:4096 * 3], "past the end"),
    (lambda d: header_patched(d, 428, "<i", 1234), "not a page size"),
    (lambda d: header_patched(d, 8, "<i", 0), "too old"),
    (lambda d: header_patched(d, 436, "<I", 0), "corrupt"),  # no bitmap blocks
    (lambda d: header_patched(d, 4096 + 96, "<Q", 1 << 40), "cannot cover"),  # max_mapnr_64
    (lambda d: b"KDUMP   " + bytes(8), "truncated header"),
    (lambda d: header_patched(d, 4096 + 12, "<i", 1), "split dump"),
    (lambda d: flatten(d)[:-16], "without its end record"),
    (lambda d: flatten(d)[:5000], "truncated or corrupt"),
])
def test_bad_dumps_one_clear_error(tmp_path, sample, mutate, pattern):
    pages, ram = sample
    data = mutate(diskdump_bytes(pages, MAX_MAPNR, ram=ram))
    path = tmp_path / "bad.kdump"
    path.write_bytes(data)
    with pytest.raises(KdumpError, match=pattern) as e:
        KdumpCompressed(path).close()
    assert "\n" not in str(e.value)
    code, out, err = run("--dump", str(path), "info")
    assert code == 2 and err.count("\n") == 1 and err.startswith("ptlab: error:"), err


def test_machine_from_notes_or_unknown(tmp_path):
    """QEMU 7.2 writes utsname.machine "Unknown" for arm64: the CPU notes' size tells; with
    neither a known machine, VMCOREINFO nor CPU notes, --format is required."""
    pages = {0: bytes(PAGE), 1: b"\x11" * PAGE}
    arm_notes = b"".join(cpu_notes("arm64"))
    path = tmp_path / "arm.kdump"
    path.write_bytes(diskdump_bytes(pages, 16, machine="Unknown", notes=arm_notes))
    with KdumpCompressed(path) as mem:
        assert mem.machine == "arm64" and len(mem.cpus) == 1
    path.write_bytes(diskdump_bytes(pages, 16, machine="sparc64"))
    with KdumpCompressed(path) as mem:
        assert mem.machine is None and mem.read(PAGE, 4) == b"\x11" * 4
    code, out, err = run("--dump", str(path), "walk")
    assert code == 2 and "--format NAME is required for" in err, err


def test_lying_bitmap(tmp_path, sample):
    """A dump bitmap claiming every page: its descriptors would run past the end of the file."""
    pages, ram = sample
    data = bytearray(diskdump_bytes(pages, MAX_MAPNR, ram=ram))
    bitmap_half = -(-MAX_MAPNR // 8 // PAGE) * PAGE
    dump_bitmap = 2 * PAGE + bitmap_half
    data[dump_bitmap : dump_bitmap + bitmap_half] = b"\xff" * bitmap_half
    path = tmp_path / "liar.kdump"
    path.write_bytes(bytes(data))
    with pytest.raises(KdumpError, match="lying bitmap"):
        KdumpCompressed(path)


def test_corrupt_page_data(tmp_path, sample):
    pages, ram = sample
    data = bytearray(diskdump_bytes(pages, MAX_MAPNR, ram=ram, compression="zlib"))
    data[-200:] = bytes(200)  # the last compressed page: garbage
    path = tmp_path / "corrupt.kdump"
    path.write_bytes(bytes(data))
    with KdumpCompressed(path) as mem:
        with pytest.raises(KdumpError, match="does not decompress|gives"):
            for pfn in sorted(pages):
                mem.read(pfn * PAGE, 8)


def x86_dump_files(tmp_path, filter_pfns=(), compression="zlib"):
    mem = SparseMemory(RAM)
    root = build_x86(mem)
    vmci = ("OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(phys_base)=0\n"
            f"SYMBOL(init_top_pgt)={0xFFFFFFFF80000000 + root:x}\n"
            "NUMBER(pgtable_l5_enabled)=0\n")
    npages = RAM // PAGE
    pages = {p: mem.read(p * PAGE, PAGE) for p in range(npages) if p not in filter_pfns}
    notes = b"".join(cpu_notes("x86_64", cr3=root))
    kd = tmp_path / "x86.kdump"
    kd.write_bytes(diskdump_bytes(pages, npages, ram=set(range(npages)), compression=compression,
                                  vmcoreinfo=vmci, notes=notes))
    flat = tmp_path / "x86.flat"
    flat.write_bytes(flatten(kd.read_bytes()))
    core = tmp_path / "x86.core"
    write_core(core, "x86_64", loads_from_sparse(mem, [(0, RAM)]),
               [*cpu_notes("x86_64", cr3=root), vmcoreinfo_note(vmci)])
    raw = tmp_path / "x86.raw"
    raw.write_bytes(mem.read(0, RAM))
    return {"kdump": str(kd), "flat": str(flat), "core": str(core), "raw": str(raw)}


@pytest.mark.parametrize("cmd", [["walk"], ["ptdump"], ["wx"],
                                 ["translate", "0xffffffff81201000"]])
def test_cli_dump_kinds_agree(tmp_path, cmd):
    """--dump recognises ELF, both kdump layouts and raw by content; all give one answer."""
    f = x86_dump_files(tmp_path)
    outs = {}
    for kind in ("kdump", "flat", "core"):
        code, out, err = run("--dump", f[kind], *cmd)
        assert err == "" and code in (0, 1), (kind, err)
        outs[kind] = (code, out)
    code, out, err = run("--dump", f["raw"], "--format", "x86_64-4level", "--root", "0x1000",
                         *cmd)
    outs["raw"] = (code, out)
    assert outs["kdump"] == outs["flat"] == outs["core"] == outs["raw"]
    assert outs["core"] == run("--elf", f["core"], *cmd)[:2]
    code, out, _ = run("--dump", f["kdump"], "info")
    assert "kdump: KDUMP version 6, zlib" in out and "root: 0x1000" in out


def test_cli_filtered_table_is_not_in_dump(tmp_path):
    f = x86_dump_files(tmp_path, filter_pfns={4}, compression="lzo")  # the PTE table
    code, out, err = run("--dump", f["kdump"], "walk")
    assert code == 0
    assert "table at 0x4000 unreadable: PA 0x4000 not in dump" in out
    runs = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert len(runs) == 1 and runs[0].startswith("0xffffffff81000000-")  # no zeros invented
    assert "not in dump" in err
    code, out, err = run("--dump", f["kdump"], "translate", "0xffffffff81201000")
    assert code == 1 and "not in dump" in out
    for cmd in ("ptdump", "wx"):
        code, out, err = run("--dump", f["kdump"], cmd)
        assert code in (0, 1) and err.startswith("ptlab: warning:") and "not in dump" in err
    # the excluded page reads as an error through every path, never as zeros
    with KdumpCompressed(f["kdump"]) as mem:
        for read in (lambda: mem.read(0x4000, 8), lambda: mem.read_table(0x4000, 512),
                     lambda: mem.read_u64(0x4ff8), lambda: mem.read(0x3ff8, 16)):
            with pytest.raises(NotInDump):
                read()
    assert os.path.getsize(f["kdump"]) > 0


def test_vmcoreinfo_scan_in_a_kdump(tmp_path):
    """--vmcoreinfo scan decompresses pages (at most SCAN_LIMIT bytes) to find the note."""
    from ptlab.memory.kdump import SCAN_LIMIT

    note = (b"\x0b\0\0\0" + (40).to_bytes(4, "little") + bytes(4) + b"VMCOREINFO\0\0"
            + b"OSRELEASE=6.1.0-scan\nPAGESIZE=4096\n")
    pages = {p: bytes(PAGE) for p in range(8)}
    pages[5] = (bytes(100) + note).ljust(PAGE, b"\0")
    path = tmp_path / "noted.kdump"
    path.write_bytes(diskdump_bytes(pages, 16, compression="zlib"))
    code, out, err = run("--dump", str(path), "--vmcoreinfo", "scan", "--format",
                         "x86_64-4level", "info")
    assert code == 0, err
    assert "OSRELEASE=6.1.0-scan" in out
    assert f"note found in memory at PA {5 * PAGE + 100:#x}" in out
    del pages[5]
    path.write_bytes(diskdump_bytes(pages, 16, compression="zlib"))
    code, out, err = run("--dump", str(path), "--vmcoreinfo", "scan", "info")
    assert code == 2 and f"at most its first {SCAN_LIMIT >> 30}G" in err, err


@pytest.mark.parametrize("compression", ["zlib", "snappy", "zstd", "lzo"])
def test_page_bomb_is_refused(tmp_path, compression):
    """A page whose data claims or inflates to far more than a page: an error, and no
    allocation of what it claims."""
    import struct
    import zlib

    import cramjam

    pages = {1: b"\x22" * PAGE, 2: bytes(range(256)) * 16}
    data = bytearray(diskdump_bytes(pages, 16, compression=compression))
    big = b"\x33" * (4 << 20)
    bomb = {"zlib": lambda: zlib.compress(big, 9),  # 4 MiB from ~4 KiB
            "snappy": lambda: bytes(cramjam.snappy.compress_raw(big))[: 2 * PAGE],
            "zstd": lambda: bytes(cramjam.zstd.compress(big))[: 2 * PAGE],
            "lzo": lambda: b"\xff" * 8000}[compression]()
    assert len(bomb) <= 2 * PAGE
    desc_off = 4 * PAGE  # header, one sub-header block, two bitmap blocks
    flags = {"zlib": 1, "lzo": 2, "snappy": 4, "zstd": 0x20}[compression]
    struct.pack_into("<QIIQ", data, desc_off + 24, len(data), len(bomb), flags, 0)
    data += bomb
    path = tmp_path / "bomb.kdump"
    path.write_bytes(bytes(data))
    with KdumpCompressed(path) as mem:
        assert mem.read(PAGE, 8) == b"\x22" * 8
        with pytest.raises(KdumpError, match="decompress|gives"):
            mem.read(2 * PAGE, 8)
