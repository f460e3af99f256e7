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
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import check_walk_resumes, cli, harness_walk, json_runs, ptlab
from conftest import assert_cleaned
from ptharness.guest import Guest

pytestmark = [pytest.mark.qemu, pytest.mark.profile("x86_64")]

PROFILE = "x86_64"
KERNEL_HALF = 0xFFFF_8000_0000_0000  # x86_64 4-level: the kernel half


def test_live_walk(tmp_path: Path) -> None:
    sock = tmp_path / "live.sock"
    mon = ("-chardev", f"socket,id=qmp1,path={sock},server=on,wait=off",
           "-mon", "chardev=qmp1,mode=control")
    qmp = ("--qmp", str(sock))
    with Guest(PROFILE, smp=2, qemu_args=mon) as g:
        pid, rundir = g.pid, g.rundir
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
    assert_cleaned(pid, rundir)  # a guest closed normally leaves nothing behind
