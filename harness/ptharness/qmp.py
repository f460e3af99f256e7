"""A small synchronous QMP client (qemu.qmp's QMPClient on an event loop of its own) and
parsers of monitor text.

:class:`Monitor` connects to a QMP unix socket, runs commands with a bounded timeout and turns
every failure into :class:`MonitorError`. The parsers read HMP ``info registers`` (x86 control
registers) and ``info mtree -f`` (which guest-physical ranges a RAM backend fills).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

T = TypeVar("T")
TRANSCRIPT_CHARS = 600  # longest command or reply text kept in a transcript line


class MonitorError(RuntimeError):
    """A QMP command failed, timed out, or the monitor connection is gone."""


class Monitor:
    """A QMP connection with timeouts; ``cmd`` returns the command's ``return`` value.

    The asyncio client runs on a private event loop, driven only from the caller's thread for
    the duration of each call (never left running in the background). With ``transcript``, each
    command and its reply or error is appended there as a line (kept for failure reports;
    long texts cut to :data:`TRANSCRIPT_CHARS`).
    """

    def __init__(self, path: Path | str, *, timeout: float = 30.0,
                 transcript: Path | None = None) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.transcript = transcript
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    def _log(self, direction: str, what: object) -> None:
        """One transcript line: ``<monotonic s> -> command`` or ``<- reply`` (JSON), or
        ``<- !error text``."""
        if self.transcript is None:
            return
        text = json.dumps(what, default=str) if direction != "<-!" else str(what)
        if len(text) > TRANSCRIPT_CHARS:
            text = text[:TRANSCRIPT_CHARS] + f"... ({len(text)} chars)"
        try:
            with open(self.transcript, "a") as f:
                f.write(f"{time.monotonic():.3f} {direction} {text}\n")
        except OSError:
            pass  # the run directory is gone: nothing left to report to

    def _run(self, aw: Awaitable[T], timeout: float) -> T:
        assert self._loop is not None
        return self._loop.run_until_complete(asyncio.wait_for(aw, timeout))

    def connect(self, deadline: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect, retrying until the socket accepts or ``deadline`` (time.monotonic())."""
        self.close()
        self._loop = asyncio.new_event_loop()
        while True:
            err: Exception | None = None
            if Path(self.path).exists():
                client = QMPClient("ptlab")
                try:
                    self._run(client.connect(self.path), max(0.1, deadline - time.monotonic()))
                    self._client = client
                    return
                except (TimeoutError, OSError, QMPError) as e:
                    err = e
                    self._disconnect(client)
            if not alive():
                self.close()
                raise MonitorError("QEMU exited before its QMP socket accepted a connection")
            if time.monotonic() >= deadline:
                self.close()
                raise MonitorError(f"QMP socket {self.path} not ready: {err or 'missing'}")
            time.sleep(0.02)

    def cmd(self, name: str, **args: Any) -> Any:
        """Run QMP command ``name`` with ``args`` (underscores in keys become dashes)."""
        if self._client is None:
            raise MonitorError(f"QMP {name}: not connected")
        args = {k.replace("_", "-"): v for k, v in args.items()}
        self._log("->", {"execute": name, "arguments": args} if args else {"execute": name})
        try:
            reply = self._run(self._client.execute(name, args), self.timeout)
        except TimeoutError:
            self._log("<-!", f"no reply within {self.timeout} s")
            raise MonitorError(f"QMP {name}: no reply within {self.timeout} s") from None
        except (QMPError, OSError, EOFError) as e:
            self._log("<-!", f"{e or type(e).__name__}")
            raise MonitorError(f"QMP {name}: {e or type(e).__name__}") from None
        self._log("<-", reply)
        return reply

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command and return its text output."""
        return str(self.cmd("human-monitor-command", command_line=command_line))

    def hmp_many(self, command_lines: list[str], window: int = 32) -> list[str]:
        """Run many human-monitor commands, up to ``window`` in flight (QMP answers them in
        order, matched by id), and return their outputs in order. One transcript line."""
        if self._client is None:
            raise MonitorError("QMP human-monitor-command: not connected")
        client = self._client
        gate = asyncio.Semaphore(window)

        async def one(line: str) -> str:
            async with gate:
                return str(await client.execute("human-monitor-command",
                                                {"command-line": line}))

        async def run() -> list[str]:
            return list(await asyncio.gather(*(one(c) for c in command_lines)))

        self._log("->", f"{len(command_lines)} HMP commands, first {command_lines[:1]}")
        timeout = self.timeout + 0.01 * len(command_lines)
        try:
            out = self._run(run(), timeout)
        except TimeoutError:
            self._log("<-!", f"no replies within {timeout:.0f} s")
            raise MonitorError(f"{len(command_lines)} HMP commands: no replies within "
                               f"{timeout:.0f} s") from None
        except (QMPError, OSError, EOFError) as e:
            self._log("<-!", f"{e or type(e).__name__}")
            raise MonitorError(f"HMP commands: {e or type(e).__name__}") from None
        self._log("<-", f"{len(out)} replies, first {out[:1]}")
        return out

    def wait_event(
        self, name: str, timeout: float, match: Callable[[dict], bool] = lambda e: True
    ) -> dict:
        """The first event ``name`` whose data satisfies ``match``, within ``timeout`` s."""
        if self._client is None:
            raise MonitorError(f"waiting for {name}: not connected")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = dict(self._run(self._client.events.get(), min(left, 0.5)))
            except TimeoutError:
                continue
            except (QMPError, OSError, EOFError) as e:
                raise MonitorError(f"waiting for {name}: {e or type(e).__name__}") from None
            if event.get("event") == name and match(event.get("data", {})):
                return event
        raise MonitorError(f"no {name} event within {timeout} s")

    def clear_events(self) -> None:
        """Drop the events received so far (:meth:`wait_event` then sees only newer ones)."""
        if self._client is not None:
            self._run(asyncio.sleep(0), 1.0)  # let already received messages land first
            self._client.events.clear()

    def close(self) -> None:
        """Disconnect and close the event loop (idempotent)."""
        if self._client is not None:
            self._disconnect(self._client)
            self._client = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _disconnect(self, client: QMPClient) -> None:
        try:
            self._run(client.disconnect(), 2.0)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the peer may be dead
            pass


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
