"""What a testbed run can leave behind or expose: processes, run directories, listening sockets.

Read from /proc only (``/proc/<pid>/cmdline``, ``/proc/<pid>/fd``, ``/proc/net/{tcp,tcp6,udp,
udp6,unix}``), so the inventory does not depend on the harness's own bookkeeping.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"  # include/net/tcp_states.h
TCP_CLOSE = "07"  # an unconnected UDP socket
UNIX_ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix Flags: a listening socket


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> list[str]:
    """``pid``'s argv ([] if it is gone or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for p in _pids():
        pp = parent(p)
        if pp is not None:
            children.setdefault(pp, []).append(p)
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def processes_naming(fragment: str) -> list[int]:
    """Live processes (zombies excluded) one of whose arguments contains ``fragment``."""
    found = []
    for p in _pids():
        if p != os.getpid() and any(fragment in a for a in cmdline(p)):
            found.append(p)
    return found


def qemu_processes(fragment: str) -> list[int]:
    """QEMU processes whose command line names ``fragment`` (a run directory or its base)."""
    return _qemus(processes_naming(fragment))


def _qemus(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.basename((cmdline(p) or [""])[0]).startswith("qemu-system")]


def kill_quietly(pid: int | None, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` unless it is None or already gone."""
    if pid is None:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_naming(rundir: Path) -> list[int]:
    """SIGKILL every process whose command line names ``rundir`` (the QEMU of a dead owner)."""
    pids = processes_naming(f"{rundir}/")
    for p in pids:
        kill_quietly(p)
    return pids


def run_dirs(base: Path) -> list[Path]:
    """Run directories (``ptlab-*``) under ``base``."""
    return sorted(base.glob("ptlab-*")) if base.is_dir() else []


@dataclass(frozen=True)
class Listener:
    """One listening socket: TCP/UDP with its local address, or a unix socket with its path."""

    kind: str  # tcp | tcp6 | udp | udp6 | unix
    address: str  # IP address, or the unix path ("@name" for the abstract namespace)
    port: int  # 0 for unix sockets
    inode: int
    pids: tuple[int, ...]  # processes holding it

    def __str__(self) -> str:
        where = self.address if self.kind == "unix" else f"{self.address}:{self.port}"
        return f"{self.kind} {where} (pid {','.join(map(str, self.pids)) or '?'})"


def _ip(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(hexaddr, 16)))
    words = struct.unpack("<4I", raw)  # four host-order 32-bit words
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))


def _socket_owners() -> dict[int, list[int]]:
    owners: dict[int, list[int]] = {}
    for p in _pids():
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owners.setdefault(int(link[8:-1]), []).append(p)
    return owners


def listeners() -> list[Listener]:
    """Every listening TCP socket, bound unconnected UDP socket and listening unix socket
    of this network namespace, with the processes that hold it."""
    owners = _socket_owners()
    out = []
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, remote, state, inode = f[1], f[2], f[3], int(f[9])
            want = TCP_LISTEN if kind.startswith("tcp") else TCP_CLOSE
            if state != want or (kind.startswith("udp") and int(remote.split(":")[1], 16)):
                continue
            addr, port = local.split(":")
            out.append(Listener(kind, _ip(addr, kind.endswith("6")), int(port, 16), inode,
                                tuple(owners.get(inode, ()))))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) < 7 or not int(f[3], 16) & UNIX_ACCEPTCON:
            continue
        path = f[7] if len(f) > 7 else ""
        inode = int(f[6])
        out.append(Listener("unix", path, 0, inode, tuple(owners.get(inode, ()))))
    return out


@dataclass
class Leftovers:
    """What a finished run left: QEMU processes, other processes naming a run directory
    (reapers, qemu-img), run directories, listening sockets."""

    qemu: list[int]
    others: list[int]
    rundirs: list[Path]
    sockets: list[Listener]

    @property
    def total(self) -> int:
        return len(self.qemu) + len(self.others) + len(self.rundirs) + len(self.sockets)

    def __str__(self) -> str:
        parts = [f"QEMU pid {p}" for p in self.qemu] + [
            f"process {p} ({' '.join(cmdline(p))[:80]})" for p in self.others]
        parts += [f"run dir {d}" for d in self.rundirs] + [f"socket {s}" for s in self.sockets]
        return "; ".join(parts) or "nothing"


def leftovers(base: Path) -> Leftovers:
    """What is left of runs whose run directories lived under ``base``: QEMU processes naming
    it, run directories in it, and listening sockets in it or held by a process naming it."""
    naming = processes_naming(f"{base}/")
    qemu = _qemus(naming)
    socks = [s for s in listeners()
             if s.address.startswith(f"{base}/") or set(naming) & set(s.pids)]
    return Leftovers(qemu, [p for p in naming if p not in qemu], run_dirs(base), socks)


PF_EXITING = 0x4  # include/linux/sched.h: set first thing in do_exit()


def exiting(pid: int) -> bool:
    """Whether ``pid`` is gone, a zombie, or dying (PF_EXITING: a SIGKILLed QEMU closes its
    sockets in do_exit() before it can be reaped, so a lost connection can beat poll())."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return True
    return fields[0] in ("Z", "X", "x") or bool(int(fields[6]) & PF_EXITING)
