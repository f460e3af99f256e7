"""The guest owner the stress run kills: ``python -m ptharness.stress_child PROFILE ACTIVITY S``.

Boots a :class:`~ptharness.guest.Guest` (from a second thread with a fourth argument
``thread``) and keeps it busy with ACTIVITY for S seconds:
``idle``, ``walk`` (stop, walk the whole kernel half over the shared RAM, continue; again) or
``ssh`` (agent ``ping`` and shell commands; again). Each step is one JSON line on stdout:
``{"event": "start", "pid"}``, ``{"event": "ready", "qemu", "rundir"}``, ``{"event":
ACTIVITY}``, then ``{"event": "done"}`` (exit 0) or ``{"event": "error", "message"}`` with the
GuestError's text (exit 3). The stress driver kills QEMU or this process at random moments.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from ptlab.walk import Walker

from .errors import GuestError
from .guest import Guest
from .image import ImageError

ACTIVITIES = ("idle", "walk", "ssh")


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def busy(g: Guest, activity: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    emit(activity)
    while time.monotonic() < end:
        if activity == "walk":
            g.stop()
            Walker(g.kernel_format(), g.memory, g.kernel_root()).run_table()
            g.cont()
        elif activity == "ssh":
            g.agent("ping")
            g.ssh("cat /proc/meminfo > /dev/null; sleep 0.1")
        else:
            g.qmp("query-status")
            time.sleep(0.1)


def own(profile: str, activity: str, seconds: float) -> int:
    try:
        with Guest(profile) as g:
            emit("ready", qemu=g.pid, rundir=str(g.rundir))
            busy(g, activity, seconds)
    except GuestError as e:
        emit("error", message=str(e))
        return 3
    except (ValueError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emit("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``PROFILE ACTIVITY SECONDS [thread]``: with ``thread``, the guest is owned by a
    thread other than the main one (no PDEATHSIG for its QEMU: the reaper alone cleans up)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 4) or args[1] not in ACTIVITIES or args[3:] not in ([], ["thread"]):
        print(f"usage: python -m ptharness.stress_child PROFILE {'|'.join(ACTIVITIES)} SECONDS "
              "[thread]", file=sys.stderr)
        return 2
    profile, activity, seconds = args[0], args[1], float(args[2])
    emit("start", pid=os.getpid())
    if args[3:] != ["thread"]:
        return own(profile, activity, seconds)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(own(profile, activity, seconds)))
    t.start()
    t.join()
    return rc[0] if rc else 1


if __name__ == "__main__":
    raise SystemExit(main())
