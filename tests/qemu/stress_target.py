"""The guest owner that `make stress` interrupts (Ctrl-C of `make test-qemu`, SIGKILL of the
xdist worker): not a test on its own, so its file name keeps it out of normal collection;
``ptharness.stress`` names the file explicitly."""

from __future__ import annotations

import os
import time

import pytest
from ptharness.guest import Guest, run_base
from ptlab.walk import Walker

pytestmark = pytest.mark.qemu


@pytest.mark.profile("x86_64")
def test_interrupt_target() -> None:
    """Boot, then walk and ping until interrupted (never passes on its own: 60 s)."""
    assert run_base() == os.environ.get("PTLAB_RUNDIR")
    with Guest(os.environ.get("PTLAB_PROFILE", "").split(",")[0] or "x86_64") as g:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            g.stop()
            Walker(g.kernel_format(), g.memory, g.kernel_root()).run_table()
            g.cont()
            g.agent("ping")
    pytest.fail("not interrupted within 60 s")
