#!/usr/bin/env python3
"""How long after ``subprocess.Popen`` returns a child's argv shows in /proc/PID/cmdline
(what the reaper and ``ptharness.leaks`` find processes by): one ``name: value unit`` line
per figure.

    .venv/bin/python bench/exec_argv.py [--repeat N]

* ``argv_missing_after_popen``: of N children (``python -c 'sleep' MARKER``), how many had no
  MARKER in /proc/PID/cmdline when read right after ``Popen`` returned.
* ``argv_visible_after_ms[median]``, ``[max]``: from that first read until the argv shows.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import benchlib

MARKER = "/ptlab-bench-exec-argv/x"


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def one() -> tuple[bool, float]:
    """(argv missing at the first read, seconds until it showed)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", MARKER],
                         start_new_session=True)
    try:
        t = time.perf_counter()
        missing = MARKER.encode() not in cmdline(p.pid)
        end = t + 10
        while MARKER.encode() not in cmdline(p.pid):
            if time.perf_counter() > end:
                raise RuntimeError(f"argv of {p.pid} not visible after 10 s")
        return missing, time.perf_counter() - t
    finally:
        p.kill()
        p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    runs = [one() for _ in range(args.repeat)]
    benchlib.figure("argv_missing_after_popen", sum(m for m, _ in runs), f"of {args.repeat}")
    delays = [d * 1e3 for _, d in runs]
    benchlib.figure("argv_visible_after_ms[median]", statistics.median(delays), "ms")
    benchlib.figure("argv_visible_after_ms[max]", max(delays), "ms")
    return 0


if __name__ == "__main__":
    benchlib.run(main, "bench/exec_argv.py")
