"""Parts of the stress run without QEMU: the reaper, the /proc inventory, the agent daemon's
wire under malformed and stalled clients (ptagent built for the host), and the fuzzer's
shell quoting (real sh)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
from ptharness import agent_fuzz, leaks, reaper


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_reaper_cleans_up_after_a_sigkilled_owner(tmp_path):
    """An owner process starts a reaper for its run directory and a process naming it, then
    dies by SIGKILL: the reaper kills that process and removes the directory. (The process is
    a Python sleeper that says when it runs: ``Popen`` returns once the exec closed its
    close-on-exec pipe, which the kernel does before the ELF loader sets up the new argv, so
    a /proc scan right after ``Popen`` can see an empty command line.)"""
    rundir = tmp_path / "ptlab-x"
    rundir.mkdir()
    code = (
        "import subprocess, sys, time\n"
        "from pathlib import Path\n"
        "from ptharness import reaper\n"
        f"d = Path({str(rundir)!r})\n"
        "r = reaper.watch(d)\n"
        "p = subprocess.Popen([sys.executable, '-c',\n"
        "                      'import time; print(flush=True); time.sleep(300)',\n"
        "                      str(d) + '/x'],\n"
        "                     stdout=subprocess.PIPE, start_new_session=True)\n"
        "assert p.stdout.readline() == b'\\n', 'the sleeper did not start'\n"
        "print(p.pid, r.proc.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    sleeper, reaper_pid = map(int, owner.stdout.readline().split())
    named = _wait(lambda: leaks.processes_naming(f"{rundir}/"), 10)
    assert named, f"sleeper {sleeper}: argv {leaks.cmdline(sleeper)}, gone {leaks.exiting(sleeper)}"
    assert rundir.exists()
    owner.kill()
    owner.wait()
    assert _wait(lambda: not rundir.exists(), 20), "run directory not removed"
    assert _wait(lambda: leaks.exiting(sleeper) and leaks.exiting(reaper_pid), 20)
    assert leaks.processes_naming(f"{rundir}/") == []


def test_stopped_reaper_does_nothing(tmp_path):
    rundir = tmp_path / "ptlab-y"
    rundir.mkdir()
    r = reaper.watch(rundir)
    reaper.stop(r)
    assert r.proc.returncode is not None and rundir.exists()


def test_listeners_and_leftovers(tmp_path):
    """Sockets this process listens on are found with their address and pid; leftovers()
    counts run directories and unix sockets under a base."""
    base = tmp_path / "base"
    (base / "ptlab-1").mkdir(parents=True)
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        path = base / "ptlab-1" / "s.sock"
        unix.bind(str(path))
        unix.listen()
        found = {(s.kind, s.address, s.port): s for s in leaks.listeners()}
        t = found[("tcp", "127.0.0.1", tcp.getsockname()[1])]
        u = found[("unix", str(path), 0)]
        assert os.getpid() in t.pids and os.getpid() in u.pids
        left = leaks.leftovers(base)
        assert left.total == 2 and left.rundirs == [base / "ptlab-1"]
        assert [s.address for s in left.sockets] == [str(path)]
    path.unlink()
    (base / "ptlab-1").rmdir()
    assert leaks.leftovers(base).total == 0


def test_exiting():
    p = subprocess.Popen(["sleep", "30"])
    assert not leaks.exiting(p.pid)
    p.kill()
    assert _wait(lambda: leaks.exiting(p.pid), 5)  # a zombie counts
    p.wait()
    assert leaks.exiting(p.pid)


# ----------------------------------------------------------------------------- the daemon's wire
@pytest.fixture
def daemon(agent, tmp_path):
    env = dict(os.environ, PTAGENT_SOCK=str(tmp_path / "a.sock"))
    out = subprocess.run([str(agent), "serve", "-d"], env=env, capture_output=True, text=True,
                         timeout=30)
    pid = json.loads(out.stdout)["pid"]
    try:
        yield env
    finally:
        os.kill(pid, signal.SIGKILL)


def _ask(env, request: bytes, *, shut: bool = True, timeout: float = 10) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(env["PTAGENT_SOCK"])
        try:
            s.sendall(request)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the daemon refused early (busy) and closed: its reply is still readable
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    return json.loads(data)


def test_stalled_clients_delay_nobody(agent, daemon):
    """Clients that never complete their request each get ETIMEDOUT after 5 s, `ptagent raw`
    with a stdin that never ends among them; meanwhile the daemon answers others at once."""
    t0 = time.monotonic()
    sleeper = subprocess.Popen(["sleep", "20"], stdout=subprocess.PIPE)
    raw = subprocess.Popen([str(agent), "raw"], stdin=sleeper.stdout, env=daemon,
                           stdout=subprocess.PIPE)
    stalled = []
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon["PTAGENT_SOCK"])
        s.sendall(b"pi")  # half a request, never finished
        stalled.append(s)
    try:
        t = time.monotonic()
        assert _ask(daemon, b"ping\0")["pong"] is True
        assert time.monotonic() - t < 1.0
        for s in stalled:
            s.settimeout(10)
            reply = json.loads(s.recv(4096))
            assert reply["errno"] == 110
        out, _ = raw.communicate(timeout=15)
        assert raw.returncode == 1 and json.loads(out)["errno"] == 110
        assert 4 < time.monotonic() - t0 < 10
    finally:
        for s in stalled:
            s.close()
        sleeper.kill()
        sleeper.wait()
        if raw.poll() is None:
            raw.kill()
            raw.wait()


def test_overlong_request_is_e2big_without_reset(daemon):
    """A request of 64 KiB or more: E2BIG at once, readable although the client was still
    sending (the daemon drains instead of resetting the connection)."""
    reply = _ask(daemon, b"\xff" * 200_000)
    assert reply["errno"] == 7


def test_too_many_clients_is_ebusy(daemon):
    held = []
    try:
        for _ in range(32):
            s = socket.socket(socket.AF_UNIX)
            s.connect(daemon["PTAGENT_SOCK"])
            held.append(s)
        assert _ask(daemon, b"ping\0", timeout=5)["errno"] == 16
    finally:
        for s in held:
            s.close()
    assert _wait(lambda: _ask(daemon, b"ping\0").get("pong") is True, 5)


@pytest.mark.parametrize("request_", [b"", b"info\0", b"ping\0x\0", b"\xff\x00junk",
                                      b"ping\0" * 300])
def test_malformed_requests_are_json_errors(daemon, request_):
    assert _ask(daemon, request_)["errno"] == 22


def test_raw_client(agent, daemon):
    """`ptagent raw` sends stdin unchanged and prints the reply."""
    out = subprocess.run([str(agent), "raw"], input=b"list\0", env=daemon, capture_output=True,
                         timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout) == {"objects": []}
    out = subprocess.run([str(agent), "raw"], input=b"\xff" * 100_000, env=daemon,
                         capture_output=True, timeout=30)
    assert out.returncode == 1 and json.loads(out.stdout)["errno"] == 7


# ----------------------------------------------------------------------------- the fuzzer
def test_shell_words_are_exact(tmp_path):
    """Every generated argument reaches the program byte for byte through sh."""
    rng = random.Random(7)
    words = [b"", b"plain", b"it's", b"a\nb", b"\x01\x7f\xff%s\\", rng.randbytes(300)]
    words = [w.replace(b"\0", b"\x01") for w in words] + [agent_fuzz._junk(rng, 50)]
    for w in words:
        if w.endswith(b"\n"):
            continue
        out = subprocess.run(["sh", "-c", f"printf %s {agent_fuzz._sh_arg(w)}"],
                             capture_output=True, timeout=10)
        assert out.stdout == w


def test_malformed_commands_are_malformed():
    """The generator never names a command that would succeed: no valid page count, no real
    id, no loaded module, no existing memory block."""
    cases = agent_fuzz.malformed(random.Random(1), 2000, held_id=1, huge_pages=250_000)
    assert len(cases) == 2000 and len({c.label for c in cases}) > 20
    for c in cases:
        if c.stdin is None and c.args and c.args[0] in (b"secretmem", b"pin") and len(
                c.args) == 2 and c.errno != agent_fuzz.ENOMEM:
            assert not c.args[1].isdigit() or not 0 < int(c.args[1]) <= agent_fuzz.MAX_PAGES
        if c.args[:1] in ([b"online"], [b"offline"]) and len(c.args) == 2:
            assert not c.args[1].isdigit() or int(c.args[1]) >= 10**6
        if c.args[:1] in ([b"release"],) and len(c.args) == 2 and c.args[1].isdigit():
            assert int(c.args[1]) == 0 or int(c.args[1]) >= 10**6


def test_exec_argv_bench_reports_its_figures_and_refuses_bad_input():
    """bench/exec_argv.py (the README's figure for the argv gap after Popen): three figure
    lines, counts within the runs; a bad --repeat is one usage error."""
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "exec_argv.py"
    out = subprocess.run([sys.executable, str(script), "--repeat", "5"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    m = re.fullmatch(r"argv_missing_after_popen: (\d+) of 5\n"
                     r"argv_visible_after_ms\[median\]: [0-9.e+-]+ ms\n"
                     r"argv_visible_after_ms\[max\]: [0-9.e+-]+ ms\n", out)
    assert m and int(m[1]) <= 5, out
    bad = subprocess.run([sys.executable, str(script), "--repeat", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
