#!/usr/bin/env python3
"""Dump benchmark: one ``name: value unit`` line per figure on stdout.

    .venv/bin/python bench/dump.py [--repeat N] [--vas N] [--dump FILE] [--no-growth]

It boots a 1 GiB x86-64 guest with ``-device vmcoreinfo`` (the guest's ``qemu_fw_cfg`` module
hands QEMU the kernel's VMCOREINFO note), stops it and writes an ELF dump with QEMU's
``dump-guest-memory`` into a private temporary directory (``--dump FILE``: use that dump
instead). Figures (targets in brackets):

* ``translate_vas_per_s[ptlab]``: :func:`ptlab.vtop.translate_many` over ``--vas`` kernel VAs
  (a random VA in a random leaf run of the kernel half, plus 1 in 10 random kernel-half VAs,
  mostly unmapped), median of ``--repeat``; ``translate_vas_per_s[drgn]``: drgn 0.3.0's
  ``follow_phys`` (its ``_linux_helper_follow_phys``) over the same VAs in the same dump;
  ``translate_vs_drgn_ratio`` [>= 1]. The two must agree on every VA (PA, or both fault).
* ``walk_dump_s``, ``walk_dump_peak_mib``: the whole ``ptlab --dump FILE walk`` process (wall
  time, median after one untimed run; peak RSS from the child's rusage; Python's bytecode
  cache on, as in a normal install, kept in the private temporary folder) [<= 0.5 s,
  <= 150 MiB]; ``ptdump_dump_s``,
  ``ptdump_dump_peak_mib`` the same for ``ptdump``; ``search_1GiB_s`` for ``search --string``
  over the 1 GiB dump's mappings [<= 2 s].
* ``walk_1GiB_4K_s``, ``walk_64GiB_4K_s``, ``walk_64GiB_4K_peak_mib``, ``walk_growth_64_vs_1``:
  ``ptlab walk`` of raw images of an arm64 machine whose linear map (all of RAM) the engine
  mapped with 4K pages, as ``rodata=full`` does (64 GiB: 16 M PTEs in 32,768 tables)
  [growth <= 70, peak <= 150 MiB].

drgn comes from the ``bench`` extra (``pip install -e '.[bench]'``). Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # bench/benchlib.py: the script's own folder is on sys.path
import numpy as np

PROFILE = "x86_64"
GNU_TIME = "/usr/bin/time"
TARGETS = {
    "translate_vs_drgn_ratio": (">=", 1.0),
    "walk_dump_s": ("<=", 0.5),
    "walk_dump_peak_mib": ("<=", 150.0),
    "ptdump_dump_s": ("<=", 0.5),
    "ptdump_dump_peak_mib": ("<=", 150.0),
    "search_1GiB_s": ("<=", 2.0),
    "walk_64GiB_4K_peak_mib": ("<=", 150.0),
    "walk_growth_64_vs_1": ("<=", 70.0),
}
_SCRIPT = Path(sys.executable).parent / "ptlab"  # the installed entry point, as users run it
PTLAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "ptlab.cli"]


def figure(name: str, value: float, unit: str) -> None:
    benchlib.figure(name, value, unit, TARGETS)


def note(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def make_dump(tmp: Path) -> Path:
    """A QEMU ELF dump (with VMCOREINFO) of a booted, stopped 1 GiB x86-64 guest."""
    from ptharness.guest import Guest

    path = tmp / "vmcore.elf"
    with Guest(PROFILE, mem_mb=1024, devices=("vmcoreinfo",)) as g:
        note(f"booted {PROFILE} in {g.boot_seconds:.2f} s")
        g.stop()
        t0 = time.perf_counter()
        g.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
        note(f"dump-guest-memory: {path.stat().st_size >> 20} MiB in "
             f"{time.perf_counter() - t0:.2f} s")
    return path


CHILD_ENV: dict[str, str] = dict(os.environ)  # main() points it at a bytecode cache


def child_env(tmp: Path) -> None:
    """Children run as from a normal install: Python's bytecode cache is on (here in the
    private ``tmp``, not beside the sources), whatever PYTHONDONTWRITEBYTECODE says; each
    timed command has one untimed run first (:func:`time_cli`) that fills it."""
    CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")


def run_child(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` (stdout to /dev/null) under GNU time; its wall time (s) and peak RSS (MiB).

    GNU time is the child's parent: a child forked from this process would count this
    process's own RSS in its peak (the kernel keeps the pre-exec high-water mark)."""
    with open(os.devnull, "wb") as null:
        t0 = time.perf_counter()
        proc = subprocess.run([GNU_TIME, "-f", "%M", *argv], stdout=null,
                              stderr=subprocess.PIPE, check=False, env=CHILD_ENV)
        secs = time.perf_counter() - t0
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: {err}")
    return secs, int(err.splitlines()[-1]) / 1024  # %M: KiB


def time_cli(name: str, argv: list[str], repeat: int) -> tuple[float, float]:
    run_child(argv)  # warm-up: bytecode cache, page cache
    runs = [run_child(argv) for _ in range(repeat)]
    secs, peak = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
    figure(f"{name}_s", secs, "s")
    figure(f"{name}_peak_mib", peak, "MiB")
    return secs, peak


def sample_vas(runs: list, fmt, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` VAs: 9 in 10 at a random offset of a random leaf run, 1 in 10 anywhere in the
    kernel half."""
    starts = np.array([r.va for r in runs], dtype=np.uint64)
    sizes = np.array([r.size for r in runs], dtype=np.uint64)
    pick = rng.integers(0, len(runs), n)
    off = (rng.random(n) * sizes[pick].astype(np.float64)).astype(np.uint64)
    vas = starts[pick] + np.minimum(off, sizes[pick] - np.uint64(1))
    lo, hi = fmt.va_ranges()[-1]
    wild = rng.random(n) < 0.1
    vas[wild] = np.uint64(lo) + (rng.random(int(wild.sum())) * float(hi - lo)).astype(np.uint64)
    return vas & ~np.uint64(7)


def bench_translate(dump: Path, nvas: int, repeat: int) -> None:
    import _drgn
    import drgn
    from ptlab.arch import arch_for, kernel_root
    from ptlab.memory import ElfCore
    from ptlab.vtop import translate_many
    from ptlab.walk import Walker

    core = ElfCore(dump)
    try:
        vmci = core.vmcoreinfo
        if vmci is None:
            raise SystemExit(f"{dump} has no VMCOREINFO note (drgn needs it)")
        ops = arch_for(core.machine)
        fmt, _ = ops.format_from(core.cpus[0].control if core.cpus else None, vmci, "CPU 0")
        root, _ = kernel_root(ops, vmci)
        lo, hi = fmt.va_ranges()[-1]
        runs = list(Walker(fmt, core, root).runs(lo, hi))
        vas = sample_vas(runs, fmt, nvas, np.random.default_rng(7))
        times, batch = [], None
        for _ in range(repeat):
            t0 = time.perf_counter()
            batch = translate_many(fmt, core, root, vas)
            times.append(time.perf_counter() - t0)
        assert batch is not None
        ours = statistics.median(times)
    finally:
        core.close()
    prog = drgn.Program()
    prog.set_core_dump(str(dump))
    pgd = int(vmci[f"SYMBOL({ops.root_symbol})"], 16)
    follow = _drgn._linux_helper_follow_phys
    va_list = vas.tolist()
    times, theirs_pa = [], []
    for _ in range(repeat):
        out = []
        t0 = time.perf_counter()
        for va in va_list:
            try:
                out.append(follow(prog, pgd, va))
            except drgn.FaultError:
                out.append(None)
        times.append(time.perf_counter() - t0)
        theirs_pa = out
    theirs = statistics.median(times)
    mapped = batch.mapped()
    ours_pa = [int(p) if m else None for p, m in zip(batch.pa.tolist(), mapped, strict=True)]
    bad = [i for i, (a, b) in enumerate(zip(ours_pa, theirs_pa, strict=True)) if a != b]
    note(f"{len(vas)} VAs, {int(mapped.sum())} mapped; ptlab and drgn differ on {len(bad)}")
    for i in bad[:5]:
        note(f"  VA {va_list[i]:#x}: ptlab {ours_pa[i]} drgn {theirs_pa[i]} "
             f"({batch.faults[batch.fault[i]]})")
    figure("translate_vas_per_s[ptlab]", len(vas) / ours, "VAs/s")
    figure("translate_vas_per_s[drgn]", len(vas) / theirs, "VAs/s")
    figure("translate_vs_drgn_ratio", theirs / ours, "")
    figure("translate_disagree_drgn", len(bad), "VAs")


def bench_growth(tmp: Path, repeat: int) -> None:
    from ptlab.dump.synthetic import linear_map_image

    secs: dict[int, float] = {}
    for gib in (1, 64):
        path = tmp / f"linear-{gib}G.raw"
        t0 = time.perf_counter()
        img = linear_map_image(path, gib << 30)
        note(f"{gib} GiB arm64 4K linear-map image built in {time.perf_counter() - t0:.1f} s")
        argv = [*PTLAB, *img.cli_args(), "walk"]
        lines = subprocess.run(argv, capture_output=True, text=True, check=True,
                               env=CHILD_ENV).stdout
        want = f"{img.linear:#018x}-{img.linear + img.ram:#018x}"
        if not lines.startswith(want) or "# 1 runs" not in lines or " 0 anomalies" not in lines:
            raise SystemExit(f"the {gib} GiB walk is not the one linear-map run:\n{lines}")
        runs = [run_child(argv) for _ in range(repeat)]
        secs[gib] = statistics.median(r[0] for r in runs)
        figure(f"walk_{gib}GiB_4K_s", secs[gib], "s")
        figure(f"walk_{gib}GiB_4K_peak_mib", max(r[1] for r in runs), "MiB")
        path.unlink()
    figure("walk_growth_64_vs_1", secs[64] / secs[1], "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vas", type=int, default=200_000, help="VAs to translate")
    ap.add_argument("--dump", type=Path, help="use this ELF dump (with VMCOREINFO)")
    ap.add_argument("--no-growth", action="store_true", help="skip the 64 GiB growth figures")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.vas < 1:
        ap.error("--repeat and --vas must be positive")
    note(f"host load {Path('/proc/loadavg').read_text().split()[0]}")
    tmp = Path(tempfile.mkdtemp(prefix="ptlab-bench-"))
    child_env(tmp)
    try:
        dump = args.dump or make_dump(tmp)
        bench_translate(dump, args.vas, args.repeat)
        time_cli("walk_dump", [*PTLAB, "--dump", str(dump), "walk"], args.repeat)
        time_cli("ptdump_dump", [*PTLAB, "--dump", str(dump), "ptdump"], args.repeat)
        time_cli("search_1GiB", [*PTLAB, "--dump", str(dump), "search", "--string",
                                 "Linux version "], args.repeat)
        if not args.no_growth:
            bench_growth(tmp, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note(f"bench process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB")
    return 0


if __name__ == "__main__":
    benchlib.run(main, "bench/dump.py")
