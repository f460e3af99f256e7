"""A live QEMU that ptlab did not start, read over its QMP socket (``ptlab --qmp SOCKET``).

:func:`attach` connects (bounded time), stops the guest if it runs (resumed by
:meth:`LiveQemu.close`, also on errors and signals), reads each CPU's control registers from
HMP ``info registers`` and the guest-physical RAM layout from HMP ``info mtree -f``. RAM whose
backend is a ``memory-backend-file`` with ``share=on`` and a ``mem-path`` this process can open
is mmapped read-only (no copy); the rest is read in chunks with QMP ``pmemsave`` into a private
temporary directory.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .base import MemoryError_, SpanMemory, find_range

T = TypeVar("T")
CHUNK = 2 << 20  # bytes one pmemsave reads
MAX_CACHED = 64  # pmemsave chunks kept (128 MiB at most)


class QmpError(MemoryError_):
    """The QMP socket is dead, not QMP, silent, or a command failed."""


class _Qmp:
    """qemu.qmp's QMPClient on a private event loop, every call bounded by ``timeout``."""

    def __init__(self, path: str, timeout: float) -> None:
        import asyncio  # here: importing it (and ssl, logging...) costs a walk 20 ms

        from qemu.qmp import QMPClient

        self._asyncio = asyncio
        self.path, self.timeout = path, timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("ptlab")
        try:
            self._run(self._client.connect(path), f"connect to {path}")
        except BaseException:
            self.close()
            raise

    def _run(self, aw: Awaitable[T], what: str) -> T:
        try:
            return self._loop.run_until_complete(self._asyncio.wait_for(aw, self.timeout))
        except TimeoutError:
            raise QmpError(f"QMP {what}: no answer within {self.timeout:g} s (is {self.path} "
                           "a QMP socket another client holds?)") from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - QMPError, OSError, protocol garbage
            raise QmpError(f"QMP {what}: {e or type(e).__name__}") from None

    def peer_pid(self) -> int | None:
        """QEMU's pid (SO_PEERCRED of the connection), None where it cannot be had."""
        import socket
        import struct

        writer = getattr(self._client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        try:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,  # type: ignore
                                   struct.calcsize("3i"))
        except (AttributeError, OSError):
            return None
        pid = struct.unpack("3i", cred)[0]
        return pid or None

    def cmd(self, name: str, **args: Any) -> Any:
        args = {k.replace("_", "-"): v for k, v in args.items()}
        return self._run(self._client.execute(name, args), name)

    def hmp(self, line: str, cpu: int | None = None) -> str:
        kw: dict[str, Any] = {"command_line": line}
        if cpu is not None:
            kw["cpu_index"] = cpu
        return str(self.cmd("human-monitor-command", **kw))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(
                self._asyncio.wait_for(self._client.disconnect(), 2.0))
        except BaseException:  # noqa: BLE001 - the peer may be gone; an interrupt that broke
            pass  # a command comes back out of the client's tasks here
        self._loop.close()


_REG = re.compile(r"\b(CR[0-4]|EFER)=([0-9a-fA-F]+)")


def parse_registers(text: str) -> dict[str, int]:
    """Control registers (cr0, cr2, cr3, cr4, efer) of HMP ``info registers`` text (x86; an
    arm64 QEMU prints no TTBR, so nothing)."""
    regs: dict[str, int] = {}
    for name, value in _REG.findall(text):
        regs.setdefault(name.lower(), int(value, 16))
    return regs


_MTREE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (\S+)(?: @([0-9a-f]+))?",
                    re.MULTILINE)


def parse_mtree(text: str) -> list[tuple[int, int, str, int]]:
    """RAM of address space "memory" from HMP ``info mtree -f``: (pa, size, region, offset)."""
    for view in re.split(r"^FlatView #\d+", text, flags=re.MULTILINE):
        if re.search(r'^\s*AS "memory"', view, re.MULTILINE):
            return [(int(a, 16), int(b, 16) - int(a, 16) + 1, name, int(off or "0", 16))
                    for a, b, kind, name, off in _MTREE.findall(view) if kind == "ram"]
    raise QmpError('no flat view of address space "memory" in HMP "info mtree -f"')


@dataclass
class LiveCpu:
    """One vCPU: its index and control registers (empty where HMP shows none)."""

    index: int
    control: dict[str, int]


@dataclass
class _Range:
    pa: int
    end: int
    buf: mmap.mmap | None  # None: read through pmemsave
    offset: int


@dataclass
class LiveQemu(SpanMemory):
    """Guest-physical memory and CPUs of a live QEMU (stopped while attached)."""

    qmp: _Qmp
    machine: str | None
    cpus: list[LiveCpu]
    stopped: bool  # we stopped it: resume on close
    vmcoreinfo: Any = None
    shared: list[str] = field(default_factory=list)  # backends read in place (path)
    pmemsaves: int = 0
    _ranges: list[_Range] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)  # each range's first PA, for find_range
    _maps: list[mmap.mmap] = field(default_factory=list)
    _tmp: str | None = None
    _cache: dict[int, bytes] = field(default_factory=dict)
    _old_handlers: dict[int, Any] = field(default_factory=dict)
    _on_resume: Callable[[], None] | None = None

    def ranges(self) -> list[tuple[int, int]]:
        return [(r.pa, r.end) for r in self._ranges]

    @property
    def copied(self) -> bool:
        """Whether some RAM is read through pmemsave (not mapped in place)."""
        return any(r.buf is None for r in self._ranges)

    def _find(self, pa: int, size: int) -> _Range:
        return find_range(self._starts, self._ranges, pa, size)

    def read(self, pa: int, size: int) -> bytes:
        r = self._find(pa, size)
        if r.buf is not None:
            off = r.offset + pa - r.pa
            return r.buf[off:off + size]
        out = bytearray()
        while size > 0:
            window = pa & ~(CHUNK - 1)
            base, end = max(r.pa, window), min(r.end, window + CHUNK)
            n = min(size, end - pa)
            out += self._chunk(base, end)[pa - base:pa - base + n]
            pa, size = pa + n, size - n
        return bytes(out)

    def _chunk(self, base: int, end: int) -> bytes:
        data = self._cache.get(base)
        if data is None:
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="ptlab-qmp-")
            path = os.path.join(self._tmp, "chunk")
            try:
                self.qmp.cmd("pmemsave", val=base, size=end - base, filename=path)
                with open(path, "rb") as f:
                    data = f.read()
            finally:
                if os.path.exists(path):
                    os.unlink(path)
            self.pmemsaves += 1
            if len(data) != end - base:
                raise QmpError(f"pmemsave of {base:#x}+{end - base:#x} gave {len(data)} bytes")
            if len(self._cache) >= MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[base] = data
        return data

    def close(self) -> None:
        """Unmap, resume the guest if ptlab stopped it, disconnect, remove temporary files."""
        self._cache.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # numpy views left: unmapped when they go
                pass
        self._maps.clear()
        try:
            if self.stopped:
                self.stopped = False
                self._resume()
        finally:
            self.qmp.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            self._old_handlers.clear()


    def _resume(self) -> None:
        """``cont``, with signals held off; over a new connection if an interrupt broke this
        one mid-command."""
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in self._old_handlers}
        try:
            try:
                self.qmp.cmd("cont")
            except QmpError:
                self.qmp.close()
                self.qmp = _Qmp(self.qmp.path, self.qmp.timeout)
                self.qmp.cmd("cont")
        finally:
            for sig, old in held.items():
                signal.signal(sig, old)
        if self._on_resume is not None:
            self._on_resume()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def attach(path: str, *, timeout: float = 5.0, copy: bool = False,
           say: Callable[[str], None] = lambda s: None) -> LiveQemu:
    """Attach to the QEMU whose QMP socket is ``path``; stop it if it runs (``say`` tells).
    ``copy``: read all RAM through pmemsave, even a shared file backend."""
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        raise QmpError(f"cannot open QMP socket {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise QmpError(f"{path} is not a unix socket")
    qmp = _Qmp(path, timeout)
    live = LiveQemu(qmp, None, [], stopped=False)
    try:
        if qmp.cmd("query-status").get("running"):
            import threading

            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    live._old_handlers[sig] = signal.signal(sig, _interrupt)
            qmp.cmd("stop")
            live.stopped = True
            say("ptlab: guest stopped while reading")
            live._on_resume = lambda: say("ptlab: guest resumed")
        _describe(live, copy)
        return live
    except BaseException:
        live.close()
        raise


def _backend_file(pid: int | None, mem_path: str) -> str | None:
    """A path that opens backend file ``mem_path``: itself, else (unlinked after QEMU opened
    it) QEMU's descriptor of it, ``/proc/PID/fd/N``."""
    if os.path.isfile(mem_path):
        return mem_path
    if pid is None:
        return None
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return None
    for n in names:
        try:
            if os.readlink(f"{fds}/{n}") in (mem_path, mem_path + " (deleted)"):
                return f"{fds}/{n}"
        except OSError:
            continue
    return None


def _describe(live: LiveQemu, copy: bool = False) -> None:
    from ..arch import arch_for_uname

    qmp = live.qmp
    target = str(qmp.cmd("query-target").get("arch", ""))
    ops = arch_for_uname(target)
    live.machine = ops.name if ops is not None else target
    for c in qmp.cmd("query-cpus-fast"):
        i = int(c["cpu-index"])
        live.cpus.append(LiveCpu(i, parse_registers(qmp.hmp("info registers", cpu=i))))
    live.cpus.sort(key=lambda c: c.index)
    files: dict[str, tuple[str, int]] = {}
    pid = qmp.peer_pid()
    for m in [] if copy else qmp.cmd("query-memdev"):
        mid = m.get("id")
        if not mid or not m.get("share"):
            continue
        try:
            mpath = qmp.cmd("qom-get", path=f"/objects/{mid}", property="mem-path")
        except QmpError:
            continue  # not a file backend
        found = _backend_file(pid, mpath) if isinstance(mpath, str) and mpath else None
        if found is not None:
            files[mid] = (found, int(m["size"]))
    maps: dict[str, mmap.mmap] = {}
    for pa, size, name, off in sorted(parse_mtree(qmp.hmp("info mtree -f"))):
        buf = maps.get(name)
        if buf is None and name in files:
            fpath, fsize = files[name]
            try:
                fd = os.open(fpath, os.O_RDONLY)
                try:
                    if os.fstat(fd).st_size >= fsize:
                        buf = maps[name] = mmap.mmap(fd, fsize, mmap.MAP_SHARED, mmap.PROT_READ)
                        live._maps.append(buf)
                        live.shared.append(f"{name} ({fpath})")
                finally:
                    os.close(fd)
            except OSError:
                buf = None
        if buf is not None and off + size > len(buf):
            buf = None
        live._ranges.append(_Range(pa, pa + size, buf, off))
    live._starts = [r.pa for r in live._ranges]
    if not live._ranges:
        raise QmpError(f"QEMU at {qmp.path} shows no guest RAM in 'info mtree -f'")
