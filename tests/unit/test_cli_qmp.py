"""``ptlab --qmp SOCKET``'s error paths against sockets that are not a usable QEMU: none, a
server that sends garbage, one that never answers (each one error line, exit 2, bounded
time), and a fake QMP server that records ``stop``/``cont``: a guest ptlab stopped is resumed
after an error and after SIGTERM or SIGINT (to a ptlab process), and one that was stopped
already is left stopped. (The real path, a booted guest, is
tests/qemu/test_cli_live_qemu.py.)"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ptlab.cli import main as ptlab_main

BOUND = 30.0  # seconds: generous on a loaded machine; the client's own timeout is 5 s


def run(*argv: str) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    code = ptlab_main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue(), time.monotonic() - t0


def one_error(err: str) -> str:
    lines = err.splitlines()
    errors = [x for x in lines if x.startswith("ptlab: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "q.sock"


RECONNECT_S = 1.0  # how long the fake QEMU waits for a client's next connection


def serve(path: Path, handle: Callable[[socket.socket], None]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def loop() -> None:
        # like QEMU's socket chardev: one client at a time, the next once it has gone (a
        # ptlab interrupted mid-command reconnects to resume the guest)
        with srv:
            srv.settimeout(BOUND)
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    try:
                        handle(conn)
                    except OSError:
                        pass
                srv.settimeout(RECONNECT_S)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_missing_socket(sock_path: Path) -> None:
    code, out, err, _ = run("--qmp", str(sock_path), "walk")
    assert code == 2 and not out
    assert "cannot open QMP socket" in one_error(err)


def test_not_a_socket(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err, _ = run("--qmp", str(f), "walk")
    assert code == 2 and "not a unix socket" in one_error(err)


def test_dead_socket(sock_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.close()  # the path stays, nobody listens: connection refused
    code, _, err, took = run("--qmp", str(sock_path), "walk")
    assert code == 2 and "QMP connect" in one_error(err) and took < BOUND


def test_garbage_server(sock_path: Path) -> None:
    def garbage(conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff garbage {not json\n")
        time.sleep(1)

    t = serve(sock_path, garbage)
    code, _, err, took = run("--qmp", str(sock_path), "walk")
    assert code == 2 and "QMP connect" in one_error(err) and took < BOUND
    t.join(BOUND)


def test_silent_server(sock_path: Path) -> None:
    done = threading.Event()
    t = serve(sock_path, lambda conn: done.wait(BOUND))
    code, _, err, took = run("--qmp", str(sock_path), "walk")
    done.set()
    assert code == 2 and "no answer within" in one_error(err) and took < BOUND
    t.join(BOUND)


def test_qmp_timeout_bounds_a_silent_server(sock_path: Path) -> None:
    """``--qmp-timeout 0.5``: the silent server is given up on after half a second, not 5."""
    done = threading.Event()
    t = serve(sock_path, lambda conn: done.wait(BOUND))
    code, _, err, took = run("--qmp", str(sock_path), "--qmp-timeout", "0.5", "walk")
    done.set()
    assert code == 2 and "no answer within 0.5 s" in one_error(err)
    assert took < 4.5, f"{took:.1f} s: the default 5 s timeout, not 0.5"
    t.join(BOUND)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "5s", "1e9"])
def test_qmp_timeout_rejects_bad_values(sock_path: Path, value: str) -> None:
    code, _, err, _ = run("--qmp", str(sock_path), "--qmp-timeout", value, "walk")
    assert code == 2 and f"--qmp-timeout {value}: want seconds" in one_error(err)


def test_qmp_timeout_needs_qmp(tmp_path: Path) -> None:
    f = tmp_path / "raw"
    f.write_bytes(bytes(4096))
    code, _, err, _ = run("--raw", str(f), "--qmp-timeout", "1", "walk")
    assert code == 2 and "--qmp-timeout applies to --qmp only" in one_error(err)


def _messages(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """JSON objects as the client sends them (QMP clients need not end them with newlines)."""
    dec, buf = json.JSONDecoder(), ""
    while data := conn.recv(65536):
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg


class FakeQemu:
    """Speaks enough QMP for ptlab: one x86 CPU, 2 MiB of RAM (all zeros: no tables), the
    commands it received in ``log``; ``on_pmemsave`` runs on each pmemsave."""

    def __init__(self, running: bool, on_pmemsave: Callable[[], Any] | None = None,
                 arch: str = "x86_64", ram: bytes | None = None) -> None:
        self.running, self.arch = running, arch
        self.ram = ram if ram is not None else bytes(2 << 20)  # at PA 0
        self.log: list[str] = []
        self.on_pmemsave = on_pmemsave

    def reply(self, name: str, args: dict[str, Any]) -> Any:
        if name == "query-status":
            return {"running": self.running, "status": "running" if self.running else "paused"}
        if name in ("stop", "cont"):
            self.running = name == "cont"
            return {}
        if name == "query-target":
            return {"arch": self.arch}
        if name == "query-cpus-fast":
            return [{"cpu-index": 0, "target": "x86_64"}]
        if name == "query-memdev":
            return []
        if name == "human-monitor-command":
            line = args["command-line"]
            if line == "info registers" and self.arch == "aarch64":
                return " PC=ffff800008000000 X00=0000000000000000\nPSTATE=600003c5 -Z-C EL1h\n"
            if line == "info registers":
                return "CR0=80050033 CR2=0 CR3=0000000000100000 CR4=000006f0\nEFER=d01\n"
            if line == "info mtree -f":
                return ('FlatView #0\n AS "memory", root: system\n Root memory region: system\n'
                        "  0000000000000000-00000000001fffff (prio 0, ram): ram0\n")
        if name == "pmemsave":
            if self.on_pmemsave is not None:
                self.on_pmemsave()
            Path(args["filename"]).write_bytes(self.ram[args["val"]:args["val"] + args["size"]])
            return {}
        return None

    def __call__(self, conn: socket.socket) -> None:
        conn.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 8, "minor": 0,
                                                               "micro": 0}, "package": ""},
                                         "capabilities": []}}).encode() + b"\r\n")
        for msg in _messages(conn):
            name = msg.get("execute")
            self.log.append(name)
            ret = {} if name == "qmp_capabilities" else self.reply(name, msg.get("arguments", {}))
            if ret is None:
                resp: dict[str, Any] = {"error": {"class": "GenericError", "desc": "nope"}}
            else:
                resp = {"return": ret}
            if "id" in msg:
                resp["id"] = msg["id"]
            conn.sendall(json.dumps(resp).encode() + b"\r\n")


def test_resumed_after_error(sock_path: Path) -> None:
    fake = FakeQemu(running=True)
    t = serve(sock_path, fake)
    # the root 0x100000 holds zeros: ptlab reads it (pmemsave), then --root outside RAM fails
    code, _, err, _ = run("--qmp", str(sock_path), "walk", "--root", "0x40000000")
    t.join(BOUND)
    assert code == 2 and "outside the memory" in one_error(err)
    assert "ptlab: guest stopped while reading" in err.splitlines()
    assert fake.log.count("stop") == 1 and fake.log.count("cont") == 1
    assert fake.log.index("stop") < fake.log.index("cont") and fake.running


def test_arm64_needs_a_root(sock_path: Path) -> None:
    """QEMU's HMP shows no TTBR on arm64: the root comes from --root or the VMCOREINFO note
    ptlab looks for in guest RAM (all zeros here: none)."""
    fake = FakeQemu(running=True, arch="aarch64")
    t = serve(sock_path, fake)
    code, _, err, _ = run("--qmp", str(sock_path), "--format", "arm64-4k-48", "walk")
    t.join(BOUND)
    assert code == 2 and "no arm64 root register" in one_error(err), err
    assert "no usable VMCOREINFO note is in guest RAM; pass --root PA" in err
    assert fake.log.count("pmemsave") >= 1 and fake.running


def test_arm64_root_from_vmcoreinfo_in_ram(sock_path: Path) -> None:
    """No TTBR from HMP on arm64: ptlab finds the kernel's VMCOREINFO note in guest RAM (read
    through pmemsave) and takes format and root from it; the guest is resumed after."""
    from ptlab.formats.base import Attrs
    from ptlab.formats.catalog import by_name
    from ptlab.memory.elfwrite import vmcoreinfo_note
    from ptlab.memory.sparse import SparseMemory

    f = by_name("arm64-4k-48")
    root, voff, va = 0x1000, 0xFFFF_7FFF_C800_0000, 0xFFFF_8000_0820_0000
    mem = SparseMemory(2 << 20)
    kx = f.normalize(Attrs(present=True, exec=True, accessed=True, global_=True))
    mem.write_u64(root + 8 * f.index(va, 3), f.table(0x2000, 3))
    mem.write_u64(0x2000 + 8 * f.index(va, 2), f.table(0x3000, 2))
    mem.write_u64(0x3000 + 8 * f.index(va, 1), f.table(0x4000, 1))
    mem.write_u64(0x4000 + 8 * f.index(va, 0), f.leaf(0x10_0000, kx, 0))
    text = ("OSRELEASE=6.1.0-arm64\nPAGESIZE=4096\nNUMBER(VA_BITS)=48\n"
            f"SYMBOL(swapper_pg_dir)={root + voff:x}\nNUMBER(kimage_voffset)={voff:#x}\n"
            "NUMBER(TCR_EL1_T1SZ)=0x10\n")
    mem.write(0x9000, vmcoreinfo_note(text))
    fake = FakeQemu(running=True, arch="aarch64", ram=mem.read(0, 2 << 20))
    t = serve(sock_path, fake)
    code, out, err, _ = run("--qmp", str(sock_path), "info", "--json")
    t.join(BOUND)
    assert code == 0, err
    obj = json.loads(out)
    assert obj["format"] == "arm64-4k-48" and obj["root"] == hex(root), obj
    notes = " ".join(obj["notes"])
    assert "VMCOREINFO note found in memory at PA 0x9000" in notes, notes
    assert "no arm64 root register" in notes and fake.running
    again = sock_path.with_name("again.sock")
    t = serve(again, FakeQemu(running=False, arch="aarch64", ram=mem.read(0, 2 << 20)))
    code, out, err, _ = run("--qmp", str(again), "translate", hex(va + 0x234))
    t.join(BOUND)
    assert code == 0 and "=> PA 0x100234" in out, out + err


def test_qmp_copy_needs_qmp(tmp_path: Path) -> None:
    f = tmp_path / "raw"
    f.write_bytes(bytes(4096))
    code, _, err, _ = run("--raw", str(f), "--qmp-copy", "walk")
    assert code == 2 and "--qmp-copy applies to --qmp only" in one_error(err)


def test_walk_and_not_resumed_when_stopped_before(sock_path: Path) -> None:
    fake = FakeQemu(running=False)
    t = serve(sock_path, fake)
    code, out, err, _ = run("--qmp", str(sock_path), "walk")
    t.join(BOUND)
    assert code == 0 and out.startswith("# 0 runs, "), (out, err)
    assert "pmemsave" in fake.log and "stop" not in fake.log and "cont" not in fake.log
    assert not fake.running and "stopped" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_resumed_after_signal(sock_path: Path, sig: int) -> None:
    """A ptlab process signalled while it reads (Ctrl-C, kill) resumes the guest, exits 130."""
    release = threading.Event()
    fake = FakeQemu(running=True, on_pmemsave=lambda: release.wait(BOUND))
    t = serve(sock_path, fake)
    proc = subprocess.Popen([sys.executable, "-m", "ptlab.cli", "--qmp", str(sock_path),
                             "walk"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + BOUND
        while "pmemsave" not in fake.log and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "pmemsave" in fake.log
        proc.send_signal(sig)
        release.set()
        _, err = proc.communicate(timeout=BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t.join(BOUND)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[0] == "ptlab: guest stopped while reading"
    assert fake.log.count("cont") == 1 and fake.running, fake.log
