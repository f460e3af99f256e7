"""A run directory's reaper: what cleans up after a harness process that cannot.

A harness process killed with SIGKILL runs no ``finally`` and no finalizer. Two things still
end its guests: QEMU is started with PR_SET_PDEATHSIG (it gets SIGKILL when the thread that
forked it exits, see :func:`die_with_parent`), and every run directory gets a reaper, a tiny
``sh`` in its own session that blocks reading a pipe whose only writer is the harness process.
When that process dies, for any reason, the kernel closes the pipe, ``read`` returns and the
reaper kills every process whose command line names the run directory (QEMU, qemu-img) and
removes the directory. A harness that closes its guest normally kills the reaper first
(:func:`stop`), so the reaper never acts on a live harness's behalf.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path

# $1: the run directory. `read` returns at EOF, i.e. when the owner process is gone.
_SCRIPT = r"""
read -r _ || :
for f in $(grep -laF -- "$1/" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" = "$$" ] || kill -9 "$p" 2>/dev/null
done
rm -rf -- "$1"
"""

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


class Reaper:
    """The reaper process of one run directory and the write end of its pipe."""

    def __init__(self, proc: subprocess.Popen[bytes], fd: int) -> None:
        self.proc = proc
        self.fd = fd


def watch(rundir: Path) -> Reaper:
    """Start the reaper of ``rundir`` (which must exist); keep the result until :func:`stop`."""
    rfd, wfd = os.pipe()  # both ends close-on-exec: no child of ours inherits the writer
    try:
        proc = subprocess.Popen(
            ["sh", "-c", _SCRIPT, "ptlab-reaper", str(rundir)], stdin=rfd,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    except OSError:
        os.close(wfd)
        raise
    finally:
        os.close(rfd)
    return Reaper(proc, wfd)


def stop(reaper: Reaper | None) -> None:
    """Retire a reaper without letting it act (its owner cleans up itself)."""
    if reaper is None:
        return
    if reaper.proc.poll() is None:
        reaper.proc.kill()
    reaper.proc.wait()
    os.close(reaper.fd)


def die_with_parent(parent: int) -> None:
    """``preexec_fn`` of QEMU: SIGKILL when the forking thread exits; exit at once if
    ``parent`` died between fork and prctl (the signal would then never come)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
