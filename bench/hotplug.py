"""Memory hotplug predicted by the model and compared with real guests (issue 9, item 4).

Part of ``.venv/bin/python bench/kernel.py`` (which calls :func:`bench_profile` for every
profile). One ``name: value unit`` line per figure on stdout (harness/ptharness/hotplug_scenarios.py
does the work; tests/qemu/test_kernel_hotplug.py asserts the same results):

* ``differ[hotplug/PROFILE]: M pages of N``: every step summed (x86: pc-dimm add, online /
  online_kernel / online_movable, offline + remove; arm64: virtio-mem plug, unplug).
* ``tables_freed[hotplug/PROFILE]`` (the model's) and ``tables_freed_real[hotplug/PROFILE]``
  (table frames the walk no longer reaches) on the removal.
* ``scenario_s[hotplug/PROFILE]``: the slowest add / remove step's stop, walk, model and
  compare [<= 1 s]; ``total_s[hotplug/PROFILE]``: every step, the kernel's own work
  (device_add, onlining, offlining, device_del) included.

Diagnostics go to stderr.
"""

from __future__ import annotations

import random
import sys
import time

import benchlib  # bench/benchlib.py: the script's own folder is on sys.path

ALL_PROFILES = ("x86_64", "x86_64-la57", "x86_64-pti", "arm64", "arm64-kpti")


def bench_profile(profile: str) -> None:
    from ptharness import hotplug_scenarios as hs
    from ptharness import kernel_scenarios as ks
    from ptharness.guest import Guest

    with Guest(profile, hotplug=True) as g:
        t = ks.Target.of(g, random.Random(f"bench/hotplug.py:{profile}"))
        t0 = time.perf_counter()
        steps = hs.hotplug(t)
        secs = time.perf_counter() - t0
    m = sum(s.comparison.differ for s in steps)
    n = sum(s.comparison.pages for s in steps)
    print(f"differ[hotplug/{profile}]: {m} pages of {n}", flush=True)
    for s in steps:
        if not s.comparison.equal or s.qemu:
            print(s.comparison.summary(), *s.qemu[:10], sep="\n", file=sys.stderr)
    removal = next(s for s in steps if s.name.endswith(("remove", "unplug")))
    assert removal.cost is not None
    benchlib.figure(f"tables_freed[hotplug/{profile}]", removal.cost.tables_freed, "pages")
    benchlib.figure(f"tables_freed_real[hotplug/{profile}]", removal.real_tables[1], "pages")
    benchlib.figure(f"scenario_s[hotplug/{profile}]", max(s.seconds for s in steps), "s")
    benchlib.figure(f"total_s[hotplug/{profile}]", secs, "s")
