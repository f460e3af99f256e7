"""`make stress`: a testbed that cannot leak, checked by killing it at random moments.

``python -m ptharness.stress [--cycles 50] [--agent 1000] [--profile x86_64] [--seed N]``

1. Kill cycles (seeded; ``--seed`` / ``PTLAB_SEED`` replays them): SIGKILL of QEMU during
   boot, during a walk, during SSH (the owner must report a GuestError carrying the console's
   last lines); SIGKILL of the owner process (``ptharness.stress_child``) or of the pytest-xdist
   worker that owns the guest; SIGINT to the process group of a running ``make test-qemu``
   (what Ctrl-C does). After each: no QEMU process, run directory or listening socket left.
2. Malformed agent commands (:mod:`ptharness.agent_fuzz`): each must get a JSON error reply,
   and the daemon (same pid) must still answer ``ping``.
3. Failure detection bounds: kernel panic, vCPUs stopped (QMP ``stop``), wedged SSH (the
   guest's dropbear session SIGSTOPped), wedged agent daemon (SIGSTOPped).
4. Network surface: while a guest runs, every listening socket of the harness's processes is
   on 127.0.0.1 or a unix socket in the 0700 run directory; SSH refuses password logins.

Every guest's run directory lives under one private base directory, so the final inventory
(:func:`ptharness.leaks.leftovers`) counts this run's leftovers only. The last three lines are
the figures: ``kill_cycles_clean: N of C``, ``agent_errors_clean: N of A``, ``leftovers: K``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from . import agent_fuzz, leaks
from .errors import GuestError
from .guest import OWNER_FILE, Guest, run_base, sweep_stale_rundirs
from .profiles import PROFILES

REPO = Path(__file__).resolve().parents[2]
KINDS = ("qemu@boot", "qemu@walk", "qemu@ssh", "owner", "worker", "sigint")
CHILD_S = 40  # how long a stress_child keeps busy (it is killed long before)
EXIT_S = 60  # an owner must be gone this long after its QEMU was killed / its Ctrl-C
GONE_S = 3.0  # leftovers of a SIGKILLed owner must vanish within this (PDEATHSIG, reaper)
PANIC_BOUND_S = 5.0
QEMU_DEATH_BOUND_S = 2.0
COMMAND_TIMEOUT_S = 3.0  # the harness's timeout for the hang/wedge probes
WEDGE_BOUND_S = COMMAND_TIMEOUT_S + 2.0
BATCH = 50
STALLED = 4  # clients that never complete their request, during the agent run
CONSOLE_MARK = "--- console tail ---\n"
TARGET_FILE = "tests/qemu/stress_target.py"  # the guest owner the Ctrl-C cycles interrupt


@dataclass
class Cycle:
    n: int
    kind: str
    at_s: float  # when the kill came, seconds after the owner started
    clean: bool = True
    notes: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.clean = False
        self.notes.append(why)


# ----------------------------------------------------------------------------- helpers
def _wait(pred: Callable[[], Any], timeout: float, step: float = 0.02) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= end:
            return v
        time.sleep(step)


def _qemu_under(pid: int) -> int | None:
    for p in leaks.descendants(pid):
        args = leaks.cmdline(p)
        if args and os.path.basename(args[0]).startswith("qemu-system"):
            return p
    return None


def _rundir_of(qemu: int) -> Path | None:
    for a in leaks.cmdline(qemu):
        for part in a.split(","):
            if part.startswith("path=") and part.endswith("/serial.log"):
                return Path(part[5:]).parent
    return None


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""


def console_reported(message: str, console: str) -> str | None:
    """None if ``message`` (a GuestError's text) carries the last lines of ``console`` (the
    serial log as it was when QEMU died), else what is missing."""
    if CONSOLE_MARK not in message:
        return "no console tail in the error"
    tail = message.split(CONSOLE_MARK, 1)[1].split("\n--- QEMU stderr ---")[0]
    want = [ln.strip() for ln in console.splitlines() if ln.strip()][-3:]
    missing = [ln for ln in want if ln not in tail]
    return f"console lines missing from the error: {missing}" if missing else None


class Child:
    """A ``ptharness.stress_child`` and its event lines."""

    def __init__(self, profile: str, activity: str, errlog: Path, thread: bool = False) -> None:
        self.t0 = time.monotonic()
        with open(errlog, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ptharness.stress_child", profile, activity,
                 str(CHILD_S), *(["thread"] if thread else [])], stdout=subprocess.PIPE,
                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while True:
            for e in self.seen:
                if e.get("event") == name:
                    return e
            left = end - time.monotonic()
            if left <= 0:
                return None
            try:
                self.seen.append(self.events.get(timeout=min(left, 0.1)))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    return None

    def finish(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        time.sleep(0.05)
        while not self.events.empty():
            self.seen.append(self.events.get())
        return rc


# ----------------------------------------------------------------------------- kill cycles
def _check_clean(c: Cycle, base: Path, timeout: float = GONE_S, step: float = 0.05) -> bool:
    """Fail ``c`` unless nothing of ``base``'s runs is left within ``timeout`` seconds (polled
    every ``step``); whether it was clean."""
    if _wait(lambda: leaks.leftovers(base).total == 0, timeout, step):
        return True
    c.fail(f"left after {timeout:g} s: {leaks.leftovers(base)}")
    return False


def cycle_qemu(c: Cycle, rng: random.Random, profile: str, base: Path) -> None:
    """SIGKILL QEMU while its owner boots, walks or runs SSH commands."""
    activity = {"qemu@boot": "idle", "qemu@walk": "walk", "qemu@ssh": "ssh"}[c.kind]
    child = Child(profile, activity, base / f"child-{c.n}.err")
    try:
        qemu = _wait(lambda: _qemu_under(child.proc.pid), 60)
        if not qemu:
            c.fail("QEMU never started")
            return
        rundir = _wait(lambda: _rundir_of(qemu), 5)
        if c.kind == "qemu@boot":
            if not _wait(lambda: _read(rundir / "serial.log") if rundir else "", 30):
                c.fail("no console output within 30 s")
            time.sleep(rng.uniform(0, 1.5))
        else:
            if child.wait_event(activity, 90) is None:
                c.fail(f"the owner never reached {activity}")
                return
            time.sleep(rng.uniform(0.05, 1.5))
        while not child.events.empty():
            child.seen.append(child.events.get())
        booted = any(e.get("event") == "ready" for e in child.seen)
        c.at_s = time.monotonic() - child.t0
        leaks.kill_quietly(qemu)
        console = _read(rundir / "serial.log") if rundir else ""
        if c.kind == "qemu@boot" and booted:
            c.notes.append("(the agent had answered already)")
        rc = child.finish(EXIT_S)
        if rc is None:
            c.fail(f"the owner did not exit within {EXIT_S} s of QEMU's death")
            return
        err = next((e for e in child.seen if e.get("event") == "error"), None)
        if err is None:
            c.fail(f"no GuestError reported (exit {rc}, events {child.seen})")
            return
        msg = err["message"]
        if "QEMU exited" not in msg and "QEMU is gone" not in msg:
            c.fail(f"error does not name QEMU's death: {msg.splitlines()[0]}")
        if console and (why := console_reported(msg, console)):
            c.fail(why)
        elif not console:
            c.notes.append("(console still empty at the kill)")
        _check_clean(c, base)
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def cycle_owner(c: Cycle, rng: random.Random, profile: str, base: Path) -> None:
    """SIGKILL the process that owns the guest: during boot or while it walks / runs SSH;
    the guest owned by the main thread (PDEATHSIG and the reaper) or by another (the reaper
    alone)."""
    activity = rng.choice(("idle", "walk", "ssh"))
    thread = rng.random() < 0.5
    child = Child(profile, activity, base / f"child-{c.n}.err", thread)
    c.notes.append("thread-owned" if thread else "main-thread-owned")
    try:
        qemu = _wait(lambda: _qemu_under(child.proc.pid), 60)
        if not qemu:
            c.fail("QEMU never started")
            return
        if rng.random() < 0.4:
            time.sleep(rng.uniform(0, 2.0))
            c.notes.append("during boot" if not child.events.qsize() > 1 else "after boot")
        else:
            child.wait_event(activity, 90)
            time.sleep(rng.uniform(0.05, 1.5))
            c.notes.append(f"during {activity}")
        c.at_s = time.monotonic() - child.t0
        child.proc.kill()
        child.proc.wait()
        t = time.monotonic()
        if _check_clean(c, base, step=0.02):
            c.notes.append(f"all gone in {time.monotonic() - t:.2f} s")
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal's foreground job gets it (a driver started in the
    background by a shell inherits it ignored, and so would make, pytest and its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _make_test_qemu(profile: str, base: Path, n: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PTLAB_STRESS_TARGET="1", PTLAB_RUNDIR=str(base))
    with open(base / f"make-{n}.log", "wb") as log:
        return subprocess.Popen(
            ["make", "-s", "test-qemu", f"ARCH={profile.split('-')[0]}", f"PROFILE={profile}",
             "JOBS=2", f"ARTIFACTS={base}/artifacts",
             f"QEMU_TESTS={TARGET_FILE}",
             "PYTEST_ARGS=-p no:cacheprovider --max-worker-restart=0"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the "terminal" we Ctrl-C
            preexec_fn=_default_sigint)


def cycle_make(c: Cycle, rng: random.Random, profile: str, base: Path) -> None:
    """Ctrl-C (SIGINT to the process group) of a running `make test-qemu`, or SIGKILL of the
    pytest-xdist worker that owns its guest."""
    make = _make_test_qemu(profile, base, c.n)
    t0 = time.monotonic()
    try:
        if c.kind == "sigint":
            qemu = None
            time.sleep(rng.uniform(1.0, 20.0))
            qemu = _wait(lambda: leaks.qemu_processes(f"{base}/"), 0.01)
            c.notes.append("with a guest running" if qemu else "no guest yet")
            c.at_s = time.monotonic() - t0
            os.killpg(make.pid, signal.SIGINT)
        else:
            qemus = _wait(lambda: leaks.qemu_processes(f"{base}/"), 90)
            if not qemus:
                c.fail(f"no guest started: {_read(base / f'make-{c.n}.log')[-400:]}")
                return
            time.sleep(rng.uniform(0, 2.0))
            worker = leaks.parent(qemus[0])
            c.at_s = time.monotonic() - t0
            leaks.kill_quietly(worker)
            c.notes.append(f"worker {worker}")
        try:
            rc = make.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            c.fail(f"make did not exit within {EXIT_S} s")
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
            _check_clean(c, base)
            return
        c.notes.append(f"make exit {rc}")
        if rc == 0:
            c.fail("make test-qemu succeeded although interrupted")
        _check_clean(c, base)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()


CYCLES: dict[str, Callable[[Cycle, random.Random, str, Path], None]] = {
    "qemu@boot": cycle_qemu, "qemu@walk": cycle_qemu, "qemu@ssh": cycle_qemu,
    "owner": cycle_owner, "worker": cycle_make, "sigint": cycle_make,
}


def kill_cycles(n: int, rng: random.Random, profile: str, base: Path,
                kinds: tuple[str, ...] = KINDS, log: Callable[[str], None] = print) -> list[Cycle]:
    out = []
    for i in range(1, n + 1):
        kind = kinds[(i - 1) % len(kinds)] if i <= len(kinds) else rng.choice(kinds)
        c = Cycle(i, kind, 0.0)
        try:
            CYCLES[kind](c, rng, profile, base)
        except Exception as e:  # noqa: BLE001 - a broken cycle is a finding, not a crash
            c.fail(f"{type(e).__name__}: {e}")
        if c.clean:
            _check_clean(c, base, 0.0)
        log(f"cycle {i}/{n}: {kind} at {c.at_s:.2f} s: {'clean' if c.clean else 'NOT CLEAN'} "
            f"{' '.join(c.notes)}")
        for f in list(base.glob("child-*.err")) + list(base.glob("make-*.log")):
            if not c.clean and (text := _read(f).strip()):
                log(f"  {f.name}: ..." + "\n  ".join(text.splitlines()[-40:]))
            f.unlink()
        shutil.rmtree(base / "artifacts", ignore_errors=True)
        out.append(c)
    return out


# ----------------------------------------------------------------------------- agent commands
@dataclass
class AgentRun:
    outcomes: list[agent_fuzz.Outcome]
    ping_after: bool
    detail: str

    @property
    def clean(self) -> int:
        return sum(o.clean for o in self.outcomes)


def _huge_pages(g: Guest) -> int:
    """A page count surely above what the guest can populate (MemTotal + 1 page)."""
    rc, out, _ = g.ssh("grep MemTotal /proc/meminfo")
    kib = int(out.split()[1]) if rc == 0 else 0
    pages = kib // 4 + 1
    return pages if 0 < pages <= agent_fuzz.MAX_PAGES else 0


def agent_errors(g: Guest, n: int, rng: random.Random,
                 log: Callable[[str], None] = print) -> AgentRun:
    """``n`` malformed commands (``STALLED`` of them stalled wire clients) against ``g``'s
    agent; then ``ping`` must answer from the same daemon holding the same objects."""
    before = g.agent("ping")
    held = g.agent("canary")["id"]  # a live object for the bad-protection mprotects
    stalled = min(STALLED, n)
    cases = agent_fuzz.malformed(rng, n - stalled, held_id=held, huge_pages=_huge_pages(g))
    g.ssh(agent_fuzz.stall_script(stalled, 6))
    t_stall = time.monotonic()
    outcomes: list[agent_fuzz.Outcome] = []
    for first in range(0, len(cases), BATCH):
        batch = cases[first:first + BATCH]
        script = agent_fuzz.script(batch, first)
        _, out, _ = g.ssh("sh -s", timeout=300, stdin=script.encode("latin-1"))  # no argv limit
        outcomes += agent_fuzz.parse_batch(batch, first, out)
    time.sleep(max(0.0, 6.5 - (time.monotonic() - t_stall)))
    stall = agent_fuzz.stall_cases(stalled)
    _, out, _ = g.ssh(agent_fuzz.collect_stalls(stalled), timeout=30)
    outcomes += agent_fuzz.parse_batch(stall, 0, out)
    g.agent("release", str(held))
    after = g.agent("ping")
    same = after["pid"] == before["pid"] and after["objects"] == before["objects"]
    for o in outcomes:
        if not o.clean:
            args = b" ".join(a[:40] for a in o.case.args)
            log(f"agent: NOT CLEAN {o.case.label} {args!r}: {o.detail}")
    detail = (f"daemon pid {before['pid']} -> {after['pid']}, objects {before['objects']} -> "
              f"{after['objects']}")
    return AgentRun(outcomes, same, detail)


# ----------------------------------------------------------------------------- detection
def _timed(fn: Callable[[], Any]) -> tuple[float, str]:
    """Seconds until ``fn`` raised GuestError, and its message ('' if it did not raise)."""
    t = time.monotonic()
    try:
        fn()
    except GuestError as e:
        return time.monotonic() - t, str(e)
    return time.monotonic() - t, ""


def detection(profile: str, log: Callable[[str], None] = print) -> dict[str, tuple[float, bool]]:
    """Seconds to a GuestError for each failure, and whether it was within its bound and
    carried the console tail."""
    res: dict[str, tuple[float, bool]] = {}

    def record(name: str, dt: float, msg: str, bound: float, must: str) -> None:
        ok = bool(msg) and dt <= bound and CONSOLE_MARK in msg and must in msg
        res[name] = (dt, ok)
        first = msg.splitlines()[0] if msg else "no error"
        log(f"detect {name}: {dt:.2f} s [bound {bound:g}] {'ok' if ok else 'FAILED'}: {first}")

    with Guest(profile) as g:
        g.qmp("stop")
        dt, msg = _timed(lambda: g.agent("ping", timeout=COMMAND_TIMEOUT_S))
        record("vcpu_stopped", dt, msg, WEDGE_BOUND_S, "did not finish")
        g.cont()
        daemon = g.agent("ping")["pid"]
        g.ssh(f"kill -STOP {daemon}")
        dt, msg = _timed(lambda: g.agent("ping", timeout=COMMAND_TIMEOUT_S))
        record("agent_wedged", dt, msg, WEDGE_BOUND_S, "did not finish")
        g.ssh(f"kill -CONT {daemon}")
        if g.agent("ping")["pid"] != daemon:
            res["agent_wedged"] = (res["agent_wedged"][0], False)
        dt, msg = _timed(lambda: g.ssh("kill -STOP $PPID; sleep 60", timeout=COMMAND_TIMEOUT_S))
        record("ssh_wedged", dt, msg, WEDGE_BOUND_S, "did not finish")
    with Guest(profile) as g:
        dt, msg = _timed(lambda: g.ssh("echo c > /proc/sysrq-trigger", timeout=60))
        record("panic", dt, msg, PANIC_BOUND_S, "sysrq triggered crash")
    return res


# ----------------------------------------------------------------------------- network surface
def surface(g: Guest) -> tuple[list[str], list[leaks.Listener]]:
    """(violations, listeners of ``g`` and this process): every listening socket held by this
    process or its descendants must be TCP on 127.0.0.1 or a unix socket inside a 0700 run
    directory of a guest this process runs (``g``'s, or another's, e.g. a test pool's)."""
    mine = leaks.descendants(os.getpid())
    ours = {os.getpid()} | (leaks.descendants(g.pid) if g.pid else set())
    rundir = g.rundir
    bad, checked = [], []
    for s in leaks.listeners():
        if not mine & set(s.pids):
            continue
        if ours & set(s.pids):
            checked.append(s)
        if s.kind == "tcp" and s.address == "127.0.0.1":
            continue
        parent = Path(s.address).parent
        if (s.kind == "unix" and _own_rundir(parent, rundir)
                and (parent.stat().st_mode & 0o777) == 0o700):
            continue
        bad.append(str(s))
    return bad, checked


def _own_rundir(d: Path, rundir: Path) -> bool:
    """``d`` is ``rundir`` or another run directory owned by this process."""
    if d == rundir:
        return True
    try:
        return d.name.startswith("ptlab-") and (d / OWNER_FILE).read_text() == str(os.getpid())
    except OSError:
        return False


def password_refused(port: int) -> list[str]:
    """Problems found trying password logins on the guest's SSH (empty: refused, key only):
    paramiko's "none" and password attempts, then OpenSSH's client."""
    problems = []
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.start_client(timeout=30)
        for attempt in (lambda: t.auth_none("root"), lambda: t.auth_password("root", "root")):
            try:
                attempt()
                problems.append("an authentication without a key succeeded")
            except paramiko.BadAuthenticationType as e:
                if list(e.allowed_types) != ["publickey"]:
                    problems.append(f"server offers {e.allowed_types}")
            except paramiko.AuthenticationException as e:
                problems.append(f"password tried and refused, but was offered: {e}")
    finally:
        t.close()
    if shutil.which("ssh"):
        proc = subprocess.run(
            ["ssh", "-F", "/dev/null", "-p", str(port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "PubkeyAuthentication=no", "-o", "LogLevel=ERROR",
             "-o", "PreferredAuthentications=password,keyboard-interactive",
             "root@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
        if proc.returncode != 255 or "Permission denied (publickey)" not in proc.stderr:
            problems.append(f"ssh without a key: exit {proc.returncode}, {proc.stderr.strip()}")
    return problems


# ----------------------------------------------------------------------------- main
def _private_base() -> Path:
    base = Path(tempfile.mkdtemp(prefix="ptstress-", dir=run_base()))
    os.chmod(base, 0o700)
    return base


def finish_base(base: Path) -> leaks.Leftovers:
    """What the runs under ``base`` left (after GONE_S for PDEATHSIG and the reapers to act);
    the base's own files (logs) are removed, and the base itself when nothing is left."""
    _wait(lambda: leaks.leftovers(base).total == 0, GONE_S, 0.05)
    left = leaks.leftovers(base)
    for f in base.iterdir() if base.exists() else ():
        if not f.name.startswith("ptlab-"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    if left.total == 0:
        shutil.rmtree(base, ignore_errors=True)
    return left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptharness.stress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--agent", type=int, default=1000, help="malformed agent commands")
    ap.add_argument("--profile", default="x86_64", help="a profile (of a comma list, the first)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="kill cycle kinds (comma list)")
    ap.add_argument("--seed", type=int, default=None, help="replay (default: $PTLAB_SEED)")
    ap.add_argument("--no-detect", action="store_true", help="skip the detection bounds")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    args.profile = args.profile.split(",")[0]
    try:
        seed = args.seed if args.seed is not None else int(os.environ.get("PTLAB_SEED") or
                                                           secrets.randbits(63))
    except ValueError:
        ap.error("PTLAB_SEED must be a decimal integer")
    if unknown := [k for k in kinds if k not in KINDS]:
        ap.error(f"unknown kind(s) {unknown}; known: {', '.join(KINDS)}")
    if args.cycles < 0 or args.agent < 0:
        ap.error("--cycles and --agent must be >= 0")
    if args.profile not in PROFILES:
        ap.error(f"unknown profile {args.profile!r}; known: {', '.join(PROFILES)}")
    print(f"stress: seed {seed} (replay: PTLAB_SEED={seed} make stress)", flush=True)
    base = _private_base()
    os.environ["PTLAB_RUNDIR"] = str(base)  # every guest of this run, children included
    log = lambda s: print(s, flush=True)  # noqa: E731
    cycles: list[Cycle] = []
    agent: AgentRun | None = None
    ok = True
    t0 = time.monotonic()
    try:
        cycles = kill_cycles(args.cycles, random.Random(f"{seed}:cycles"), args.profile, base,
                             kinds, log)
        if args.agent:
            with Guest(args.profile) as g:
                bad, checked = surface(g)
                for b in bad:
                    log(f"network: NOT ALLOWED: {b}")
                log(f"network: {len(checked)} listening sockets of the testbed, "
                    f"{len(bad)} outside 127.0.0.1 / the 0700 run directory: "
                    + ", ".join(map(str, checked)))
                assert g.ssh_port is not None
                problems = password_refused(g.ssh_port)
                log("ssh: password logins " + ("refused, publickey only"
                                               if not problems else "; ".join(problems)))
                ok &= not bad and not problems and len(checked) >= 3
                agent = agent_errors(g, args.agent, random.Random(f"{seed}:agent"), log)
                log(f"agent: ping after: {'ok' if agent.ping_after else 'FAILED'} "
                    f"({agent.detail})")
        if not args.no_detect:
            det = detection(args.profile, log)
            ok &= all(v[1] for v in det.values())
    except (GuestError, OSError) as e:
        print(f"stress: error: {e}", flush=True)
        ok = False
    finally:
        left = finish_base(base)
        if left.total:
            print(f"stress: left behind: {left}", flush=True)
            swept = sweep_stale_rundirs(str(base))  # what "the next run" would do
            if swept:
                print(f"stress: the next run would sweep {len(swept)} run directories")
    clean = sum(c.clean for c in cycles)
    a_clean = agent.clean if agent and agent.ping_after else 0
    print(f"stress: {time.monotonic() - t0:.0f} s")
    print(f"kill_cycles_clean: {clean} of {args.cycles}")
    print(f"agent_errors_clean: {a_clean} of {args.agent}")
    print(f"leftovers: {left.total}")
    ok &= clean == args.cycles and a_clean == args.agent and left.total == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
