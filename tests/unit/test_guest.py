"""Guest logic that needs no QEMU: argument checks, agent replies, console tail, port probe."""

from __future__ import annotations

import os
import socket

import pytest
from ptharness.guest import AgentError, Guest, GuestError, free_port, sweep_stale_rundirs
from ptharness.profiles import RunPaths


def test_bad_arguments():
    with pytest.raises(ValueError, match="known"):
        Guest("vax")
    with pytest.raises(ValueError, match="mem_mb"):
        Guest("x86_64", mem_mb=64)
    with pytest.raises(ValueError, match="boot_timeout"):
        Guest("arm64", boot_timeout=0)


def test_unstarted_guest_refuses_work():
    g = Guest("x86_64")
    with pytest.raises(GuestError):
        _ = g.memory
    with pytest.raises(GuestError):
        _ = g.rundir
    g.close()  # closing a never-started guest is harmless
    g.close()


@pytest.fixture
def fake(monkeypatch):
    g = Guest("x86_64")
    replies: list[tuple[int, str, str]] = []
    monkeypatch.setattr(g, "ssh", lambda cmd, timeout=30: replies.pop(0))
    return g, replies


def test_agent_ok_reply(fake):
    g, replies = fake
    replies.append((0, 'noise\n{"release": "6.1", "n": 3}\n', ""))
    assert g.agent("info") == {"release": "6.1", "n": 3}


@pytest.mark.parametrize("out,errno", [
    ('{"error": "Function not implemented", "errno": 38}', 38),
    ('{"ok": false, "error": {"errno": 1, "msg": "EPERM"}}', 1),
])
def test_agent_error_reply(fake, out, errno):
    g, replies = fake
    replies.append((1, out + "\n", ""))
    with pytest.raises(AgentError) as e:
        g.agent("secretmem", "16")
    assert e.value.errno == errno


@pytest.mark.parametrize("out", ["", "not json", "[1, 2]"])
def test_agent_garbage_reply(fake, out):
    g, replies = fake
    replies.append((127, out, "sh: ptagent: not found"))
    with pytest.raises(AgentError, match="no JSON"):
        g.agent("info")


@pytest.mark.parametrize("info,expected", [
    ({"vmcoreinfo": {"paddr": 0x4BC1000, "size": 0x1024}}, (0x4BC1000, 0x1024)),
    ({"vmcoreinfo": {"pa": "0x4bc1000", "size": "0x1024"}}, (0x4BC1000, 0x1024)),
    ({"vmcoreinfo": "4bc1000 1024"}, (0x4BC1000, 0x1024)),
])
def test_vmcoreinfo_location_from_agent(info, expected):
    g = Guest("x86_64")
    g.info = info
    assert g._vmcoreinfo_location() == expected


def test_vmcoreinfo_location_falls_back_to_sysfs(fake):
    g, replies = fake
    g.info = {"release": "6.1"}
    replies.append((0, "000000004bc1000 1024\n", ""))
    assert g._vmcoreinfo_location() == (0x4BC1000, 0x1024)


def test_console_tail(tmp_path):
    g = Guest("x86_64")
    g._paths = RunPaths(tmp_path)
    assert g.console_tail() == ""
    (tmp_path / "serial.log").write_bytes(
        b"".join(b"line %d\r\n" % i for i in range(1000)) + b"\xff bad utf8\n"
    )
    tail = g.console_tail(3).splitlines()
    assert tail == ["line 998", "line 999", "\ufffd bad utf8"]


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_twice_keeps_the_first(tmp_path):
    g = Guest("x86_64")
    g._paths = RunPaths(tmp_path)  # as if started
    with pytest.raises(GuestError, match="once"):
        g.start()
    assert tmp_path.exists()  # the failed second start did not tear anything down


def test_sweep_stale_rundirs(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, foreign = (tmp_path / n for n in ("ptlab-stale", "ptlab-live", "ptlab-foreign"))
    for d in (stale, live, foreign):
        d.mkdir()
    (stale / "owner.pid").write_text(str(dead.pid))
    (live / "owner.pid").write_text(str(os.getpid()))
    (tmp_path / "other-dir").mkdir()
    assert sweep_stale_rundirs(str(tmp_path)) == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()
