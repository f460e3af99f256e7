#!/usr/bin/env python3
"""Kernel page-table users, predicted by the model and compared with real guests.

    .venv/bin/python bench/kernel.py [--profiles x86_64,arm64,...]

One ``name: value unit`` line per figure on stdout (harness/ptharness/kernel_scenarios.py
does the work; tests/qemu/test_kernel_scenarios.py asserts the same results):

* ``differ[SCENARIO/PROFILE]: M pages of N`` for SCENARIO in ``secretmem`` (N = 1, 16 and 512
  pages the kernel picks, the faults and the release, summed), ``batched_unmap`` (the same
  pages removed in one batch, against the real tables after the faults), ``kpti`` (x86 user
  PGD and kernel PGD; arm64 tramp_pg_dir), ``direct_map`` (boot direct map from the memory
  map; its M are later set_memory_* changes of aliases, see the README's findings), and on
  profile x86_64 ``asi`` (M: pages the model's nonsensitive root maps that the real kernel root
  does not, or not the same way) and ``asi_cpu`` (M: probed pages where QEMU's MMU, with
  the nonsensitive root in CR3, disagrees with the model); from ``rmmod`` then ``insmod``
  of qemu_fw_cfg (harness/ptharness/module_scenarios.py), ``vmalloc`` (the modules area:
  the core's vmalloc mapping, its guard page, the init layout's and the core's unmap) and
  ``set_memory`` (the core's protections and the whole direct/linear map, where the core's
  and the init layout's aliases change: x86 ``cpa_process_alias``, arm64
  ``change_memory_common``, ``vm_remove_mappings``).
* ``differ[secretmem_scattered/PROFILE]`` (x86): one-page secrets placed in separate 2M
  regions by a 511-page spacer after each, faulted, spacers released, secrets released,
  every step summed; ``regions[secretmem_scattered/PROFILE]``: the 2M regions they hit.
* ``flushes[batched_unmap/PROFILE]``: the flushes of the 512-page batch [== 1] (the
  per-page path: ``flushes[secretmem_512/PROFILE]`` [== 512]).
* ``model_ms[batched_unmap_512/PROFILE]``: model time of that batch [<= 10].
* ``scenario_s[secretmem_512/PROFILE]``: stop, walk, model, compare and the agent's work
  for the 512-page scenario and its release.
* ``differ[hotplug/PROFILE]`` and the hotplug figures of bench/hotplug.py (a second guest per
  profile, booted with hotplug slots).

Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import benchlib  # bench/benchlib.py: the script's own folder is on sys.path
import hotplug  # bench/hotplug.py: the hotplug scenario's figures

ALL_PROFILES = ("x86_64", "x86_64-la57", "x86_64-pti", "arm64", "arm64-kpti")
SIZES = (1, 16, 512)
ASI_PROFILES = ("x86_64",)  # where asi / asi_cpu are verified (tests/qemu); the CR3 load is x86's
MODULE = "qemu_fw_cfg"  # loaded by /init, no dependents
SCATTERED_ARCHES = {"x86_64"}  # arm64's linear map is page-granular: nothing to split


def figure(name: str, value: float, unit: str) -> None:
    benchlib.figure(name, value, unit)


def differ(scenario: str, profile: str, outcomes: list) -> None:
    m = sum(o.comparison.differ for o in outcomes)
    n = sum(o.comparison.pages for o in outcomes)
    bad = [o for o in outcomes if o.comparison.entry_differences]
    print(f"differ[{scenario}/{profile}]: {m} pages of {n}", flush=True)
    for o in outcomes:
        if not o.comparison.equal:
            print(o.comparison.summary(), file=sys.stderr)
    if bad:
        print(f"# {scenario}/{profile}: raw entries differ in {len(bad)} comparisons",
              file=sys.stderr)


def bench_profile(profile: str) -> None:
    from ptharness import kernel_scenarios as ks
    from ptharness.guest import Guest

    with Guest(profile) as g:  # boots; closed on exit
        t = ks.Target.of(g, random.Random(f"bench/kernel.py:{profile}"))
        faults, releases, batched = [], [], []
        for n in SIZES:
            t0 = time.perf_counter()
            sm = ks.secretmem(t, n)
            rel = ks.secretmem_release(t, sm)
            secs = time.perf_counter() - t0
            faults.append(sm.per_page)
            releases.append(rel)
            batched.append(sm.batched)
        differ("secretmem", profile, faults + releases)
        differ("batched_unmap", profile, batched)
        figure(f"flushes[batched_unmap/{profile}]", batched[-1].flushes, "")
        figure(f"flushes[secretmem_512/{profile}]", faults[-1].flushes, "")
        figure(f"model_ms[batched_unmap_512/{profile}]", batched[-1].model_seconds * 1e3, "ms")
        figure(f"scenario_s[secretmem_512/{profile}]", secs, "s")
        if t.fmt.arch in SCATTERED_ARCHES:
            sc = ks.secretmem_scattered(t)
            differ("secretmem_scattered", profile,
                   [sc.fault, sc.batched, sc.spacers_released, sc.released])
            figure(f"regions[secretmem_scattered/{profile}]", len({v >> 21 for v in sc.vas}),
                   "")
        if g.profile.kpti:
            differ("kpti", profile, ks.kpti(t))
        if profile in ASI_PROFILES:
            from ptharness import asi_scenarios

            a = asi_scenarios.asi(t)
            differ("asi", profile, [a])
            figure(f"tables[asi/{profile}]", a.extra["asi_tables"], "pages")
            differ("asi_cpu", profile, [asi_scenarios.asi_cpu(t)])
        from ptharness import module_scenarios as ms

        path = ms.ko_path(t, MODULE)
        t0 = time.perf_counter()
        mods = [ms.rmmod(t, MODULE), ms.insmod(t, MODULE, path)]
        secs = time.perf_counter() - t0
        differ("vmalloc", profile, mods)
        differ("set_memory", profile, [o.extra["set_memory"] for o in mods])
        figure(f"scenario_s[modules/{profile}]", secs, "s")
        dm = ks.direct_map_boot(t)
        differ("direct_map", profile, [dm])
        print(f"# direct_map/{profile}: {sum(d.pages for d in dm.extra['later_cpa'])} pages "
              f"are later set_memory changes, {len(dm.extra['unexplained'])} runs unexplained",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default=",".join(ALL_PROFILES),
                    help="comma-separated guest profiles (default: all)")
    args = ap.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in profiles if p not in ALL_PROFILES]
    if unknown or not profiles:
        ap.error(f"unknown profile(s) {unknown}; known: {', '.join(ALL_PROFILES)}")
    for p in profiles:
        bench_profile(p)
        hotplug.bench_profile(p)
    return 0


if __name__ == "__main__":
    benchlib.run(main, "bench/kernel.py")
