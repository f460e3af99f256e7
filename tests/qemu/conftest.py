"""Real-guest tests: selection by architecture, profile and kernel; evidence of failures.

A test names its guest profile through a parameter called ``profile`` or a marker
``@pytest.mark.profile("x86_64-pti")``. Selection (``make test-qemu ARCH= PROFILE= KERNEL=``):
``PTLAB_ARCH=x86_64|arm64|all`` deselects the profiles of other architectures,
``PTLAB_PROFILE=a,b`` keeps only those profiles (tests without a profile, e.g. kernel-less QEMU
checks, run when no profile list is given or it names a base profile, ``x86_64`` or ``arm64``),
``PTLAB_KERNEL`` picks the kernel series of every image (:data:`ptharness.profiles.KERNELS`).
A bad value is one usage error.

Guests: the session fixture ``guest_pool`` (:class:`GuestPool`) boots each profile once per
process and checkpoints it; every scope that acquires a guest gets it back in that checkpointed
state (``Guest.reset``, ~0.5 s instead of a boot), so a test that changes its guest (secretmem,
module unload, planted entries, a busy process) cannot leak into another scope. A scope that
needs extra devices gets a pool guest of its own kind (x86 pool guests all carry
``-device vmcoreinfo``, :data:`POOL_DEVICES`). Tests that kill, panic or hotplug into a guest
boot their own. ``make test-qemu`` distributes with ``--dist loadscope`` and the scheduler of
:func:`pytest_xdist_make_scheduler`: the pool users of one profile form one work unit (one
boot; x86_64-pti's two, see :data:`SPLIT`), the heaviest units go first.
The terminal summary prints ``test_qemu_s``, ``boots``, ``resets`` (with the seconds of
Guest.reset() itself, summed; each SSH session follows with the next command),
``boot_to_agent_s[x86_64]`` (median of this run's x86_64 boots) and
``test_qemu_vs_boot_ratio``.

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
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
_boots: list[tuple[str, float | None]] = []  # (profile, boot_to_agent s or None) per start
_resets: list[float] = []  # seconds of each Guest.reset() (the session comes later, lazily)
_t_session: float | None = None  # controller: when the session started


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

    start, close, reset = Guest.start, Guest.close, Guest.reset

    def tracked_start(self: Any) -> None:
        _live.add(self)
        try:
            start(self)
        finally:
            _boots.append((self.profile.name, getattr(self, "boot_seconds", None)))

    def tracked_close(self: Any) -> None:
        if self in _live:
            _live.discard(self)
            _closed.append((_label(self), _evidence(self)))
        close(self)

    def tracked_reset(self: Any) -> None:
        t = time.monotonic()
        try:
            reset(self)
        finally:
            _resets.append(time.monotonic() - t)

    _patch.setattr(Guest, "start", tracked_start)
    _patch.setattr(Guest, "close", tracked_close)
    _patch.setattr(Guest, "reset", tracked_reset)


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


def pytest_sessionstart(session: pytest.Session) -> None:
    global _t_session
    _t_session = time.monotonic()


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = getattr(session.config, "workeroutput", None)
    if out is not None:  # an xdist worker: hand its boots and resets to the controller
        out["ptlab_boots"] = list(_boots)
        out["ptlab_resets"] = list(_resets)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # xdist controller, per finished worker
    out = getattr(node, "workeroutput", {})
    _boots.extend(tuple(b) for b in out.get("ptlab_boots", ()))
    _resets.extend(out.get("ptlab_resets", ()))


def pytest_terminal_summary(terminalreporter) -> None:  # shown under -q too
    terminalreporter.write_line(f"{SEED_ENV}={session_seed()} (set it to replay)")
    if _t_session is None or not _boots:
        return
    wall = time.monotonic() - _t_session
    x86 = [s for p, s in _boots if p == "x86_64" and s is not None]
    terminalreporter.write_line(f"test_qemu_s: {wall:.1f}")
    terminalreporter.write_line(f"boots: {len(_boots)}")
    terminalreporter.write_line(f"resets: {len(_resets)} ({sum(_resets):.1f} s)")
    if x86:
        b = statistics.median(x86)
        terminalreporter.write_line(f"boot_to_agent_s[x86_64]: {b:.2f}")
        terminalreporter.write_line(f"test_qemu_vs_boot_ratio: {wall / b:.1f}")


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


@contextmanager
def ram_dir() -> Iterator[Path]:
    """A private folder in RAM (where run directories go, /dev/shm) for guest dumps: a 1 GiB
    dump written there costs memory bandwidth, not disk. Removed on exit; it carries
    owner.pid, so a later Guest sweeps it if this process dies."""
    import shutil
    import tempfile

    from ptharness.guest import OWNER_FILE, run_base

    path = Path(tempfile.mkdtemp(prefix="ptlab-dump-", dir=run_base()))
    try:
        (path / OWNER_FILE).write_text(str(os.getpid()))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def gone(pid: int) -> bool:
    """True if ``pid`` no longer exists (reaped) — a zombie still counts as a leak."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


FAIL_FAST_S = 10  # a dead guest must be reported within this many seconds


def assert_cleaned(pid: int | None, rundir: Path) -> None:
    """A closed guest left nothing: its QEMU is reaped and its run directory is gone."""
    assert pid is not None and gone(pid), f"QEMU {pid} still exists"
    assert not rundir.exists(), f"run directory {rundir} left behind"


@pytest.fixture
def dump_dir() -> Iterator[Path]:
    """:func:`ram_dir` for one test."""
    with ram_dir() as path:
        yield path


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
    # hotplug classes last (stable): on a pool guest they leave a DIMM no reset removes
    items.sort(key=lambda it: bool(getattr(getattr(it, "cls", None), "hotplug", False)))
    if getattr(config, "workerinput", None) is not None:  # name pool units for the scheduler
        for item in items:
            profile = profile_of(item)
            if profile is not None and uses_pool(item):
                half = "/b" if profile in SPLIT and item.path.name in SECOND_HALF else ""
                _rename(item, pool_nodeid(item.nodeid, f"{profile}{half}"))


def pool_nodeid(nodeid: str, unit: str) -> str:
    """``nodeid`` tagged with its pool work unit: ``test@pool:UNIT``, or inside the params
    bracket ``test[p@pool:UNIT]`` (pytest 9 parses a node id's params up to its last "]": a
    tag after the bracket came back in reports as ``test[p]@pool:UNIT]``)."""
    tag = f"{POOL_UNIT}{unit}"
    return f"{nodeid[:-1]}{tag}]" if nodeid.endswith("]") else nodeid + tag


def pool_unit(nodeid: str) -> str | None:
    """The ``pool:UNIT`` scope a :func:`pool_nodeid` names, None for other node ids."""
    at = nodeid.rfind(POOL_UNIT)
    return nodeid[at + 1:].removesuffix("]") if at >= 0 else None


def _rename(item: pytest.Item, nodeid: str) -> None:
    """Give ``item`` the node id the xdist scheduler groups by (what xdist's own loadgroup
    does). pytest < 9 keeps it in ``_nodeid``, pytest 9 in ``_id`` (a NodeId); a rename that
    did not take is a usage error, not a silent boot per test scope."""
    ident = getattr(item, "_id", None)
    if ident is not None and hasattr(type(ident), "parse"):
        item._id = type(ident).parse(nodeid)
    else:
        item._nodeid = nodeid
    if item.nodeid != nodeid:
        raise pytest.UsageError(f"cannot name the pool unit of {item.nodeid}")


# Extra devices every pool guest of an architecture carries: with ``vmcoreinfo`` QEMU's dumps
# hold the kernel's VMCOREINFO note (the CLI tests need it), at no cost to the other tests, so
# one boot serves both (a fw_cfg file the kernel's qemu_fw_cfg writes once; no page table).
POOL_DEVICES: dict[str, tuple[str, ...]] = {"x86_64": ("vmcoreinfo",)}
# Architectures whose pool guests boot with hotplug slots (x86: pc-dimm slots and maxmem,
# DIMMs left offline), so that a hotplug test class takes the pool guest, last in its unit,
# instead of a boot of its own; the pool then drops that guest if a DIMM stays plugged.
POOL_HOTPLUG = frozenset({"x86_64"})


def pool_hotplug(profile: str) -> bool:
    from ptharness.profiles import get_profile

    return get_profile(profile).arch in POOL_HOTPLUG


class GuestPool:
    """This process's booted guests, one per (profile, extra devices), each checkpointed right
    after its boot.

    :meth:`acquire` hands a scope (class, module or test) the guest in its checkpointed state:
    booted on first use, else reset (``Guest.reset``) to the checkpoint. Other pool guests are
    paused meanwhile (no CPU spent on idle guests). A guest that died or cannot be reset is
    replaced by a new boot; a guest whose boot failed fails its later acquisitions at once
    with the same error.
    """

    def __init__(self) -> None:
        self._guests: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._failed: dict[tuple[str, tuple[str, ...]], str] = {}
        self._handed: set[tuple[str, tuple[str, ...]]] = set()  # left their checkpoint since

    def acquire(self, profile: str, devices: tuple[str, ...] = ()) -> Any:
        """The guest of ``profile`` (with these extra ``-device`` specs, e.g. ``vmcoreinfo``)
        at its checkpoint."""
        from ptharness.guest import Guest, GuestError
        from ptharness.profiles import get_profile

        arch = get_profile(profile).arch
        key = (profile, tuple(sorted({*POOL_DEVICES.get(arch, ()), *devices})))
        if key in self._failed:
            pytest.fail(f"{profile} pool guest failed earlier: {self._failed[key]}",
                        pytrace=False)
        for other_key, other in self._guests.items():
            if other_key != key and other.alive and other.running:
                other.stop()
        g = self._guests.get(key)
        if g is not None and key in self._handed:
            try:
                g.reset()
            except GuestError:
                g.close()
                g = None
        if g is None or not g.alive:
            if g is not None:
                g.close()
            g = Guest(profile, devices=key[1], hotplug=pool_hotplug(profile))
            try:
                g.start()
                g.checkpoint()
            except Exception as e:
                g.close()
                self._failed[key] = str(e).splitlines()[0]
                raise
            self._guests[key] = g
        self._handed.add(key)
        return g

    def discard_unresettable(self, profile: str) -> None:
        """Close ``profile``'s pool guests that a reset cannot bring back (a DIMM still
        plugged: the checkpoint's device set is gone); the next :meth:`acquire` boots again.
        A guest whose DIMMs were all removed stays: ``loadvm`` restores it (measured)."""
        for key in [k for k in self._guests if k[0] == profile]:
            if self._guests[key].dimms:
                self._guests.pop(key).close()
                self._handed.discard(key)

    def close(self) -> None:
        """Close every guest normally, then check that each left nothing behind (its QEMU
        reaped, its run directory gone): the normal close's check, on every run."""
        closed = [(g.pid, g.rundir) for g in self._guests.values() if g.pid is not None]
        for g in self._guests.values():
            g.close()
        self._guests.clear()
        for pid, rundir in closed:
            assert_cleaned(pid, rundir)


@pytest.fixture(scope="session")
def guest_pool() -> Any:
    """This process's :class:`GuestPool` (closed at the end of the session)."""
    pool = GuestPool()
    yield pool
    pool.close()


@pytest.fixture(scope="class")
def target(request: pytest.FixtureRequest) -> Any:
    """A kernel-scenario target (``ptharness.kernel_scenarios.Target``) on the test class's
    profile: the pool's guest, reset to its checkpoint for the class; a class that sets
    ``hotplug = True`` gets the pool guest too where pool guests have hotplug slots
    (:data:`POOL_HOTPLUG`; the pool drops it after the class if a DIMM stays plugged), else
    a guest with hotplug slots booted for it and closed after it."""
    from ptharness import kernel_scenarios as ks
    from ptharness.guest import Guest

    profile = str(request.cls.profile)
    rng = rng_for(f"{request.module.__name__}:{profile}")
    hotplug = getattr(request.cls, "hotplug", False)
    if not hotplug or pool_hotplug(profile):
        pool = request.getfixturevalue("guest_pool")
        try:
            yield ks.Target.of(pool.acquire(profile), rng)
        finally:
            if hotplug:
                pool.discard_unresettable(profile)
        return
    g = Guest(profile, hotplug=True)
    g.start()
    try:
        yield ks.Target.of(g, rng)
    finally:
        g.close()


def uses_pool(item: pytest.Item) -> bool:
    """Whether ``item`` runs on a pool guest (directly, or through ``target``)."""
    names = getattr(item, "fixturenames", ())
    if "guest_pool" in names:
        return True
    if "target" not in names:
        return False
    profile = profile_of(item)
    hotplug = getattr(getattr(item, "cls", None), "hotplug", False)
    return not hotplug or (profile is not None and pool_hotplug(profile))


# A profile's pool tests form one work unit (one boot), but those of a profile in SPLIT form
# two: the kernel-user scenarios (/b) and the rest. x86_64-pti's unit alone would be one
# worker's serial job of ~60 s quiet; split, both workers can share it for the price of a
# second boot (each worker's pool boots a profile once, whichever halves it runs).
SPLIT = frozenset({"x86_64-pti"})
SECOND_HALF = frozenset({"test_kernel_scenarios.py", "test_kernel_modules.py",
                         "test_guest_lifecycle.py", "test_wx_planted.py"})
# Seconds a work unit took (boots included; `make test-qemu ARCH=all`, two workers, load ~2),
# for the heaviest-first order: pool units by profile and half, the others by file (and class).
UNIT_WEIGHT = {
    "pool:x86_64": 34, "pool:x86_64-pti": 27, "pool:arm64": 23, "pool:x86_64-la57": 22,
    "pool:arm64-kpti": 19, "pool:x86_64-pti/b": 17,
    "test_guest_lifecycle.py": 4, "test_cli_arm64_qemu.py": 12, "test_cli_live_qemu.py": 8,
    "test_kernel_hotplug.py::TestArm64": 4, "test_kernel_hotplug.py::TestArm64Kpti": 4,
}
POOL_UNIT = "@pool:"  # nodeid suffix naming a test's pool work unit


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope``, with one work unit per pool profile (two for :data:`SPLIT`; the
    tests of a unit share one boot) and units ordered heaviest first by :data:`UNIT_WEIGHT`,
    then by their number of tests."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PoolScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return pool_unit(nodeid) or super()._split_scope(nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            def rank(scope: str) -> tuple[int, int]:
                key = scope if scope.startswith(POOL_UNIT[1:]) else scope.rsplit("/", 1)[-1]
                return (-UNIT_WEIGHT.get(key, 0), -len(self.workqueue[scope]))

            self.workqueue.move_to_end(min(self.workqueue, key=rank), last=False)
            super()._assign_work_unit(node)

    return PoolScheduling(config, log)


def assert_predicted(out: Any, profile: str) -> None:
    """A kernel scenario's model and real tables agree: print ``differ[...]`` and fail with
    the comparison's summary otherwise."""
    cmp = out.comparison
    print(f"differ[{cmp.scenario}/{profile}]: {cmp.differ} pages of {cmp.pages}")
    assert cmp.pages > 0, f"{cmp.scenario}: nothing compared"
    assert cmp.equal, cmp.summary()
