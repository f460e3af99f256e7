#!/usr/bin/env python3
"""Where a reset's and a boot's first contact go: one ``name: value unit`` line per figure.

    .venv/bin/python bench/first_contact.py [--profiles x86_64,arm64] [--repeat N]

Figures, per profile (medians of ``--repeat``):

* ``connect_ping_warm_s``: a new SSH session plus ``ptagent ping`` on a guest that has run
  SSH sessions already (its kernel's and dropbear's code translated).
* ``reset_only_s``: Guest.reset() itself (RAM restore, ``loadvm``, ``cont``; the session is
  made by the first command after it).
* ``connect_ping_after_reset_s``: the same session + ping right after a reset (``loadvm``
  dropped every translation); ``banner_after_reset_s``: of that, until dropbear's banner
  arrives (a raw TCP read).
* ``connect_ping_after_reset_idle_s``: the same after 1 s of idling after the reset.
* ``spare_first_reply_after_reset_s``: the first command on an SSH session opened before
  the checkpoint and left idle (no keepalive), right after a reset: such a session survives
  ``loadvm`` (the guest's dropbear child, slirp and paramiko still agree).
* ``vcpu_busy_init_to_agent``: the vCPU thread's CPU time from /init (the console mark) to
  the agent's first reply during a boot, divided by that wall time (/proc/PID/task sampled
  every 10 ms; the busiest QEMU thread).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

import benchlib  # bench/benchlib.py: the script's own folder is on sys.path
from ptharness.guest import Guest
from ptharness.profiles import PROFILES
from ptharness.ssh import Session

HZ = os.sysconf("SC_CLK_TCK")


def figure(name: str, profile: str, value: float, unit: str = "s") -> None:
    benchlib.figure(f"{name}[{profile}]", value, unit)


def connect(g: Guest) -> Session:
    s = Session.connect(g.ssh_port, g._key, g.image.host_key_pub,
                        deadline=time.monotonic() + 30)
    transport = s.client.get_transport()
    if transport is not None:
        transport.set_keepalive(0)  # an idle spare must stay idle
    return s


def connect_ping(g: Guest) -> float:
    t = time.monotonic()
    s = connect(g)
    try:
        rc, _, err = s.run("/bin/ptagent ping", timeout=30)
        assert rc == 0, err
    finally:
        s.close()
    return time.monotonic() - t


def banner_s(g: Guest) -> float:
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", g.ssh_port), timeout=30) as c:
        assert c.recv(64).startswith(b"SSH-")
    return time.monotonic() - t


def thread_cpu(pid: int) -> dict[str, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(f[11]) + int(f[12])) / HZ
    return out


def vcpu_busy(profile: str) -> float:
    """The busiest QEMU thread's CPU time from /init to the agent's reply, per wall second."""
    g = Guest(profile)
    samples: list[tuple[float, dict[str, float]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if g.pid:
                try:
                    samples.append((time.monotonic(), thread_cpu(g.pid)))
                except OSError:
                    pass
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        g.start()
        done.set()
        th.join()
        t_init, t_agent = g._t0 + g.timings["init"], g._t0 + g.timings["agent"]
        a = min(samples, key=lambda s: abs(s[0] - t_init))
        b = min(samples, key=lambda s: abs(s[0] - t_agent))
        used = max(b[1][t] - a[1].get(t, 0.0) for t in b[1])
        return used / (b[0] - a[0])
    finally:
        done.set()
        g.close()


def bench(profile: str, repeat: int) -> None:
    with Guest(profile) as g:
        for _ in range(2):  # warm the SSH path up
            connect_ping(g)
        figure("connect_ping_warm_s", profile,
               statistics.median(connect_ping(g) for _ in range(repeat)))
        spares = [connect(g) for _ in range(repeat)]
        g.checkpoint()
        resets, after, banners, idle, spare = [], [], [], [], []
        for s in spares:
            g.ssh("echo dirty > /tmp/ptlab-bench-dirty")
            t = time.monotonic()
            g.reset()
            resets.append(time.monotonic() - t)
            t = time.monotonic()
            rc, _, err = s.run("/bin/ptagent ping", timeout=30)
            assert rc == 0, err
            spare.append(time.monotonic() - t)
            s.abort()
            g.reset()
            banners.append(banner_s(g))
            g.reset()
            after.append(connect_ping(g))
            g.reset()
            time.sleep(1)
            idle.append(connect_ping(g))
        figure("reset_only_s", profile, statistics.median(resets))
        figure("connect_ping_after_reset_s", profile, statistics.median(after))
        figure("banner_after_reset_s", profile, statistics.median(banners))
        figure("connect_ping_after_reset_idle_s", profile, statistics.median(idle))
        figure("spare_first_reply_after_reset_s", profile, statistics.median(spare))
    figure("vcpu_busy_init_to_agent", profile, vcpu_busy(profile), "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default="x86_64,arm64")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    profiles = args.profiles.split(",")
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown:
        ap.error(f"unknown profile(s) {', '.join(unknown)} (known: {', '.join(PROFILES)})")
    for profile in profiles:
        bench(profile, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
