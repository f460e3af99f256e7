"""Guest logic that needs no QEMU: argument checks, agent replies, console tail, port probe."""

from __future__ import annotations

import os
import socket

import pytest
from ptharness.errors import AgentError, AgentProtocolError
from ptharness.guest import AGENT, Guest, GuestError, free_port, sweep_stale_rundirs
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
    g.close()  # closing a never-started guest is harmless, twice too
    g.close()
    assert not g.alive and g.pid is None
    with pytest.raises(GuestError, match="closed"):
        g.ssh("true")  # and says why it does no work


@pytest.fixture
def fake(monkeypatch):
    g = Guest("x86_64")
    replies: list[tuple[int, str, str]] = []
    commands: list[str] = []

    def ssh(cmd: str, timeout: float = 30) -> tuple[int, str, str]:
        commands.append(cmd)
        return replies.pop(0)

    monkeypatch.setattr(g, "ssh", ssh)
    return g, replies, commands


PING = '{"pong": true, "pid": 41, "objects": 0, "uptime_s": 7}'


def test_agent_ok_reply(fake):
    g, replies, commands = fake
    replies.append((0, PING + "\n", ""))
    assert g.agent("ping") == {"pong": True, "pid": 41, "objects": 0, "uptime_s": 7}
    assert commands == [f"{AGENT} ping"]
    replies.append((0, '{"block": 7, "state": "online"}\n', ""))
    assert g.agent("online", "7", "online movable") == {"block": 7, "state": "online"}
    assert commands[-1] == f"{AGENT} online 7 'online movable'"


def test_agent_error_reply(fake):
    g, replies, _ = fake
    replies.append((1, '{"error": "Function not implemented", "errno": 38}\n', ""))
    with pytest.raises(AgentError) as e:
        g.agent("secretmem", "16")
    assert e.value.errno == 38 and e.value.msg == "Function not implemented"


@pytest.mark.parametrize("status,out", [
    (127, ""),                                                   # sh: ptagent: not found
    (0, "not json"),
    (0, "[1, 2]"),
    (0, 'noise\n' + PING),                                        # one line, nothing else
    (1, '{"ok": false, "error": {"errno": 1, "msg": "EPERM"}}'),  # not the error object
    (0, '{"pong": true, "pid": "41", "objects": 0, "uptime_s": 7}'),
])
def test_agent_undocumented_reply(fake, status, out):
    g, replies, _ = fake
    replies.append((status, out, "sh: ptagent: not found"))
    with pytest.raises(AgentProtocolError, match="^ptagent ping: ") as e:
        g.agent("ping")
    assert e.value.command == ["ping"]


INFO = {"uname": {"sysname": "Linux", "release": "6.1", "version": "#1", "machine": "x86_64",
                  "nodename": "g"},
        "page_size": 4096, "cmdline": "", "vmcoreinfo": {"paddr": 0x4BC1000, "size": 0x1024},
        "kallsyms_visible": True, "kallsyms": {}, "kvars": {},
        "system_ram": [{"start": 0x1000, "end": 0x9FC00}]}


def test_vmcoreinfo_location_from_agent(fake):
    g, replies, commands = fake
    g.info = INFO
    assert g._vmcoreinfo_location() == (0x4BC1000, 0x1024)
    assert commands == []  # no SSH: the info reply had it
    g.info = {**INFO, "vmcoreinfo": None}
    with pytest.raises(GuestError, match="no /sys/kernel/vmcoreinfo"):
        g._vmcoreinfo_location()


def test_vmcoreinfo_location_from_sysfs(fake):
    g, replies, commands = fake
    replies.append((0, "000000004bc1000 1024\n", ""))
    assert g._vmcoreinfo_location() == (0x4BC1000, 0x1024)
    assert commands == ["cat /sys/kernel/vmcoreinfo"]
    for bad in [(1, "", "No such file"), (0, "4bc1000\n", ""), (0, "zz 1024\n", "")]:
        replies.append(bad)
        with pytest.raises(GuestError, match="vmcoreinfo"):
            g._vmcoreinfo_location()


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
    assert 1024 <= port < 65536  # an ephemeral port, not a privileged one
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname() == ("127.0.0.1", port)
        s.listen(1)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.getpeername() == ("127.0.0.1", port)


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
