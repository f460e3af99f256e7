"""Fixtures the unit tests share."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parents[2] / "guest"
HOST_TARGET = {"x86_64": "x86_64", "aarch64": "arm64"}  # guest/Makefile's ptagent-<arch>


@pytest.fixture(scope="session")
def agent() -> Path:
    """ptagent built for the host (gcc and make are host dependencies: images/host-deps.sh)."""
    arch = HOST_TARGET.get(platform.machine())
    assert arch, f"no ptagent build for a {platform.machine()} host"
    subprocess.run(["make", "-s", "-C", str(GUEST), f"build/ptagent-{arch}"], check=True,
                   timeout=120)
    return GUEST / "build" / f"ptagent-{arch}"
