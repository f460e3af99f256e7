#!/usr/bin/env python3
"""Guest benchmark: one ``name: value unit`` line per figure on stdout.

    .venv/bin/python bench/guest.py [--profiles x86_64,arm64,...] [--repeat N]

Figures (targets in brackets):

* ``boot_to_agent_s[<profile>]``: QEMU start to the first successful ``ptagent info`` reply
  (Guest.boot_seconds; the image is built/checked before the clock starts) [x86_64 <= 3,
  arm64 <= 2].
* ``walk_kernel_s[<profile>]``: full walk of the kernel half of the stopped guest into runs
  (ptlab.walk.Walker over the shared RAM; median of ``--repeat``).
* ``info_tlb_s[x86_64]``: QEMU's ``info tlb`` on the same stopped guest (the HMP round trip,
  median), and ``walk_vs_info_tlb_ratio`` = walk_kernel_s[x86_64] / info_tlb_s[x86_64]
  [<= 0.1].
* ``kernel_to_init_s[<profile>]``: QEMU start until the kernel runs /init: the wall clock
  (Guest.timings["init"]) at which the console shows /init's first line (``ptlab-init:
  running /init``, guest/ptinit.c; the harness polls the serial log every 10 ms), so firmware
  and the kernel's own boot; ``boot_overhead_ratio[<profile>]`` = (boot_to_agent_s -
  kernel_to_init_s) / kernel_to_init_s (/init, SSH and the first reply) [<= 0.25].
  ``kernel_uptime_at_init_s[<profile>]``: the kernel's own uptime at /init (the ``init=``
  stamp of the console's ``ptlab-init: uptime`` line): what the wall clock adds before it is
  QEMU start to kernel entry plus early boot before the kernel's clock runs.
  ``init_to_ready_s``, ``ready_to_ssh_s``, ``ssh_to_agent_s`` split the overhead (wall clock);
  ``init_uptime_<step>_s`` are /init's own steps from the uptime stamps.
* ``reset_s[<profile>]``: Guest.reset() to a checkpoint taken after boot, until the agent
  answers ``ping`` again (median of ``--repeat``; an SSH command dirties the guest before
  each; the timing starts at reset()); ``checkpoint_s[<profile>]`` the checkpoint itself,
  ``reset_ram_by_harness[<profile>]`` 1 when QEMU saved only devices and CPUs;
  ``reset_vs_boot_ratio[<profile>]`` = reset_s / boot_to_agent_s [<= 0.2];
  ``la57_vs_x86_64_boot_ratio`` = boot_to_agent_s of x86_64-la57 / x86_64 [<= 1.3] (when
  both profiles run).
* ``read_GiBps[shared]``: PhysMemory.read (2 MiB reads, bytes copied out) over all guest
  RAM through the shared mapping, median of 3 passes (``[shared-first]``: the first pass, which
  faults the mapping in; ``[shared-view]``: numpy over the zero-copy view);
  ``read_GiBps[pmemsave]``: PhysMemory.read through the pmemsave backend (64 MiB chunks,
  first 256 MiB).

Diagnostics (targets, progress) go to stderr.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import benchlib  # bench/benchlib.py: the script's own folder is on sys.path
import numpy as np

ALL_PROFILES = ("x86_64", "x86_64-la57", "x86_64-pti", "arm64", "arm64-kpti")
INFO_TLB_PROFILE = "x86_64"  # the profile whose walk is timed against HMP info tlb
CHUNK = 64 << 20  # pmemsave chunk
READ_CHUNK = 2 << 20  # PhysMemory.read size over the shared mapping
PMEMSAVE_BYTES = 256 << 20
TARGETS = {
    "boot_to_agent_s[x86_64]": ("<=", 3.0),
    "boot_to_agent_s[arm64]": ("<=", 2.0),
    "walk_vs_info_tlb_ratio": ("<=", 0.1),
    "la57_vs_x86_64_boot_ratio": ("<=", 1.3),
    **{f"{name}[{p}]": ("<=", limit) for p in ALL_PROFILES
       for name, limit in (("boot_overhead_ratio", 0.25), ("reset_vs_boot_ratio", 0.2))},
}
INIT_STAMP = re.compile(r"ptlab-init: uptime init=[^\n]*")
UPTIME_STEP = re.compile(r"([\w.]+)=([0-9.]+)")
boot_s: dict[str, float] = {}  # boot_to_agent_s of the profiles benchmarked so far


def figure(name: str, value: float, unit: str) -> None:
    benchlib.figure(name, value, unit, TARGETS)


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_all(mem, ranges: list[tuple[int, int]], limit: int | None = None,
             chunk: int = CHUNK) -> int:
    """Read ``ranges`` (up to ``limit`` bytes) with PhysMemory.read in ``chunk`` pieces."""
    total = 0
    for start, end in ranges:
        pa = start
        while pa < end and (limit is None or total < limit):
            n = min(chunk, end - pa)
            total += len(mem.read(pa, n))
            pa += n
    return total


def boot_split(profile: str, timings: dict[str, float], boot: float, console: str) -> None:
    """kernel_to_init_s, boot_overhead_ratio and the phases after /init of one boot."""
    to_init = timings.get("init")
    if to_init is None:
        print(f"# {profile}: no /init line seen on the console", file=sys.stderr)
    else:
        figure(f"kernel_to_init_s[{profile}]", to_init, "s")
        figure(f"boot_overhead_ratio[{profile}]", (boot - to_init) / to_init, "")
        figure(f"init_to_ready_s[{profile}]", timings["ready"] - to_init, "s")
    figure(f"ready_to_ssh_s[{profile}]", timings["ssh"] - timings["ready"], "s")
    figure(f"ssh_to_agent_s[{profile}]", boot - timings["ssh"], "s")
    line = INIT_STAMP.search(console)
    if line is None:
        print(f"# {profile}: no 'ptlab-init: uptime init=' on the console", file=sys.stderr)
        return
    stamps = dict(UPTIME_STEP.findall(line.group(0)))
    figure(f"kernel_uptime_at_init_s[{profile}]", float(stamps["init"]), "s")
    prev = float(stamps["init"])
    for step in ("modules", "net", "keys", "agent", "sshd"):
        if step in stamps:
            figure(f"init_uptime_{step}_s[{profile}]", float(stamps[step]) - prev, "s")
            prev = float(stamps[step])


def bench_profile(profile: str, repeat: int, do_io: bool) -> None:
    from ptharness.guest import Guest
    from ptharness.image import ensure_image
    from ptharness.oracle import info_tlb
    from ptharness.profiles import get_profile
    from ptharness.scenarios import walk_kernel

    arch = get_profile(profile).arch
    image = ensure_image(arch, progress=lambda *a: print(*a, file=sys.stderr))
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"# booting {profile} (host load {load})", file=sys.stderr)
    with Guest(profile, image=image) as g:
        figure(f"boot_to_agent_s[{profile}]", g.boot_seconds, "s")
        boot_s[profile] = g.boot_seconds
        boot_split(profile, g.timings, g.boot_seconds, g.console_tail(200))
        # checkpoint and reset first: the RAM reads below fault in every page of the shared
        # RAM file (tmpfs allocates on a read fault), and a checkpoint after them holds all
        # of it (measured: checkpoint 2.1 s, reset 0.86 s instead of 0.45 s on x86_64)
        t0 = time.perf_counter()
        g.checkpoint()
        figure(f"checkpoint_s[{profile}]", time.perf_counter() - t0, "s")
        # 1: devices by savevm, RAM by the harness; 0: RAM saved by QEMU (a virtqueue in RAM
        # that a ROM blob covers, see ptharness.ramsnap)
        figure(f"reset_ram_by_harness[{profile}]", int(g.checkpoint_fast), "")

        def reset() -> float:
            g.ssh("echo dirty > /tmp/ptlab-bench-reset")  # something for the reset to undo
            t = time.perf_counter()
            g.reset()
            g.agent("ping")
            return time.perf_counter() - t

        reset_s = statistics.median(reset() for _ in range(repeat))
        figure(f"reset_s[{profile}]", reset_s, "s")
        figure(f"reset_vs_boot_ratio[{profile}]", reset_s / g.boot_seconds, "")
        root = g.kernel_root()
        fmt = g.kernel_format()
        g.stop()
        walks = [walk_kernel(fmt, g.memory, root) for _ in range(repeat)]
        walk_s = statistics.median(w.seconds for w in walks)
        print(f"# {profile}: {len(walks[0].runs)} runs, {walks[0].tables} tables",
              file=sys.stderr)
        figure(f"walk_kernel_s[{profile}]", walk_s, "s")
        if profile == INFO_TLB_PROFILE:
            tlb_s = median_time(lambda: info_tlb(g.hmp), repeat)
            raw_s = median_time(lambda: g.hmp("info tlb"), repeat)
            figure("info_tlb_s[x86_64]", raw_s, "s")
            figure("info_tlb_parsed_s[x86_64]", tlb_s, "s")
            figure("walk_vs_info_tlb_ratio", walk_s / raw_s, "")
        if do_io:
            mem = g.memory
            ranges = mem.ranges()
            rates = []
            for _ in range(3):
                t0 = time.perf_counter()
                n = read_all(mem, ranges, chunk=READ_CHUNK)
                rates.append(n / (time.perf_counter() - t0) / (1 << 30))
            figure("read_GiBps[shared-first]", rates[0], "GiB/s")
            figure("read_GiBps[shared]", statistics.median(rates), "GiB/s")
            t0 = time.perf_counter()
            n = sum(int(np.frombuffer(mem.view(s, e - s), dtype="<u8").sum() >= 0) * (e - s)
                    for s, e in ranges)
            figure("read_GiBps[shared-view]", n / (time.perf_counter() - t0) / (1 << 30),
                   "GiB/s")
            pmem = g.pmem(chunk=CHUNK)
            try:
                t0 = time.perf_counter()
                n = read_all(pmem, ranges, PMEMSAVE_BYTES)
                secs = time.perf_counter() - t0
            finally:
                pmem.close()
            figure("read_GiBps[pmemsave]", n / secs / (1 << 30), "GiB/s")
            dump = g.rundir / "bench-pmemsave.bin"
            try:
                t0 = time.perf_counter()
                g.qmp("pmemsave", val=ranges[0][0], size=CHUNK, filename=str(dump))
                secs = time.perf_counter() - t0
            finally:
                dump.unlink(missing_ok=True)
            figure("pmemsave_raw_GiBps", CHUNK / secs / (1 << 30), "GiB/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default=",".join(ALL_PROFILES),
                    help="comma-separated guest profiles (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions for medians")
    args = ap.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in profiles if p not in ALL_PROFILES]
    if unknown or not profiles:
        ap.error(f"unknown profile(s) {unknown}; known: {', '.join(ALL_PROFILES)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    io_done = False
    for p in profiles:
        bench_profile(p, args.repeat, do_io=not io_done)
        io_done = True
    if "x86_64" in boot_s and "x86_64-la57" in boot_s:
        figure("la57_vs_x86_64_boot_ratio", boot_s["x86_64-la57"] / boot_s["x86_64"], "")
    return 0


if __name__ == "__main__":
    benchlib.run(main, "bench/guest.py")
