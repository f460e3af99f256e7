"""Real-guest tests: select by architecture (PTLAB_ARCH); one test class or module per profile.

A test names its guest profile through a parameter called ``profile`` or a marker
``@pytest.mark.profile("x86_64-pti")``. ``PTLAB_ARCH=x86_64|arm64|all`` (``make test-qemu``)
deselects the profiles of other architectures. ``make test-qemu`` distributes with
``--dist loadscope``: a class- or module-scoped guest boots once, on the worker running its scope.

Random choices (sampled VAs, the page a test plants, stop timing) come from one seed: the
environment's ``PTLAB_SEED`` (decimal) to replay a run, else a fresh one. It is printed in the
session header, the summary and every failure report; xdist workers get the controller's. Use the
``seeded_rng`` fixture, or :func:`rng_for` with a key that names what the numbers are for.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable

import pytest

SEED_ENV = "PTLAB_SEED"
_seed: int | None = None  # this process's copy of the session seed


def _choose_seed(config: pytest.Config) -> int:
    worker = getattr(config, "workerinput", None)
    if worker is not None and SEED_ENV in worker:
        return int(worker[SEED_ENV])  # an xdist worker: the controller's seed
    text = os.environ.get(SEED_ENV)
    if text is None:
        return secrets.randbits(63)
    try:
        return int(text, 10)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be a decimal integer, not {text!r}") from None


def session_seed() -> int:
    if _seed is None:
        raise RuntimeError("the session seed is chosen in pytest_configure")
    return _seed


def rng_for(key: str) -> random.Random:
    """A generator for ``key`` (e.g. a test id or profile) derived from the session seed: the
    same seed and key give the same numbers whatever ran before."""
    return random.Random(f"{session_seed()}:{key}")


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
    global _seed
    _seed = _choose_seed(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist controller, per worker
    node.workerinput[SEED_ENV] = session_seed()


def pytest_report_header(config: pytest.Config) -> str:
    return f"{SEED_ENV}={session_seed()} (set it to replay this run's random choices)"


def pytest_terminal_summary(terminalreporter) -> None:  # shown under -q too
    terminalreporter.write_line(f"{SEED_ENV}={session_seed()} (set it to replay)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed:
        report.sections.append(("random seed", f"replay with {SEED_ENV}={session_seed()}"))
    return report


@pytest.fixture(scope="session")
def rng_factory() -> Callable[[str], random.Random]:
    """:func:`rng_for`, for tests (and session fixtures) that need several generators."""
    return rng_for


@pytest.fixture
def seeded_rng(request: pytest.FixtureRequest) -> random.Random:
    """A generator for this test, from the session seed and the test's id."""
    return rng_for(request.node.nodeid)


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
