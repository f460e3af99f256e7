"""The testbed cannot leak (reduced form of `make stress`, ``ptharness.stress``): kill cycles,
malformed agent commands, a wedged agent, the network surface. About 20 s on x86_64."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ptharness import leaks, stress
from ptharness.guest import Guest, GuestError

pytestmark = [pytest.mark.qemu, pytest.mark.stress]


@pytest.fixture
def base(monkeypatch):
    """A private base for run directories: what is left there is this test's leftover."""
    d = Path(stress._private_base())
    monkeypatch.setenv("PTLAB_RUNDIR", str(d))
    yield d
    left = stress.finish_base(d)
    assert left.total == 0, f"left behind: {left}"


@pytest.mark.parametrize("profile", ["x86_64"])
@pytest.mark.parametrize("kind", ["qemu@ssh", "owner"])
def test_kill_cycle(profile, kind, base, seeded_rng):
    """SIGKILL of QEMU while its owner runs SSH commands (the owner reports a GuestError
    carrying the console's last lines), or SIGKILL of the owner itself (PDEATHSIG and the
    run directory's reaper clean up within GONE_S): nothing is left."""
    c = stress.Cycle(1, kind, 0.0)
    stress.CYCLES[kind](c, seeded_rng, profile, base)
    assert c.clean, "; ".join(c.notes)
    assert leaks.leftovers(base).total == 0


@pytest.mark.parametrize("profile", ["x86_64"])
def test_malformed_agent_commands_and_surface(profile, base, seeded_rng):
    """100 malformed agent commands (4 of them clients that never complete their request)
    each get a JSON error; the daemon answers ping after; a SIGSTOPped daemon and a SIGSTOPped
    dropbear are each a GuestError within the command's timeout (+2 s); the testbed listens
    on 127.0.0.1 and in its run directory only, and SSH refuses password logins (paramiko and
    OpenSSH's client)."""
    with Guest(profile) as g:
        bad, checked = stress.surface(g)
        assert not bad
        kinds = sorted(s.kind for s in checked)
        assert kinds == ["tcp", "unix", "unix"], checked  # ssh forward, QMP, gdbstub
        assert g.ssh_port in [s.port for s in checked]
        assert stress.password_refused(g.ssh_port) == []
        run = stress.agent_errors(g, 100, seeded_rng, print)
        dirty = [f"{o.case.label}: {o.detail}" for o in run.outcomes if not o.clean]
        assert not dirty and len(run.outcomes) == 100
        assert run.ping_after, run.detail
        assert {o.detail for o in run.outcomes if o.case.label == "stalled client"} == {
            "errno 110"}
        daemon = g.agent("ping")["pid"]
        g.ssh(f"kill -STOP {daemon}")
        t = time.monotonic()
        with pytest.raises(GuestError, match="did not finish") as err:
            g.agent("ping", timeout=1)
        assert time.monotonic() - t < 1 + 2
        assert stress.CONSOLE_MARK in str(err.value)
        g.ssh(f"kill -CONT {daemon}")
        assert g.agent("ping")["pid"] == daemon
        # a wedged SSH: the guest's dropbear process of this connection SIGSTOPped
        t = time.monotonic()
        with pytest.raises(GuestError, match="did not finish") as err:
            g.ssh("kill -STOP $PPID; sleep 60", timeout=1)
        assert time.monotonic() - t < 1 + 2
        assert stress.CONSOLE_MARK in str(err.value)
