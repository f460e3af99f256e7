"""Guest profiles and the QEMU command line they produce; selecting profiles and kernels
(``make test-qemu ARCH= PROFILE= KERNEL=``) and the evidence a failing real-guest test leaves."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ptharness.profiles import (
    DEFAULT_KERNEL,
    KERNELS,
    PROFILES,
    RunPaths,
    get_kernel,
    get_profile,
    kernel_cmdline,
    kernel_series,
    qemu_command,
    select_profiles,
)

REPO = Path(__file__).resolve().parents[2]


def argv_for(name: str, **kw) -> list[str]:
    return qemu_command(
        get_profile(name), kernel=Path("/k"), initrd=Path("/i"), paths=RunPaths(Path("/run/x")),
        ssh_port=2222, key_b64="S0VZ", **kw,
    )


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_required_profiles():
    assert set(PROFILES) >= {"x86_64", "x86_64-la57", "x86_64-pti", "arm64", "arm64-kpti"}
    with pytest.raises(ValueError, match="known"):
        get_profile("sparc")


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_common_settings(name):
    p = get_profile(name)
    argv = argv_for(name)
    assert argv[0] == p.qemu and opt(argv, "-accel") == ["tcg"]
    append = opt(argv, "-append")[0]
    assert "secretmem.enable=1" in append and append.endswith("ptlab.key=S0VZ")
    assert f"console={p.console}" in append
    assert opt(argv, "-machine") == [f"{p.machine},memory-backend=ram0"]
    assert "memory-backend-file,id=ram0,size=1024M,mem-path=/run/x/ram0,share=on" in argv
    assert "socket,id=gdb0,path=/run/x/gdb.sock,server=on,wait=off" in argv
    assert opt(argv, "-gdb") == ["chardev:gdb0"]
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22" in argv


def test_profile_specifics():
    assert opt(argv_for("x86_64"), "-cpu") == ["max,-la57"]
    assert opt(argv_for("x86_64-la57"), "-cpu") == ["max"]
    assert get_profile("x86_64-la57").entry == "la57"  # PVH entry never enables 5-level paging
    assert "pti=on" in opt(argv_for("x86_64-pti"), "-append")[0]
    assert opt(argv_for("arm64"), "-cpu") == ["max,pauth-impdef=on"]
    assert "kpti=1" in opt(argv_for("arm64-kpti"), "-append")[0]
    assert get_profile("arm64").ram_base == 0x4000_0000


def test_boot_files_follow_the_profile_entry():
    """PVH profiles boot the vmlinux; la57 boots its 5-level entry with the vmlinux placed by
    QEMU's loader device; an image without those files (arm64) boots its packaged kernel."""
    from types import SimpleNamespace

    from ptharness.guest import boot_files

    x86 = SimpleNamespace(kernel="/img/bzImage", vmlinux="/img/vmlinux",
                          la57_entry="/img/la57entry")
    arm = SimpleNamespace(kernel="/img/Image", vmlinux=None, la57_entry=None)
    assert boot_files(get_profile("x86_64"), x86) == (Path("/img/vmlinux"), None)
    assert boot_files(get_profile("x86_64-pti"), x86) == (Path("/img/vmlinux"), None)
    assert boot_files(get_profile("x86_64-la57"), x86) == (
        Path("/img/la57entry"), Path("/img/vmlinux"))
    assert boot_files(get_profile("arm64"), arm) == (Path("/img/Image"), None)
    bz = dataclasses.replace(get_profile("x86_64-la57"), entry="bzimage")
    assert boot_files(bz, x86) == (Path("/img/bzImage"), None)
    with pytest.raises(ValueError, match="entry 'pvhh'"):
        dataclasses.replace(bz, entry="pvhh")
    argv = argv_for("x86_64-la57", loader=Path("/img/vmlinux"))
    assert opt(argv, "-kernel") == ["/k"] and "loader,file=/img/vmlinux" in opt(argv, "-device")
    assert not any(a.startswith("loader,") for a in opt(argv_for("x86_64"), "-device"))


def test_hotplug_geometry():
    x86 = argv_for("x86_64", hotplug=True)
    assert opt(x86, "-m") == ["1024M,slots=4,maxmem=8192M"]
    arm = argv_for("arm64", hotplug=True, mem_mb=512)
    assert opt(arm, "-m") == ["512M,maxmem=4096M"]
    assert any(a.startswith("virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0") for a in arm)
    assert "memhp_default_state=online_movable" in opt(arm, "-append")[0]
    assert not any("virtio-mem" in a for a in argv_for("arm64"))
    # 6.12 onlines hot-added memory itself (MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO): x86 DIMMs
    # must stay offline until the test onlines them, as on 6.1
    assert "memhp_default_state=offline" in opt(x86, "-append")[0]
    assert "memhp_default_state" not in opt(argv_for("x86_64"), "-append")[0]


@pytest.mark.parametrize("kw", [{"mem_mb": 0}, {"mem_mb": 1023}, {"ssh_port": 0},
                                {"mem_mb": 8192, "hotplug": True}])
def test_bad_arguments(kw):
    port = kw.pop("ssh_port", 2222)
    with pytest.raises(ValueError):
        qemu_command(get_profile("x86_64"), kernel=Path("/k"), initrd=Path("/i"),
                     paths=RunPaths(Path("/r")), ssh_port=port, key_b64="x", **kw)


def test_cmdline_order():
    line = kernel_cmdline(get_profile("x86_64-pti"), "QUJD")
    assert line.split()[0] == "console=ttyS0" and line.split()[-1] == "ptlab.key=QUJD"


def names(arch: str | None, wanted: str | None) -> list[str]:
    return [p.name for p in select_profiles(arch, wanted)]


def test_select_profiles():
    assert names(None, None) == list(PROFILES) == names("all", "")
    assert names("x86_64", None) == ["x86_64", "x86_64-la57", "x86_64-pti"]
    assert names("arm64", "") == ["arm64", "arm64-kpti"]
    assert names("all", "x86_64-pti") == ["x86_64-pti"]
    assert names("all", "arm64-kpti, x86_64,arm64-kpti") == ["arm64-kpti", "x86_64"]
    assert names("x86_64", "x86_64-pti,arm64") == ["x86_64-pti"]  # ARCH narrows PROFILE


@pytest.mark.parametrize("arch, wanted, message", [
    ("sparc", None, "unknown arch 'sparc'; known: x86_64, arm64, all"),
    ("all", "x86_64,pti", "unknown guest profile 'pti'; known: x86_64, "),
    ("all", "x86_64,", "empty profile name in 'x86_64,'"),
    ("arm64", "x86_64-la57", "profiles 'x86_64-la57' include none of arch arm64"),
])
def test_select_profiles_bad_input(arch: str, wanted: str | None, message: str):
    with pytest.raises(ValueError) as err:
        select_profiles(arch, wanted)
    assert str(err.value).startswith(message)


def test_kernels():
    assert DEFAULT_KERNEL == KERNELS[0] == "6.1"
    assert get_kernel(None) == get_kernel("") == DEFAULT_KERNEL
    assert [get_kernel(k) for k in KERNELS] == list(KERNELS)
    with pytest.raises(ValueError, match=r"^unknown kernel '5.10'; known: 6\.1"):
        get_kernel("5.10")
    assert "6.12" in KERNELS
    assert kernel_series("6.1.0-57-arm64") == "6.1"
    assert kernel_series("6.12.117+deb12-amd64") == "6.12"
    for bad in ("6.10.1-amd64", "5.10.0-30-amd64", ""):
        with pytest.raises(ValueError, match="no known series"):
            kernel_series(bad)
    # arm64 6.12 is 52-bit LPA2 on 5 levels, 6.1 48-bit on 4; x86 does not change
    levels = {p.name: (p.levels_on("6.1"), p.levels_on("6.12")) for p in PROFILES.values()}
    assert levels == {"x86_64": (4, 4), "x86_64-la57": (5, 5), "x86_64-pti": (4, 4),
                      "arm64": (4, 5), "arm64-kpti": (4, 5)}
    with pytest.raises(ValueError, match="unknown kernel"):
        PROFILES["arm64"].levels_on("6.6")


def pytest_in(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest in a subprocess (its own conftest, hooks and environment)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PTLAB_", "PYTEST_"))}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env={**full, **env}, capture_output=True, text=True,
                          timeout=120)


def collected(**env: str) -> set[str]:
    proc = pytest_in(REPO, "-q", "--collect-only", "-m", "qemu", "tests/qemu", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {ln for ln in proc.stdout.splitlines() if "::" in ln}


def test_profile_shards_partition_the_qemu_tests():
    """One job per profile (the CI matrix) runs every real-guest test, each once; tests
    without a profile (kernel-less QEMU checks) run in the base profiles' jobs."""
    every = collected()
    shards = {p: collected(PTLAB_PROFILE=p, PTLAB_KERNEL=DEFAULT_KERNEL) for p in PROFILES}
    assert set().union(*shards.values()) == every
    profileless = shards["x86_64"] & shards["arm64"]
    assert any("test_q35_split_above_4g" in t for t in profileless)
    for a, b in itertools.combinations(PROFILES, 2):
        assert shards[a] & shards[b] <= profileless, (a, b)
    for p in PROFILES:  # a parametrized test lands in its profile's shard only
        lifecycle = f"tests/qemu/test_guest_lifecycle.py::test_kernel_root_has_witnesses[{p}]"
        assert {q for q in PROFILES if lifecycle in shards[q]} == {p}
    assert not shards["x86_64-pti"] & profileless
    assert collected(PTLAB_PROFILE="x86_64-pti,arm64-kpti") == \
        shards["x86_64-pti"] | shards["arm64-kpti"]
    assert collected(PTLAB_ARCH="arm64") == shards["arm64"] | shards["arm64-kpti"]
    assert collected(PTLAB_ARCH="x86_64", PTLAB_PROFILE="x86_64,arm64") == shards["x86_64"]


@pytest.mark.parametrize("env, message", [
    ({"PTLAB_KERNEL": "6.99"}, "unknown kernel '6.99'"),
    ({"PTLAB_PROFILE": "x86_64-pit"}, "unknown guest profile 'x86_64-pit'"),
    ({"PTLAB_ARCH": "riscv64"}, "unknown arch 'riscv64'"),
])
def test_qemu_tests_bad_selection_is_a_usage_error(env: dict[str, str], message: str):
    proc = pytest_in(REPO, "-q", "--collect-only", "-m", "qemu", "tests/qemu", **env)
    assert proc.returncode == 4  # pytest's ExitCode.USAGE_ERROR
    assert f"ERROR: {message}" in proc.stderr and "Traceback" not in proc.stderr


FAILING_TEST = """
import pytest
from ptharness.guest import Guest
from ptharness.profiles import RunPaths

import conftest


@pytest.mark.profile("x86_64")
def test_fails_with_a_guest(tmp_path):
    g = Guest("x86_64")
    g._paths = RunPaths(tmp_path)  # a guest as Guest.start leaves it, without booting
    (tmp_path / "serial.log").write_text("[    0.000000] Linux version 6.1\\nconsole end\\n")
    (tmp_path / "qmp.log").write_text('1.0 -> {"execute": "stop"}\\n1.1 <- {}\\n')
    conftest._live.add(g)
    assert 6 * 7 == 43, "the deliberate failure"


@pytest.mark.profile("x86_64")
def test_passes():
    pass
"""


def test_failing_qemu_test_leaves_console_qmp_and_report(tmp_path: Path):
    """The conftest's hooks on a failing test: its report and its guest's console and QMP
    transcript land under PTLAB_ARTIFACTS/<test id>/; a passing test leaves nothing."""
    shutil.copy(REPO / "tests" / "qemu" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_evidence.py").write_text(FAILING_TEST)
    art = tmp_path / "artifacts"
    proc = pytest_in(tmp_path, "-q", f"--junitxml={art}/junit.xml", "test_evidence.py",
                     PTLAB_ARTIFACTS=str(art))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in proc.stdout
    folder = art / "test_evidence.py_test_fails_with_a_guest" / "call"
    assert str(folder) in proc.stdout  # the report says where the evidence went
    report = (folder / "failure.txt").read_text()
    assert "the deliberate failure" in report and "PTLAB_SEED=" in report
    (guest_dir,) = [d for d in folder.iterdir() if d.is_dir()]
    assert guest_dir.name.startswith("x86_64-")
    assert (guest_dir / "serial.log").read_text().endswith("console end\n")
    assert '"execute": "stop"' in (guest_dir / "qmp.log").read_text()
    assert sorted(p.name for p in art.iterdir()) == ["junit.xml", folder.parent.name]
    assert 'failures="1"' in (art / "junit.xml").read_text()


@pytest.mark.parametrize("args, arch", [
    ([], "x86_64"),  # the main job
    (["PROFILE=arm64"], "all"),  # a profile alone is not filtered by the default ARCH
    (["PROFILE=x86_64,arm64-kpti"], "all"),
    (["PROFILE=arm64", "ARCH=x86_64"], "x86_64"),  # explicit: they intersect (an error)
    (["ARCH=arm64"], "arm64"),
])
def test_make_selection_defaults(args, arch):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-C", str(REPO), "test-qemu", *args],
                         capture_output=True, text=True, check=True).stdout
    assert f"PTLAB_ARCH={arch} " in out, out[-400:]


def _qemu_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qemu_conftest",
                                                  REPO / "tests" / "qemu" / "conftest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("nodeid", [
    "tests/qemu/test_real_tables.py::TestX86_64::test_gva2gpa_agrees",
    "tests/qemu/test_kernel_modules.py::TestArm64::test_rmmod_errors[a/b-22]",
])
def test_pool_nodeid_survives_pytest_reparsing(nodeid):
    """The pool unit's tag keeps a node id well formed: pytest 9 rebuilds ids from their parts
    (NodeId without its string cache) and gets the same string; the scheduler finds the unit."""
    from _pytest.nodeid import NodeId

    c = _qemu_conftest()
    tagged = c.pool_nodeid(nodeid, "x86_64-pti/b")
    parsed = NodeId.parse(tagged)
    rebuilt = NodeId(path=parsed.path, names=parsed.names, params=parsed.params)
    assert str(rebuilt) == tagged
    assert c.pool_unit(tagged) == "pool:x86_64-pti/b" and c.pool_unit(nodeid) is None
