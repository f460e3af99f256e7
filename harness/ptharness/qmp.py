"""A small synchronous QMP client (over qemu.qmp's legacy API) and parsers of monitor text.

:class:`Monitor` connects to a QMP unix socket, runs commands with a bounded timeout and turns
every failure into :class:`MonitorError`. The parsers read HMP ``info registers`` (x86 control
registers) and ``info mtree -f`` (which guest-physical ranges a RAM backend fills).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol


class MonitorError(RuntimeError):
    """A QMP command failed, timed out, or the monitor connection is gone."""


class Monitor:
    """A QMP connection with timeouts; ``cmd`` returns the command's ``return`` value."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._qmp: QEMUMonitorProtocol | None = None

    def connect(self, deadline: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect, retrying until the socket accepts or ``deadline`` (time.monotonic())."""
        while True:
            err: Exception | None = None
            if Path(self.path).exists():
                qmp = QEMUMonitorProtocol(self.path)
                try:
                    qmp._sync(qmp._qmp.connect(self.path), max(0.1, deadline - time.monotonic()))
                    qmp.settimeout(self.timeout)
                    self._qmp = qmp
                    return
                except (TimeoutError, OSError, QMPError) as e:
                    err = e
                    _quiet_close(qmp)
            if not alive():
                raise MonitorError("QEMU exited before its QMP socket accepted a connection")
            if time.monotonic() >= deadline:
                raise MonitorError(f"QMP socket {self.path} not ready: {err or 'missing'}")
            time.sleep(0.02)

    @property
    def connected(self) -> bool:
        return self._qmp is not None

    def cmd(self, name: str, **args: Any) -> Any:
        """Run QMP command ``name`` with ``args`` (underscores in keys become dashes)."""
        if self._qmp is None:
            raise MonitorError(f"QMP {name}: not connected")
        args = {k.replace("_", "-"): v for k, v in args.items()}
        try:
            return self._qmp.cmd(name, **args)
        except TimeoutError:
            raise MonitorError(f"QMP {name}: no reply within {self.timeout} s") from None
        except (QMPError, OSError, EOFError) as e:
            raise MonitorError(f"QMP {name}: {e or type(e).__name__}") from None

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command and return its text output."""
        return str(self.cmd("human-monitor-command", command_line=command_line))

    def wait_event(
        self, name: str, timeout: float, match: Callable[[dict], bool] = lambda e: True
    ) -> dict:
        """The first event ``name`` whose data satisfies ``match``, within ``timeout`` s."""
        if self._qmp is None:
            raise MonitorError(f"waiting for {name}: not connected")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._qmp.pull_event(wait=float(min(left, 0.5)))
            except TimeoutError:
                continue
            except (QMPError, OSError, EOFError) as e:
                raise MonitorError(f"waiting for {name}: {e or type(e).__name__}") from None
            if event and event.get("event") == name and match(event.get("data", {})):
                return event
        raise MonitorError(f"no {name} event within {timeout} s")

    def clear_events(self) -> None:
        if self._qmp is not None:
            self._qmp.clear_events()

    def close(self) -> None:
        if self._qmp is not None:
            _quiet_close(self._qmp)
            self._qmp = None


def _quiet_close(qmp: QEMUMonitorProtocol) -> None:
    try:
        qmp._sync(qmp._qmp.disconnect(), 2.0)
    except (Exception, asyncio.CancelledError):  # the peer may be dead already
        pass


def socket_alive(path: Path | str) -> bool:
    """Whether something accepts connections on unix socket ``path``."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


_REG = re.compile(r"\b(CR[0-4]|EFER|RIP|CPL)=([0-9a-fA-F]+)")


def parse_info_registers(text: str) -> dict[str, int]:
    """Control registers from HMP ``info registers`` (x86): cr0, cr2, cr3, cr4, efer, rip, cpl.

    Only the first CPU's block is read. Raises ValueError if CR3/CR4 are missing.
    """
    first = re.split(r"\n(?=CPU#\d+)", text.strip(), maxsplit=1)[0] if "CPU#" in text else text
    regs: dict[str, int] = {}
    for name, value in _REG.findall(first):
        regs.setdefault(name.lower(), int(value, 16))
    if "cr3" not in regs or "cr4" not in regs:
        raise ValueError(f"no CR3/CR4 in 'info registers' output: {text[:200]!r}")
    return regs


@dataclass(frozen=True, slots=True)
class RamRange:
    """Guest-physical [pa, pa+size) filled from ``backend`` starting at byte ``offset``."""

    pa: int
    size: int
    backend: str
    offset: int

    @property
    def end(self) -> int:
        return self.pa + self.size


_MTREE_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (\S+)(?: @([0-9a-f]+))?", re.MULTILINE
)


def parse_mtree_ram(text: str, backends: set[str] | frozenset[str] | None = None) -> list[RamRange]:
    """RAM ranges of the system address space from HMP ``info mtree -f``.

    Reads the flat view whose address space is "memory" and keeps its ``ram`` regions (only
    those named in ``backends`` if given), merging neighbours that continue the same backend.
    """
    views = re.split(r"^FlatView #\d+", text, flags=re.MULTILINE)
    for view in views:
        if not re.search(r'^\s*AS "memory"', view, re.MULTILINE):
            continue
        out: list[RamRange] = []
        for m in _MTREE_LINE.finditer(view):
            start, last, kind, name, off = m.groups()
            if kind != "ram" or (backends is not None and name not in backends):
                continue
            r = RamRange(int(start, 16), int(last, 16) - int(start, 16) + 1, name,
                         int(off or "0", 16))
            prev = out[-1] if out else None
            if (prev and prev.backend == r.backend and prev.end == r.pa
                    and prev.offset + prev.size == r.offset):
                out[-1] = RamRange(prev.pa, prev.size + r.size, prev.backend, prev.offset)
            else:
                out.append(r)
        return out
    raise ValueError('no flat view of address space "memory" in "info mtree -f" output')
