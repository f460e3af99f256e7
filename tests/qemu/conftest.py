"""Real-guest tests: select by architecture (PTLAB_ARCH); one test class or module per profile.

A test names its guest profile through a parameter called ``profile`` or a marker
``@pytest.mark.profile("x86_64-pti")``. ``PTLAB_ARCH=x86_64|arm64|all`` (``make test-qemu``)
deselects the profiles of other architectures. ``make test-qemu`` distributes with
``--dist loadscope``: a class- or module-scoped guest boots once, on the worker running its scope.
"""

from __future__ import annotations

import os

import pytest


def profile_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "profile" in callspec.params:
        return str(callspec.params["profile"])
    mark = item.get_closest_marker("profile")
    return str(mark.args[0]) if mark else None


def arch_of(profile: str) -> str:
    return "arm64" if profile.startswith("arm64") else "x86_64"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "profile(name): the guest profile a test boots")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = os.environ.get("PTLAB_ARCH", "all")
    if wanted not in ("all", "x86_64", "arm64"):
        raise pytest.UsageError(f"PTLAB_ARCH must be x86_64, arm64 or all, not {wanted!r}")
    keep, drop = [], []
    for item in items:
        profile = profile_of(item)
        if profile is not None:
            if wanted != "all" and arch_of(profile) != wanted:
                drop.append(item)
                continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
