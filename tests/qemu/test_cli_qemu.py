"""The CLI's commands over a real dump: one x86-64 PTI guest run with ``-device vmcoreinfo``,
stopped once and dumped with QEMU's ``dump-guest-memory`` (ELF with the kernel's VMCOREINFO).

* ``translate --json --file``: sampled kernel VAs (mapped and not) against drgn 0.3.0's
  ``follow_phys`` on the same dump (an independent reader and walker).
* ``disasm`` of ``_stext`` (kallsyms): the instructions' bytes are those QEMU's ``xp`` reads at
  ``__pa_symbol(_stext)``.
* ``check``: nothing on the clean guest (whose own DEBUG_WX line says passed); the kernel text
  starts at kallsyms' ``_stext``; the PTI user PGD found is the kernel PGD + 4 KiB. In a copy of
  the dump with three planted changes it reports exactly them: a direct-map leaf with NX
  cleared (``wx``), another with US set along its path (``user-kernel``), and the user PGD's
  top entry for the kernel image replaced by the kernel's (``user-root`` findings covering
  kallsyms' ``linux_banner``).
* ``search HEX`` of the agent's canary through the agent's root: the agent's user VA and the
  direct-map alias (QEMU's gva2gpa of page_offset_base + PA), at the agent's pagemap PFN.
* ``check``, ``walk --json`` and ``translate`` over QEMU's kdump-zlib dump of the same stop
  print what they print over the ELF dump.
* ``map --svg --png``: the regions, no W+X run; the PNG decodes (zlib) to the SVG's size.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    check_map,
    cli,
    disasm_stext,
    elf_file_offset,
    patch_u64s,
    planted_copy,
)
from conftest import ram_dir
from ptharness import oracle
from ptharness.agent_reply import kallsyms
from ptharness.scenarios import find_user_roots, in_kernel_regime, stop_where
from ptlab.arch.x86_64 import START_KERNEL_MAP
from ptlab.memory import ElfCore
from ptlab.walk import Walker, translate

pytestmark = [pytest.mark.qemu, pytest.mark.profile("x86_64-pti")]

PROFILE = "x86_64-pti"
SAMPLE = 20_000
NX, US = 1 << 63, 1 << 2


@pytest.fixture(scope="module")
def dumped(rng_factory: Any, guest_pool: Any) -> Any:
    """The guest's ELF and kdump-zlib dumps (one stop, in the kernel's regime; in a folder in
    RAM), its kallsyms and dmesg, the kernel root and the format, the agent's canary and its
    direct-map alias."""
    with ram_dir() as tmp:
        yield from _dumped(tmp, rng_factory, guest_pool)


def _dumped(tmp: Any, rng_factory: Any, guest_pool: Any) -> Any:
    path, kdump = tmp / "vmcore.elf", tmp / "vmcore.kdump-zlib"
    try:
        g = guest_pool.acquire(PROFILE, devices=("vmcoreinfo",))
        syms = kallsyms(g.info)
        code, dmesg, _ = g.ssh("dmesg")
        assert code == 0
        root, fmt = g.kernel_root(), g.kernel_format()
        canary = g.agent("canary")  # held by the agent daemon until the guest goes
        # stopped where QEMU's x/gva2gpa walk the kernel tables (not a PTI user PGD)
        stop_where(g, lambda regs: in_kernel_regime(g, regs, root),
                   rng_factory("cli-qemu-stop"))
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{kdump}",
              format="kdump-zlib")
        # the canary's direct-map alias: page_offset_base read and translated by QEMU
        pob = g.hmp(f"x /1gx {syms['page_offset_base']:#x}").split(":", 1)[1].split()[0]
        alias = int(pob, 16) + canary["pfn"] * 4096
        alias_pa = oracle.gva2gpa(g.hmp, alias)
        # QEMU's own read of _stext's bytes, at the PA __pa_symbol() gives (no page tables)
        pa = syms["_stext"] - START_KERNEL_MAP + g.vmcoreinfo().number("phys_base")
        text = bytes(int(b, 16) for line in g.hmp(f"xp /48xb {pa:#x}").splitlines()
                     for b in line.split(":", 1)[1].split())
        yield {"path": path, "syms": syms, "dmesg": dmesg, "root": root, "fmt": fmt, "tmp": tmp,
               "stext_bytes": text, "kdump": kdump, "canary": canary, "alias": alias,
               "alias_pa": alias_pa}
    finally:
        path.unlink(missing_ok=True)
        kdump.unlink(missing_ok=True)


def test_translate_agrees_with_drgn(dumped: Any, seeded_rng: random.Random) -> None:
    import _drgn
    import drgn

    path, fmt, root = dumped["path"], dumped["fmt"], dumped["root"]
    core = ElfCore(path)
    try:
        assert core.vmcoreinfo is not None, "no VMCOREINFO note: -device vmcoreinfo missing?"
        runs = list(Walker(fmt, core, root).runs(1 << 63, 1 << 64))
        pgd = core.vmcoreinfo.symbol("init_top_pgt")
    finally:
        core.close()
    lo, hi = fmt.va_ranges()[-1]
    vas = [(r.va + seeded_rng.randrange(r.size)) & ~7 for r in seeded_rng.choices(runs, k=SAMPLE)]
    vas += [seeded_rng.randrange(lo, hi) & ~7 for _ in range(SAMPLE // 10)]
    vafile = dumped["tmp"] / "vas.txt"
    vafile.write_text("".join(f"{va:#x}\n" for va in vas))
    code, out = cli("--dump", str(path), "translate", "--json", "--file", str(vafile))
    ours = [json.loads(line) for line in out.splitlines()]
    assert len(ours) == len(vas) and code == 1  # some random VAs are unmapped
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    mapped = 0
    for va, o in zip(vas, ours, strict=True):
        assert o["va"] == hex(va)
        try:
            theirs = _drgn._linux_helper_follow_phys(prog, pgd, va)
        except drgn.FaultError:
            theirs = None
        assert (int(o["pa"], 16) if o["pa"] is not None else None) == theirs, (hex(va), o)
        mapped += theirs is not None
    assert mapped >= SAMPLE  # every VA sampled from a run is mapped for drgn too
    vafile.unlink()


def test_check_clean_guest(dumped: Any) -> None:
    assert "x86/mm: Checked W+X mappings: passed" in dumped["dmesg"]
    code, out = cli("--dump", str(dumped["path"]), "check")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1, out
    stext = dumped["syms"]["_stext"]
    root = dumped["root"]
    assert lines[0].startswith(f"# 0 finding(s); root {root:#x}, text {stext:#x}-"), lines
    assert lines[0].endswith(f"PTI user PGD (kernel PGD + 0x1000) at {root + 0x1000:#x}")


def test_check_finds_planted_changes(dumped: Any, seeded_rng: random.Random) -> None:
    fmt, root, syms = dumped["fmt"], dumped["root"], dumped["syms"]
    planted = planted_copy(dumped["path"], dumped["tmp"])
    core = ElfCore(planted)
    try:
        direct = [r for r in Walker(fmt, core, root).runs(1 << 63, 1 << 64)
                  if r.page_size == 4096 and r.attrs.writable and not r.attrs.exec
                  and not r.attrs.user and r.va >> 39 == 0xFFFF888000000000 >> 39]
        wx_run, us_run = seeded_rng.sample(direct, 2)
        wx_va = wx_run.va + seeded_rng.randrange(wx_run.size // 4096) * 4096
        us_va = us_run.va + seeded_rng.randrange(us_run.size // 4096) * 4096
        edits = []  # (file offset, bits to set, bits to clear)
        t = translate(fmt, core, root, wx_va)
        edits.append((elf_file_offset(core, t.steps[-1].entry_pa), 0, NX))
        t = translate(fmt, core, root, us_va)
        edits += [(elf_file_offset(core, s.entry_pa), US, 0) for s in t.steps]
        slot = fmt.index(syms["linux_banner"] & (fmt.va_span - 1), fmt.top_level) * 8
        kernel_entry = core.read(root + slot, 8)
        user_slot = elf_file_offset(core, root + 0x1000 + slot)
        print(f"planted: W+X at {wx_va:#x}, US at {us_va:#x}, user PGD slot {slot // 8}")
    finally:
        core.close()
    patch_u64s(planted, edits, [(user_slot, kernel_entry)])
    code, out = cli("--dump", str(planted), "check", "--json")
    found = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    wx = [(f["va"], f["end"]) for f in found if f["rule"] == "wx"]
    assert wx == [(hex(wx_va), hex(wx_va + 4096))], found
    us = [(f["va"], f["end"]) for f in found if f["rule"] == "user-kernel"]
    assert us == [(hex(us_va), hex(us_va + 4096))], found
    leaks = [f for f in found if f["rule"] == "user-root"]
    assert all(f["root"] == hex(root + 0x1000) for f in leaks)
    banner = syms["linux_banner"]
    assert any(int(f["va"], 16) <= banner < int(f["end"], 16) for f in leaks), leaks
    assert {f["rule"] for f in found} == {"wx", "user-kernel", "user-root"}, found
    planted.unlink()


def test_diff_kernel_pgd_vs_pti_user_pgd(dumped: Any) -> None:
    """The user PGD is cloned from the kernel's tables (pti_clone_*): against the kernel PGD
    it adds nothing, and kallsyms' linux_banner is in a range it does not map."""
    root = dumped["root"]
    code, out = cli("--dump", str(dumped["path"]), "diff", "--root-b", hex(root + 0x1000),
                    "--json", "--compare-pa")
    changes = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and changes
    assert not [c for c in changes if c["kind"] == "added"], changes[:5]
    banner = dumped["syms"]["linux_banner"]
    hit = [c for c in changes if int(c["va"], 16) <= banner < int(c["end"], 16)]
    assert [c["kind"] for c in hit] == ["removed"], hit
    assert hit[0]["region"] == "High Kernel Mapping"


def test_search_finds_linux_banner(dumped: Any) -> None:
    """``search --string`` of the banner's start finds kallsyms' linux_banner (and its direct
    map alias at the same PA)."""
    code, out = cli("--dump", str(dumped["path"]), "search", "--string", "Linux version ",
                    "--json")
    hits = {int(h["va"], 16): int(h["pa"], 16) for h in map(json.loads, out.splitlines())}
    banner = dumped["syms"]["linux_banner"]
    assert code == 0 and banner in hits, sorted(hex(v) for v in hits)
    assert [va for va, pa in hits.items() if pa == hits[banner] and va >> 63 and va != banner]


def test_search_finds_agent_canary(dumped: Any) -> None:
    """``search HEX`` of the agent's canary (64 random bytes) through the agent's own root
    (found in the dump by its canary mapping) reports the agent's user VA and the direct-map
    alias QEMU translates (gva2gpa), both at the PFN the agent read from /proc/self/pagemap."""
    canary, fmt = dumped["canary"], dumped["fmt"]
    va, pa = canary["va"], canary["pfn"] * 4096
    assert dumped["alias_pa"] == pa, (hex(dumped["alias"]), dumped["alias_pa"])
    core = ElfCore(dumped["path"])
    try:
        roots = find_user_roots(fmt, core, {va: pa})
    finally:
        core.close()
    assert roots, "no table root maps the agent's canary"
    code, out = cli("--dump", str(dumped["path"]), "--root", hex(roots[0]), "search",
                    canary["pattern"], "--json")
    hits = {int(h["va"], 16): int(h["pa"], 16) for h in map(json.loads, out.splitlines())}
    assert code == 0, out
    assert hits.get(va) == pa, sorted((hex(v), hex(p)) for v, p in hits.items())
    assert hits.get(dumped["alias"]) == pa, sorted((hex(v), hex(p)) for v, p in hits.items())


@pytest.mark.parametrize("argv", [("check",), ("walk", "--json"),
                                  ("translate", "--json", "LINUX_BANNER", "STEXT", "ALIAS",
                                   "0xffff800000000000", "0x1000"),
                                  ("translate", "ALIAS")],
                         ids=["check", "walk", "translate-batch", "translate-trace"])
def test_kdump_same_as_elf(dumped: Any, argv: tuple[str, ...]) -> None:
    """QEMU's kdump-zlib dump of the same stop gives the same output as its ELF dump."""
    subst = {"LINUX_BANNER": dumped["syms"]["linux_banner"], "STEXT": dumped["syms"]["_stext"],
             "ALIAS": dumped["alias"]}
    argv = tuple(hex(subst[a]) if a in subst else a for a in argv)
    elf = cli("--dump", str(dumped["path"]), *argv)
    kd = cli("--dump", str(dumped["kdump"]), *argv)
    assert elf[1] and kd == elf
    if argv[0] == "translate" and len(argv) > 2:
        pas = [json.loads(line)["pa"] for line in elf[1].splitlines()]
        assert pas[2] == hex(dumped["alias_pa"]) and pas[3:] == [None, None], pas


def test_disasm_stext_matches_qemu(dumped: Any) -> None:
    stext = dumped["syms"]["_stext"]
    # 24: Linux 6.12 x86 starts _stext with 16 one-byte NOPs (CALL_PADDING before a function)
    insns, got = disasm_stext(dumped["path"], stext, 24)
    n = min(len(got), len(dumped["stext_bytes"]))
    assert len(got) >= 24 and got[:n] == dumped["stext_bytes"][:n], (got.hex(), insns)


def test_kaslr_base_is_kallsyms_text(dumped: Any) -> None:
    code, out = cli("--dump", str(dumped["path"]), "kaslr", "--json")
    obj = json.loads(out)
    assert code == 0 and obj["agree"] and obj["text"] == hex(dumped["syms"]["_text"]), obj


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, RGB rows) of the 8-bit RGB filter-0 PNG ptlab writes (zlib, struct)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, *fields = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert fields == [8, 2, 0, 0, 0] and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == w * h * 3 + h
    rows = [raw[y * (3 * w + 1):(y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, [r[1:] for r in rows]


def test_map_svg_of_real_dump(dumped: Any) -> None:
    from ptlab.svgmap import COLOURS, LABEL, WIDTH

    root, data = check_map(dumped["path"], dumped["tmp"], {
        "Low Kernel Mapping", "High Kernel Mapping", "Modules", "CPU entry Area"})
    w, h, rows = decode_png(data)
    assert (w, h) == (int(root.get("width")), int(root.get("height")))
    bars = {"#" + row[x:x + 3].hex() for row in rows[60:]  # the run bars, below the legend
            for x in range(3 * LABEL, 3 * (WIDTH - 120), 3)}
    assert COLOURS["rx"] in bars and COLOURS["W+X"] not in bars
    if os.environ.get("PTLAB_KEEP_MAP"):  # to look at the picture
        Path(os.environ["PTLAB_KEEP_MAP"]).write_bytes(data)
