"""The guest agent (guest/ptagent.c) run on the host: JSON replies, errors, the state-holding
daemon over a private socket. No QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from ptharness.agent_reply import check_reply


def run(agent: Path, *args: str, env: dict | None = None) -> tuple[int, dict]:
    """Exit status and reply; each reply must have PROTOCOL.md's shape for its command."""
    proc = subprocess.run([str(agent), *args], capture_output=True, text=True, timeout=30,
                          env=env)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout       # exactly one JSON object per reply line
    reply = json.loads(lines[0])
    if proc.returncode == 0:
        check_reply(list(args), reply)
    else:
        assert proc.returncode == 1 and sorted(reply) == ["errno", "error"], proc.stdout
    return proc.returncode, reply


@pytest.mark.parametrize("args", [[], ["bogus"], ["online", "x"], ["kread", "1", "0"],
                                  ["insmod"], ["serve", "x"], ["info", "extra"]])
def test_bad_arguments_are_json_errors(agent, args, tmp_path):
    env = dict(os.environ, PTAGENT_SOCK=str(tmp_path / "none.sock"))
    rc, reply = run(agent, *args, env=env)
    assert rc == 1 and reply["errno"] == 22 and reply["error"]


def test_held_command_without_daemon(agent, tmp_path):
    env = dict(os.environ, PTAGENT_SOCK=str(tmp_path / "none.sock"))
    rc, reply = run(agent, "ping", env=env)
    assert rc == 1 and reply["errno"] == 2 and "not reachable" in reply["error"]


def test_info_on_host(agent):
    rc, info = run(agent, "info")
    assert rc == 0
    assert info["uname"]["release"] == os.uname().release
    assert info["page_size"] == os.sysconf("SC_PAGESIZE")
    ram = info["system_ram"]
    assert ram and all(r["start"] < r["end"] for r in ram)
    if os.geteuid() == 0:
        assert info["kallsyms_visible"] and info["kallsyms"]["_stext"] >= 1 << 63


@pytest.fixture()
def daemon(agent, tmp_path):
    env = dict(os.environ, PTAGENT_SOCK=str(tmp_path / "agent.sock"))
    rc, reply = run(agent, "serve", "-d", env=env)
    assert rc == 0 and reply["serving"] == env["PTAGENT_SOCK"]
    pid = reply["pid"]
    try:
        yield env, pid
    finally:
        os.kill(pid, signal.SIGKILL)


def test_daemon_holds_objects(agent, daemon):
    env, pid = daemon
    rc, again = run(agent, "serve", "-d", env=env)
    assert rc == 1 and again["errno"] == 98          # a second daemon does not steal it
    rc, pong = run(agent, "ping", env=env)
    assert rc == 0 and pong["pid"] == pid and pong["objects"] == 0

    rc, m = run(agent, "mmap", "3", "r", env=env)
    assert rc == 0 and m["kind"] == "mmap" and m["pages"] == 3 and m["prot"] == "r--"
    assert len(m["pfns"]) == 3 and m["va"] % 4096 == 0
    rc, c = run(agent, "canary", env=env)
    assert rc == 0 and len(bytes.fromhex(c["pattern"])) == 64
    if os.geteuid() == 0:                            # the pattern really sits at va
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(c["va"])
            assert mem.read(64).hex() == c["pattern"]
    rc, p = run(agent, "mprotect", str(m["id"]), "none", env=env)
    assert rc == 0 and p["prot"] == "---" and p["va"] == m["va"]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert f"{m['va']:x}-{m['va'] + 3 * 4096:x} ---p" in maps

    rc, lst = run(agent, "list", env=env)
    assert [o["id"] for o in lst["objects"]] == [m["id"], c["id"]]
    rc, rel = run(agent, "release", str(m["id"]), env=env)
    assert rc == 0 and rel["released"] == [m["id"]]
    assert f"{m['va']:x}-" not in Path(f"/proc/{pid}/maps").read_text()
    rc, err = run(agent, "release", str(m["id"]), env=env)
    assert rc == 1 and err["errno"] == 2
    rc, rel = run(agent, "release", "all", env=env)
    assert rel["released"] == [c["id"]]
    assert run(agent, "ping", env=env)[1]["objects"] == 0


@pytest.mark.parametrize("args", [["mmap", "0", "r"], ["mmap", "2", "rq"], ["mmap", "-1", "r"],
                                  ["secretmem", "x"], ["mprotect", "1"], ["release"],
                                  ["canary", "1"]])
def test_bad_held_arguments(agent, daemon, args):
    env, _ = daemon
    rc, reply = run(agent, *args, env=env)
    assert rc == 1 and reply["errno"] == 22 and reply["error"]


def test_daemon_times_out_silent_client(agent, daemon):
    import socket
    import time

    env, _ = daemon
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(env["PTAGENT_SOCK"])
        s.settimeout(15)
        t0 = time.monotonic()
        reply = json.loads(s.recv(4096))
    assert reply["errno"] == 110 and 4 < time.monotonic() - t0 < 10
    assert run(agent, "ping", env=env)[0] == 0     # and keeps serving
