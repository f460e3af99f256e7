"""Real-guest tests: selection by architecture, profile and kernel; evidence of failures.

A test names its guest profile through a parameter called ``profile`` or a marker
``@pytest.mark.profile("x86_64-pti")``. Selection (``make test-qemu ARCH= PROFILE= KERNEL=``):
``PTLAB_ARCH=x86_64|arm64|all`` deselects the profiles of other architectures,
``PTLAB_PROFILE=a,b`` keeps only those profiles (tests without a profile, e.g. kernel-less QEMU
checks, run when no profile list is given or it names a base profile, ``x86_64`` or ``arm64``),
``PTLAB_KERNEL`` picks the kernel series of every image (:data:`ptharness.profiles.KERNELS`).
A bad value is one usage error. ``make test-qemu`` distributes with ``--dist loadscope``: a
class- or module-scoped guest boots once, on the worker running its scope.

Evidence: when a test fails, its report and, for each guest of its profile this process had
started (running, or closed during the test), the serial console, QEMU's stderr and the QMP
transcript are copied to ``$PTLAB_ARTIFACTS/<test id>/`` (default ``artifacts/<UTC time>/``;
``make test-qemu`` also writes its JUnit XML there).

Random choices (sampled VAs, the page a test plants, stop timing) come from one seed: the
environment's ``PTLAB_SEED`` (decimal) to replay a run, else a fresh one. It is printed in the
session header, the summary and every failure report; xdist workers get the controller's. Use the
``seeded_rng`` fixture, or :func:`rng_for` with a key that names what the numbers are for.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ptharness.profiles import ARCHES, get_kernel, select_profiles

SEED_ENV = "PTLAB_SEED"
ARTIFACTS_ENV = "PTLAB_ARTIFACTS"
REPO = Path(__file__).resolve().parents[2]
EVIDENCE_FILES = ("serial.log", "qemu.err", "qmp.log")  # in a guest's run directory
EVIDENCE_TAIL = 1 << 20  # bytes kept of each file (its end)
_seed: int | None = None  # this process's copy of the session seed
_artifacts: Path | None = None  # this run's artifacts folder (created on the first failure)
_live: weakref.WeakSet[Any] = weakref.WeakSet()  # guests started by this process, not closed
_closed: list[tuple[str, dict[str, bytes]]] = []  # (label, evidence) of guests closed lately
_patch = pytest.MonkeyPatch()


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


def _choose_artifacts(config: pytest.Config) -> Path:
    worker = getattr(config, "workerinput", None)
    if worker is not None and ARTIFACTS_ENV in worker:
        return Path(worker[ARTIFACTS_ENV])
    text = os.environ.get(ARTIFACTS_ENV)
    if text:
        return Path(text).resolve()
    return REPO / "artifacts" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _evidence(guest: Any) -> dict[str, bytes]:
    """The ends of a guest's console, QEMU stderr and QMP transcript (files that exist)."""
    paths = getattr(guest, "_paths", None)
    out: dict[str, bytes] = {}
    if paths is None:
        return out
    for name in EVIDENCE_FILES:
        try:
            with open(paths.rundir / name, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - EVIDENCE_TAIL))
                out[name] = f.read()
        except OSError:
            continue
    return out


def _label(guest: Any) -> str:
    return f"{guest.profile.name}-{id(guest):x}"


def _track_guests() -> None:
    """Wrap Guest.start / Guest.close to know the live guests and keep a closing guest's
    evidence until the running test's report is made."""
    from ptharness.guest import Guest

    start, close = Guest.start, Guest.close

    def tracked_start(self: Any) -> None:
        _live.add(self)
        start(self)

    def tracked_close(self: Any) -> None:
        if self in _live:
            _live.discard(self)
            _closed.append((_label(self), _evidence(self)))
        close(self)

    _patch.setattr(Guest, "start", tracked_start)
    _patch.setattr(Guest, "close", tracked_close)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "profile(name): the guest profile a test boots")
    global _seed, _artifacts
    _seed = _choose_seed(config)
    _artifacts = _choose_artifacts(config)
    _track_guests()


def pytest_unconfigure(config: pytest.Config) -> None:
    _patch.undo()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist controller, per worker
    node.workerinput[SEED_ENV] = session_seed()
    node.workerinput[ARTIFACTS_ENV] = str(_artifacts)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"{SEED_ENV}={session_seed()} (set it to replay this run's random choices)",
            f"failure evidence goes to {_artifacts}"]


def pytest_terminal_summary(terminalreporter) -> None:  # shown under -q too
    terminalreporter.write_line(f"{SEED_ENV}={session_seed()} (set it to replay)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    _closed.clear()  # evidence of guests closed by earlier tests


def _save_evidence(item: pytest.Item, report: pytest.TestReport) -> Path:
    """Write the failed ``report`` and its guests' evidence under the artifacts folder."""
    assert _artifacts is not None
    name = re.sub(r"[^A-Za-z0-9_.\[\]-]+", "_", item.nodeid).strip("_")[:180]
    folder = _artifacts / name / report.when
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failure.txt").write_text(
        f"{item.nodeid} failed in {report.when}\n{SEED_ENV}={session_seed()}\n\n"
        f"{report.longreprtext}\n")
    profile = profile_of(item)
    guests = [(_label(g), _evidence(g)) for g in list(_live)
              if profile is None or g.profile.name == profile]
    for label, files in [*_closed, *guests]:
        for fname, data in files.items():
            (folder / label).mkdir(exist_ok=True)
            (folder / label / fname).write_bytes(data)
    return folder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed:
        report.sections.append(("random seed", f"replay with {SEED_ENV}={session_seed()}"))
        try:
            folder = _save_evidence(item, report)
            report.sections.append(("evidence", f"console, QMP transcript, report: {folder}"))
        except OSError as e:
            report.sections.append(("evidence", f"not saved: {e}"))
    return report


@pytest.fixture(scope="session")
def rng_factory() -> Callable[[str], random.Random]:
    """:func:`rng_for`, for tests (and session fixtures) that need several generators."""
    return rng_for


@pytest.fixture
def seeded_rng(request: pytest.FixtureRequest) -> random.Random:
    """A generator for this test, from the session seed and the test's id."""
    return rng_for(request.node.nodeid)


def selected_profiles() -> tuple[set[str], bool]:
    """The profile names PTLAB_ARCH / PTLAB_PROFILE select, and whether tests without a
    profile run too. pytest.UsageError (one line) for a bad value, also of PTLAB_KERNEL."""
    names = os.environ.get("PTLAB_PROFILE", "")
    try:
        get_kernel(os.environ.get("PTLAB_KERNEL"))
        chosen = select_profiles(os.environ.get("PTLAB_ARCH", "all"), names)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    picked = {p.name for p in chosen}
    return picked, not names or bool(picked & set(ARCHES))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    picked, profileless = selected_profiles()
    keep, drop = [], []
    for item in items:
        profile = profile_of(item)
        wanted = profileless if profile is None else profile in picked
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="class")
def target(request: pytest.FixtureRequest) -> Any:
    """A kernel-scenario target (``ptharness.kernel_scenarios.Target``) on the test class's
    profile, booted once per class (with hotplug slots if the class sets ``hotplug = True``)
    and closed when the class is done."""
    from ptharness import kernel_scenarios as ks
    from ptharness.guest import Guest

    profile = str(request.cls.profile)
    g = Guest(profile, hotplug=bool(getattr(request.cls, "hotplug", False)))
    g.start()
    try:
        yield ks.Target.of(g, rng_for(f"{request.module.__name__}:{profile}"))
    finally:
        g.close()


def assert_predicted(out: Any, profile: str) -> None:
    """A kernel scenario's model and real tables agree: print ``differ[...]`` and fail with
    the comparison's summary otherwise."""
    cmp = out.comparison
    print(f"differ[{cmp.scenario}/{profile}]: {cmp.differ} pages of {cmp.pages}")
    assert cmp.pages > 0, f"{cmp.scenario}: nothing compared"
    assert cmp.equal, cmp.summary()
