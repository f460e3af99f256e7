"""``ptlab --qmp SOCKET`` on a real guest it did not start: one x86-64 guest booted by the
harness with a second QMP monitor (QEMU's socket chardev serves one client at a time, and
the harness holds the first); ptlab in this process while the guest is stopped (its QMP client
is ptlab's own either way) and in a subprocess where its exit and messages are the point.

* Guest stopped by the harness: ``ptlab --qmp ... walk --json`` gives the same runs as the
  harness's walk over its own mmap of the shared RAM file, reading RAM in place (the harness
  unlinked the ``mem-path`` file: ptlab opens QEMU's descriptor of it, ``/proc/PID/fd/N``) and
  with ``--qmp-copy`` through ``pmemsave``; with ``--root`` (the harness's kernel root) over
  the whole space and with the root inferred from CPU 0's CR3 (HMP ``info registers``) over
  the kernel half (CPU 1's with ``--cpu 1``: two vCPUs). ptlab leaves the guest stopped and
  says nothing.
* Guest running: ptlab stops it (saying so on stderr), walks, resumes it: QMP says it runs and
  the agent answers afterwards.
* The harness's own QMP socket, held by the harness (QEMU never greets a second client):
  one ``ptlab: error:`` line after ``--qmp-timeout``, exit 2.
* Then the same guest's QEMU is SIGKILLed under a blocked SSH command: reported within
  FAIL_FAST_S with the console's tail, and nothing left behind. (A normal close's cleanup is
  checked on every pool guest when the pool closes, tests/qemu/conftest.py.)
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import check_walk_resumes, cli, harness_walk, json_runs, ptlab
from conftest import FAIL_FAST_S, assert_cleaned
from ptharness.guest import Guest, GuestError

pytestmark = [pytest.mark.qemu, pytest.mark.profile("x86_64")]

PROFILE = "x86_64"
KERNEL_HALF = 0xFFFF_8000_0000_0000  # x86_64 4-level: the kernel half


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Guest, Path]]:
    """A two-vCPU guest with a second QMP monitor at the yielded socket (this module's own
    boot; its last test kills it)."""
    sock = tmp_path_factory.mktemp("live") / "live.sock"
    mon = ("-chardev", f"socket,id=qmp1,path={sock},server=on,wait=off",
           "-mon", "chardev=qmp1,mode=control")
    g = Guest(PROFILE, smp=2, qemu_args=mon)
    g.start()
    try:
        yield g, sock
    finally:
        g.close()


def test_live_walk(live: tuple[Guest, Path]) -> None:
    g, sock = live
    qmp = ("--qmp", str(sock))
    root = g.kernel_root()
    g.stop()
    try:
        theirs = harness_walk(g, root, None)
        assert len(theirs) > 100
        for how, extra in (("in place", ()), ("pmemsave", ("--qmp-copy",))):
            code, out = cli(*qmp, *extra, "info", "--json")
            assert code == 0
            notes = " ".join(json.loads(out)["notes"])
            assert ("shared file backend ram0" in notes) == (how == "in place"), notes
            assert ("pmemsave" in notes) == (how == "pmemsave"), notes
            code, out = cli(*qmp, *extra, "walk", "--json", "--root", hex(root))
            assert code == 0 and json_runs(out) == theirs, how
        kernel_half = harness_walk(g, root, KERNEL_HALF)
        code, out = cli(*qmp, "walk", "--json", "--start", hex(KERNEL_HALF))
        assert code == 0 and json_runs(out) == kernel_half
        info = json.loads(cli(*qmp, "info", "--json")[1])
        assert [c["index"] for c in info["cpus"]] == [0, 1]
        assert all(int(c["control"]["cr3"], 16) for c in info["cpus"])
        code, out = cli(*qmp, "--cpu", "1", "walk", "--json", "--start", hex(KERNEL_HALF))
        assert code == 0 and json_runs(out) == kernel_half
        # as a user runs it (its own process): a bad CPU is one error line, exit 2
        bad = ptlab(*qmp, "--cpu", "2", "walk")
        assert bad.returncode == 2 and bad.stderr.startswith("ptlab: error: --cpu 2")
        assert not g.running  # stopped before: ptlab left it so
    finally:
        g.cont()
    check_walk_resumes(g, *qmp, "walk")
    held = ptlab("--qmp", str(g.rundir / "qmp.sock"), "--qmp-timeout", "1", "walk")
    assert held.returncode == 2
    assert [x for x in held.stderr.splitlines() if x] == [
        x for x in held.stderr.splitlines() if x.startswith("ptlab: error: QMP")]
    assert g.running


def test_killed_qemu_is_reported_quickly(live: tuple[Guest, Path]) -> None:
    g, _ = live
    pid, rundir = g.pid, g.rundir
    assert pid is not None
    threading.Timer(0.5, os.kill, (pid, 9)).start()
    t = time.monotonic()
    with pytest.raises(GuestError) as err:
        g.ssh("sleep 60", timeout=120)  # blocked in the guest when QEMU dies
    elapsed = time.monotonic() - t
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.1f} s to notice the dead QEMU"
    assert "QEMU exited" in str(err.value) and "console tail" in str(err.value)
    with pytest.raises(GuestError):
        g.agent("info")  # stays dead, says so at once
    g.close()
    assert_cleaned(pid, rundir)
