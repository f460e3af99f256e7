"""`Guest`: a real Debian kernel under TCG QEMU, driven over QMP, SSH and the gdbstub.

    with Guest("x86_64") as g:          # boots, waits for PTLAB-READY, SSH and `ptagent info`
        g.stop()
        walk(g.kernel_format(), g.memory, g.kernel_root())

Everything of one run lives in a private 0700 run directory (in /dev/shm when it exists):
the QMP and gdbstub sockets, the serial log, QEMU's stderr and the shared RAM files (unlinked
as soon as they are mapped). A watchdog thread notices a QEMU exit or a kernel panic at once
and aborts any SSH command in flight; every wait is bounded and every failure is a
:class:`GuestError` carrying the console's last lines. QEMU is killed and reaped and the run
directory removed on exit, on errors in ``__enter__``, on KeyboardInterrupt, and (failing all
else) at garbage collection; if the harness process dies (SIGKILL), PR_SET_PDEATHSIG kills
QEMU (guests started from the main thread) and the run directory's reaper
(:mod:`ptharness.reaper`) kills whatever names the directory and removes it; the next Guest
still sweeps run directories whose owner process is gone.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ptlab.memory.vmcoreinfo import VmcoreInfo

from .agent_reply import parse_reply
from .errors import GuestError
from .guest_hotplug import HotplugMixin
from .guest_roots import RootsMixin
from .guestmem import PmemsaveRAM, SharedRAM
from .leaks import exiting, kill_naming
from .profiles import (
    VIRTIO_MEM_BACKEND,
    VIRTIO_MEM_ID,
    VIRTIO_MEM_MB,
    Profile,
    RunPaths,
    get_profile,
    kernel_series,
    qemu_command,
)
from .qmp import Monitor, MonitorError, parse_mtree_ram
from .ramsnap import RamSnapshot, qemu_fd_of, ram_roms, rings_hit_roms, vring_ranges
from .reaper import Reaper, die_with_parent
from .reaper import stop as stop_reaper
from .reaper import watch as watch_rundir
from .ssh import Session, SshError, generate_key, key_param

READY_MARK = b"PTLAB-READY"
# Console lines of guest/ptinit.c the watchdog timestamps (Guest.timings, seconds since QEMU
# start): /init's first line, PTLAB-READY (dropbear listens, the agent daemon runs), and the
# end of the background module loads (virtio_mem, qemu_fw_cfg), which start() waits for.
BOOT_MARKS = {
    "init": b"ptlab-init: running /init",
    "ready": READY_MARK,
    "late_modules": b"ptlab-init: late modules loaded",
}
BOOT_POLL_S = 0.01  # serial log polling until the last boot mark (timing resolution)
WATCH_POLL_S = 0.05  # afterwards
PANIC_MARKS = (b"Kernel panic - not syncing", b"---[ end Kernel panic")
AGENT = "/bin/ptagent"
PORT_ATTEMPTS = 6


def run_base() -> str | None:
    """Where run directories go: $PTLAB_RUNDIR, else /dev/shm (RAM files are big), else $TMPDIR."""
    base = os.environ.get("PTLAB_RUNDIR")
    if base:
        return base
    return "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None


OWNER_FILE = "owner.pid"


def sweep_stale_rundirs(base: str | None) -> list[Path]:
    """Remove run directories left by harness processes that died without cleaning up
    (SIGKILL, SIGTERM): those whose owner.pid names a process that no longer exists."""
    removed = []
    for d in Path(base or tempfile.gettempdir()).glob("ptlab-*"):
        try:
            pid = int((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        kill_naming(d)  # a QEMU that outlived its owner (no reaper, no PDEATHSIG)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def boot_files(profile: Profile, image: Any) -> tuple[Path, Path | None]:
    """(``-kernel`` file, ``-device loader`` ELF or None) of ``profile``'s entry into
    ``image``'s kernel (see :attr:`Profile.entry`); an image without the entry's files boots
    its packaged kernel."""
    vmlinux = getattr(image, "vmlinux", None)
    la57 = getattr(image, "la57_entry", None)
    if profile.entry == "pvh" and vmlinux:
        return Path(vmlinux), None
    if profile.entry == "la57" and vmlinux and la57:
        return Path(la57), Path(vmlinux)
    return Path(image.kernel), None


def free_port() -> int:
    """A currently free 127.0.0.1 TCP port (QEMU may still lose a race for it: retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Resources:
    """What must be released even if the Guest object is lost: the process and the run dir."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.rundir: Path | None = None
        self.reaper: Reaper | None = None  # cleans up if this process dies (ptharness.reaper)

    def release(self) -> None:
        reaper, self.reaper = self.reaper, None
        stop_reaper(reaper)
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
                pass
        rundir, self.rundir = self.rundir, None
        if rundir is not None:
            shutil.rmtree(rundir, ignore_errors=True)


class Guest(RootsMixin, HotplugMixin):
    """A booted guest of ``profile`` (see :data:`ptharness.profiles.PROFILES`)."""

    def __init__(
        self,
        profile: str,
        *,
        mem_mb: int = 1024,
        hotplug: bool = False,
        boot_timeout: float = 120.0,
        smp: int = 1,
        image: Any = None,
        devices: tuple[str, ...] = (),
        qemu_args: tuple[str, ...] = (),
    ) -> None:
        """``devices``: extra ``-device`` specs (e.g. ``"vmcoreinfo"``, which makes
        ``dump-guest-memory`` carry the kernel's VMCOREINFO note); ``qemu_args``: more QEMU
        arguments (e.g. a second QMP monitor for a client other than the harness)."""
        self.profile: Profile = get_profile(profile)
        if not isinstance(mem_mb, int) or mem_mb < 128 or mem_mb % 2:
            raise ValueError(f"mem_mb must be an even int >= 128, not {mem_mb!r}")
        if boot_timeout <= 0:
            raise ValueError("boot_timeout must be positive")
        self.mem_mb = mem_mb
        self.hotplug = hotplug
        self.boot_timeout = boot_timeout
        self.smp = smp
        self.image = image
        self.devices = tuple(devices)
        self.qemu_args = tuple(qemu_args)
        self._info: dict[str, Any] | None = None
        self.boot_seconds: float | None = None  # QEMU start -> first agent reply
        self.timings: dict[str, float] = {}  # boot phases, seconds since QEMU start
        self.ssh_port: int | None = None
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.release)
        self._paths: RunPaths | None = None
        self._monitor: Monitor | None = None
        self._session: Session | None = None
        self._reconnect = False  # reset() left the SSH session to be made on first use
        self._memory: SharedRAM | None = None
        self._layout_done = False
        self._vmcoreinfo: VmcoreInfo | None = None
        self._dimms: dict[str, tuple[str, int]] = {}  # device id -> (backend id, size)
        self._dimm_seq = 0
        self._stop_watch = threading.Event()
        self._changed = threading.Event()
        self._t0 = 0.0  # time.monotonic() at QEMU start
        self._marks: dict[str, float] = {}  # BOOT_MARKS seen: name -> seconds since QEMU start
        self._dead: str | None = None
        self._watch: threading.Thread | None = None
        self._key: Any = None
        self._gdb_regs: dict[str, Any] | None = None
        self._checkpointed = False
        self._checkpoint_running = True
        self._ram_snaps: list[tuple[str, RamSnapshot]] = []
        self.checkpoint_fast = False  # the last checkpoint left RAM to the harness

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rundir(self) -> Path:
        if self._paths is None:
            raise GuestError("guest not started")
        return self._paths.rundir

    @property
    def pid(self) -> int | None:
        return self._res.proc.pid if self._res.proc else None

    @property
    def kernel_series(self) -> str:
        """The series ("6.1", "6.12") of the kernel this guest's image boots."""
        if self.image is None:
            raise GuestError("guest not started")
        return kernel_series(self.image.kernel_version)

    def start(self) -> None:
        """Boot and wait until the agent answers (GuestError on any failure)."""
        if self._paths is not None:
            raise GuestError("a Guest starts once; make a new one")
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        if self.image is None:
            from .image import ensure_image

            self.image = ensure_image(self.profile.arch)
        image = self.image
        kernel, loader = boot_files(self.profile, image)
        sweep_stale_rundirs(run_base())
        self._res.rundir = Path(tempfile.mkdtemp(prefix="ptlab-", dir=run_base()))
        os.chmod(self._res.rundir, 0o700)
        (self._res.rundir / OWNER_FILE).write_text(str(os.getpid()))
        self._res.reaper = watch_rundir(self._res.rundir)
        self._paths = paths = RunPaths(self._res.rundir)
        key, pub = generate_key()
        self._key = key
        self._t0 = t0 = time.monotonic()
        deadline = t0 + self.boot_timeout
        self._launch(paths, kernel, loader, Path(image.initrd), key_param(pub), deadline)
        self.timings["qmp"] = time.monotonic() - t0
        self._map_backends()
        self._watch = threading.Thread(target=self._watchdog, name="ptlab-watchdog", daemon=True)
        self._watch.start()
        self._wait_ready(deadline)
        self.timings.update((k, self._marks[k]) for k in ("init", "ready") if k in self._marks)
        self._connect(deadline, "SSH")
        self.timings["ssh"] = time.monotonic() - t0
        # `ping` proves the agent answers (~0.06 s); `info` (~0.3 s: it scans kallsyms) is fetched
        # when first needed, see :attr:`info`.
        self.agent("ping", timeout=max(5.0, deadline - time.monotonic()))
        self.boot_seconds = self.timings["agent"] = time.monotonic() - t0
        # Read VMCOREINFO now, while the guest surely runs: kernel_root() on a stopped guest
        # then needs no SSH.
        self.vmcoreinfo()
        self.timings["vmcoreinfo"] = time.monotonic() - t0
        self._wait_mark("late_modules", deadline)  # normally long done by now
        self.timings["late_modules"] = self._marks["late_modules"]

    def _launch(self, paths: RunPaths, kernel: Path, loader: Path | None, initrd: Path,
                key_b64: str, deadline: float) -> None:
        """Start QEMU and connect QMP; pick another SSH port if QEMU lost the port race."""
        for _attempt in range(PORT_ATTEMPTS):
            self.ssh_port = free_port()
            argv = qemu_command(
                self.profile, kernel=kernel, initrd=initrd, paths=paths, loader=loader,
                ssh_port=self.ssh_port, key_b64=key_b64, mem_mb=self.mem_mb,
                hotplug=self.hotplug, smp=self.smp,
            )
            for dev in self.devices:
                argv += ["-device", dev]
            argv += self.qemu_args
            for f in (paths.serial, paths.stderr, paths.qmp, paths.gdb, paths.ram):
                f.unlink(missing_ok=True)
            with open(paths.stderr, "wb") as err:
                try:
                    self._res.proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                        start_new_session=True,
                        # PDEATHSIG fires when the forking *thread* exits: main thread only
                        # (elsewhere the run directory's reaper kills QEMU).
                        preexec_fn=functools.partial(die_with_parent, os.getpid())
                        if threading.current_thread() is threading.main_thread() else None,
                    )
                except OSError as e:
                    raise GuestError(f"cannot start {argv[0]}: {e}") from None
            proc = self._res.proc
            monitor = Monitor(paths.qmp, transcript=paths.qmp_log)
            try:
                monitor.connect(min(deadline, time.monotonic() + 30),
                                alive=lambda p=proc: p.poll() is None)
            except MonitorError as e:
                proc.kill()
                proc.wait()
                self._res.proc = None
                stderr = paths.stderr.read_text(errors="replace").strip()
                if "forward" in stderr and time.monotonic() < deadline:
                    continue  # another process took the port between our probe and QEMU
                raise GuestError(f"QEMU did not start ({e}): {stderr[-2000:]}") from None
            self._monitor = monitor
            return
        raise GuestError(f"no free SSH port after {PORT_ATTEMPTS} attempts")

    def _map_backends(self) -> None:
        """mmap the RAM files QEMU created, then unlink them (freed when both let go)."""
        assert self._paths is not None
        mem = SharedRAM()
        self._memory = mem
        files = [("ram0", self._paths.ram, self.mem_mb << 20)]
        if self.hotplug and self.profile.board.hotplug == "virtio-mem":
            files.append((VIRTIO_MEM_BACKEND, self._paths.backend(VIRTIO_MEM_BACKEND),
                          VIRTIO_MEM_MB << 20))
        for name, path, size in files:
            try:
                mem.map_file(name, path, size)
            except (OSError, ValueError) as e:
                raise GuestError(f"cannot map guest RAM {path}: {e}") from None
            path.unlink(missing_ok=True)

    def _watchdog(self) -> None:
        """Watch the QEMU process and the serial log until close()."""
        assert self._paths is not None and self._res.proc is not None
        proc, pos, tail = self._res.proc, 0, b""
        pending = dict(BOOT_MARKS)
        while not self._stop_watch.is_set():
            try:
                with open(self._paths.serial, "rb") as f:
                    f.seek(pos)
                    data = f.read(1 << 20)
            except OSError:  # the run directory is going away: close() is running
                data = b""
            if data:
                pos += len(data)
                window = tail + data
                for name, mark in list(pending.items()):
                    if mark in window:
                        self._marks[name] = time.monotonic() - self._t0
                        del pending[name]
                        self._changed.set()
                if any(m in window for m in PANIC_MARKS):
                    time.sleep(0.1)  # let the rest of the panic message land
                    self._fail(self._panic_line())
                    return
                tail = window[-64:]
            rc = proc.poll()
            if rc is not None:
                time.sleep(0.05)  # let the last console bytes land before reporting
                self._fail(f"QEMU exited with status {rc}")
                return
            self._stop_watch.wait(BOOT_POLL_S if pending else WATCH_POLL_S)

    def _panic_line(self) -> str:
        for line in reversed(self.console_tail(400).splitlines()):
            if "Kernel panic - not syncing" in line:
                return "kernel panic: " + line.split("] ", 1)[-1].strip()
        return "kernel panic"

    def _fail(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        self._changed.set()
        session = self._session
        if session is not None:
            try:
                session.abort()  # unblocks a command waiting on the dead guest
            except Exception:  # noqa: BLE001 - best effort from the watchdog thread
                pass

    def _wait_ready(self, deadline: float) -> None:
        self._wait_mark("ready", deadline)

    def _wait_mark(self, name: str, deadline: float) -> None:
        """Wait until the watchdog has seen the console line BOOT_MARKS[name]."""
        while name not in self._marks:
            if self._dead is not None:
                raise self._error(f"boot failed: {self._dead}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(f"no {BOOT_MARKS[name].decode()!r} on the console within "
                                  f"{self.boot_timeout:g} s")
            self._changed.wait(min(left, 0.5))
            self._changed.clear()

    def close(self) -> None:
        """Kill and reap QEMU, drop mappings and connections, remove the run directory."""
        self._stop_watch.set()
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(timeout=5)
            self._watch = None
        self._res.release()
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if self._dead is None:
            self._dead = "closed"

    @property
    def info(self) -> dict[str, Any]:
        """The agent's ``info`` reply (uname, cmdline, vmcoreinfo, kallsyms...), fetched once."""
        if self._info is None:
            self._info = self.agent("info")
        return self._info

    @info.setter
    def info(self, value: dict[str, Any]) -> None:
        self._info = value

    @property
    def alive(self) -> bool:
        proc = self._res.proc
        return self._dead is None and proc is not None and proc.poll() is None

    # ----------------------------------------------------------------- console and errors
    def console_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the serial console."""
        if self._paths is None or not self._paths.serial.exists():
            return ""
        with open(self._paths.serial, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * max(n, 1)))
            text = f.read().decode(errors="replace").replace("\r", "")
        return "\n".join(text.splitlines()[-n:])

    def _error(self, what: str) -> GuestError:
        tail = self.console_tail(25)
        msg = f"{self.profile.name}: {what}\n--- console tail ---\n{tail}"
        proc = self._res.proc
        if proc is not None and proc.poll() is not None and self._paths is not None:
            try:
                err = self._paths.stderr.read_text(errors="replace").strip()
            except OSError:
                err = ""
            if err:
                msg += "\n--- QEMU stderr ---\n" + "\n".join(err.splitlines()[-10:])
        return GuestError(msg)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._error(self._dead)

    # ----------------------------------------------------------------- QMP / HMP
    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run a QMP command (``_`` in argument names become ``-``)."""
        return self._monitor_call(f"QMP {cmd}", lambda m: m.cmd(cmd, **args))

    def hmp(self, cmd: str) -> str:
        """Run a human-monitor command, return its text."""
        return str(self.qmp("human-monitor-command", command_line=cmd))

    def hmp_many(self, cmds: list[str]) -> list[str]:
        """Run many HMP commands pipelined over QMP; their texts in order."""
        return list(self._monitor_call("HMP commands", lambda m: m.hmp_many(cmds)))

    def _monitor_call(self, what: str, call: Any) -> Any:
        """``call(monitor)``; a monitor error from a QEMU that is gone or dying becomes the
        guest's failure ("``what``: QEMU is gone"), any other is raised as it is."""
        self._check_alive()
        assert self._monitor is not None
        try:
            return call(self._monitor)
        except MonitorError:
            proc = self._res.proc
            if not self.alive or proc is None or proc.poll() is not None or exiting(proc.pid):
                self._fail("QEMU exited")
                raise self._error(f"{what}: QEMU is gone") from None
            raise

    def stop(self) -> None:
        """Pause the vCPUs (memory and registers are then stable)."""
        self.qmp("stop")

    def cont(self) -> None:
        self.qmp("cont")

    @property
    def running(self) -> bool:
        return bool(self.qmp("query-status")["running"])

    # ----------------------------------------------------------------- fast reset
    def _ram_files(self) -> list[tuple[str, Path, int]]:
        """(backend id, path at boot, size) of each RAM file QEMU shares with the harness."""
        assert self._paths is not None
        files = [("ram0", self._paths.ram, self.mem_mb << 20)]
        if self.hotplug and self.profile.board.hotplug == "virtio-mem":
            files.append((VIRTIO_MEM_BACKEND, self._paths.backend(VIRTIO_MEM_BACKEND),
                          VIRTIO_MEM_MB << 20))
        return files

    def checkpoint(self) -> None:
        """Save the VM as it is now for :meth:`reset`: devices and CPUs by ``savevm`` into a
        qcow2 in the run directory, with ``x-ignore-shared`` so that QEMU skips the shared RAM
        files, and the RAM files' data extents copied by the harness (:mod:`.ramsnap`) in the
        same stop. If a virtqueue lies in RAM that a ROM blob covers (see :mod:`.ramsnap`),
        QEMU saves the RAM too (slower; :attr:`checkpoint_fast` False). Not with hotplugged
        DIMMs (their backends come and go)."""
        self._check_alive()
        if self._dimms:
            raise GuestError("checkpoint() with hotplugged DIMMs is not supported")
        image = self.rundir / "vmstate.qcow2"
        if not image.exists():
            try:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"],
                               check=True, capture_output=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as e:
                raise GuestError(f"cannot create the snapshot image: {e}") from None
            out = self.hmp(f"drive_add 0 if=none,id=vmstate,file={image},format=qcow2")
            if "OK" not in out:
                raise self._error(f"drive_add for snapshots failed: {out.strip()}")
        running = self.running
        if running:
            self.stop()
        try:
            fast = not rings_hit_roms(self._vrings(), ram_roms(self.hmp("info roms")))
            self.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "x-ignore-shared", "state": fast}])
            out = self.hmp("savevm ptlab")
            if out.strip():
                raise self._error(f"savevm failed: {out.strip()}")
            assert self.pid is not None
            try:
                self._ram_snaps = [(name, RamSnapshot.take(qemu_fd_of(self.pid, path), size))
                                   for name, path, size in self._ram_files()] if fast else []
            except OSError as e:
                raise self._error(f"cannot copy guest RAM: {e}") from None
        finally:
            if running:
                self.cont()
        self._checkpoint_running = running
        self._checkpointed = True
        self.checkpoint_fast = fast

    def backend_file(self, name: str = "ram0") -> Path:
        """``/proc/<QEMU pid>/fd/N``: QEMU's own descriptor of RAM backend ``name``'s file
        (unlinked after mapping), e.g. a raw image of guest RAM for tools that take a path."""
        path = next((p for n, p, _ in self._ram_files() if n == name), None)
        if path is None or self.pid is None:
            raise GuestError(f"no RAM backend {name!r}")
        try:
            return qemu_fd_of(self.pid, path)
        except OSError as e:
            raise self._error(f"RAM backend {name!r}: {e}") from None

    def _vrings(self) -> list[tuple[int, int]]:
        """Guest-physical ranges of every virtqueue's rings (QMP x-query-virtio*)."""
        rings: list[tuple[int, int]] = []
        for dev in self.qmp("x-query-virtio"):
            nvqs = int(self.qmp("x-query-virtio-status", path=dev["path"]).get("num-vqs", 0))
            for q in range(nvqs):
                rings += vring_ranges(self.qmp("x-query-virtio-queue-status",
                                               path=dev["path"], queue=q))
        return rings

    def _restore_ram(self) -> None:
        try:
            for name, snap in self._ram_snaps:
                snap.restore(self.memory.backend_map(name))
        except OSError as e:
            raise self._error(f"cannot restore guest RAM: {e}") from None

    @property
    def dimms(self) -> tuple[str, ...]:
        """Device ids of the DIMMs plugged now (:meth:`plug_dimm`): while any is, no
        :meth:`checkpoint` or :meth:`reset`."""
        return tuple(self._dimms)

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes of guest RAM the last checkpoint holds (the files' data extents)."""
        return sum(s.nbytes for _, s in self._ram_snaps)

    def reset(self) -> None:
        """Return to the last :meth:`checkpoint`: ``loadvm`` (devices, CPUs), the RAM files
        rewritten where they changed, then a new SSH session, made by the first :meth:`ssh`
        after it (the old one's TCP state went back in time with the guest; scopes that only
        read RAM or ask QEMU need none: ~0.3 s of guest and host CPU each). The device set
        must be the one checkpointed."""
        if not self._checkpointed:
            raise GuestError("reset() needs a checkpoint() first")
        self._check_alive()
        if self._dimms:
            raise GuestError("reset() with hotplugged DIMMs is not supported")
        if self.running:
            self.stop()
        # RAM before loadvm (virtio's post_load checks its rings in guest RAM) and again
        # after it: its machine reset rewrites ROM blobs that live in RAM (rom_reset: arm64's
        # -kernel Image, initrd and DTB). loadvm's CPU post_load flushes every translated
        # block (cpu_common_post_load), and the VM stays stopped until the RAM is back.
        self._restore_ram()  # (nothing to do after a checkpoint with RAM)
        out = self.hmp("loadvm ptlab")  # leaves a stopped VM stopped
        if out.strip():
            raise self._error(f"loadvm failed: {out.strip()}")
        self._restore_ram()
        if self._session is not None:
            self._session.abort()
            self._session = None
        self._reconnect = False
        if not self._checkpoint_running:
            return
        self.cont()
        self._reconnect = True
        # self.info still holds: same boot, same kernel as at the checkpoint

    def _connect(self, deadline: float, what: str) -> Session:
        """A new SSH session (the guest's), made by ``deadline``; GuestError "``what``: ..."."""
        assert self.ssh_port is not None
        try:
            session = Session.connect(
                self.ssh_port, self._key, self.image.host_key_pub, deadline=deadline,
                alive=lambda: self._dead is None,
            )
        except SshError as e:
            if self._dead is None:
                time.sleep(0.2)  # a dying QEMU: let the watchdog name the cause
            raise self._error(f"{what}: {self._dead or e}") from None
        self._session, self._reconnect = session, False
        return session

    # ----------------------------------------------------------------- SSH and agent
    def ssh(self, cmd: str, timeout: float = 30, stdin: bytes = b"") -> tuple[int, str, str]:
        """(status, stdout, stderr) of a shell command in the guest, fed ``stdin``."""
        self._check_alive()
        session = self._session
        t0 = time.monotonic()
        if session is None and self._reconnect:
            session = self._connect(t0 + timeout, "SSH after reset")
            timeout = max(timeout - (time.monotonic() - t0), 0.1)
        if session is None:
            raise self._error("no SSH session")
        try:
            return session.run(cmd, timeout=timeout, stdin=stdin)
        except SshError as e:
            if self._dead is None:
                time.sleep(0.2)  # a dying QEMU: let the watchdog name the cause
            raise self._error(f"SSH: {self._dead or e}") from None

    def agent(self, *args: str, timeout: float = 30) -> dict[str, Any]:
        """Run ``ptagent ARGS`` and return its reply object (guest/PROTOCOL.md): AgentError
        for the agent's error object, AgentProtocolError for any other reply."""
        status, out, err = self.ssh(shlex.join([AGENT, *args]), timeout=timeout)
        return parse_reply(args, status, out, err)

    # ----------------------------------------------------------------- memory
    @property
    def memory(self) -> SharedRAM:
        """Guest RAM (boot RAM and hotplugged memory) as a zero-copy PhysMemory."""
        if self._memory is None:
            raise GuestError("guest not running")
        if not self._layout_done:
            self._load_layout()
        return self._memory

    def _load_layout(self) -> None:
        """Place the mapped backends at their guest-physical addresses (from QMP)."""
        assert self._memory is not None
        for r in parse_mtree_ram(self.hmp("info mtree -f"), {"ram0"}):
            self._memory.add_range(r.pa, r.size, r.backend, r.offset)
        for dev in self.qmp("query-memory-devices"):
            data = dev.get("data", {})
            if dev.get("type") == "virtio-mem" and data.get("id") == VIRTIO_MEM_ID:
                self._memory.add_range(int(data["memaddr"]), int(data["max-size"]),
                                       VIRTIO_MEM_BACKEND)
        self._layout_done = True

    def pmem(self, chunk: int = 2 << 20) -> PmemsaveRAM:
        """A pmemsave-based PhysMemory over the same RAM ranges (cached; invalidate())."""
        ranges = self.memory.ranges()

        def dump(pa: int, size: int, path: Path) -> None:
            self.qmp("pmemsave", val=pa, size=size, filename=str(path))

        return PmemsaveRAM(dump, ranges, self.rundir, chunk=chunk)

def main(argv: list[str] | None = None) -> int:
    """``python -m ptharness.guest PROFILE [COMMAND...]``: boot, print boot phases and the
    kernel root, run COMMAND in the guest (if given), shut down."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m ptharness.guest", description=main.__doc__)
    ap.add_argument("profile")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    ap.add_argument("--hotplug", action="store_true")
    ap.add_argument("--mem-mb", type=int, default=1024)
    args = ap.parse_args(argv)
    try:
        with Guest(args.profile, mem_mb=args.mem_mb, hotplug=args.hotplug) as g:
            phases = " ".join(f"{k}={v:.2f}s" for k, v in g.timings.items())
            print(f"{args.profile}: {phases}")
            print(f"kernel root {g.kernel_root():#x}, format {g.kernel_format().name}")
            if args.command:
                status, out, err = g.ssh(shlex.join(args.command))
                sys.stdout.write(out)
                sys.stderr.write(err)
                return status
    except (GuestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
