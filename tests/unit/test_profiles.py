"""Guest profiles and the QEMU command line they produce."""

from __future__ import annotations

from pathlib import Path

import pytest
from ptharness.profiles import PROFILES, RunPaths, get_profile, kernel_cmdline, qemu_command


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
    assert not get_profile("x86_64-la57").pvh  # PVH entry never enables 5-level paging
    assert "pti=on" in opt(argv_for("x86_64-pti"), "-append")[0]
    assert opt(argv_for("arm64"), "-cpu") == ["max,pauth-impdef=on"]
    assert "kpti=1" in opt(argv_for("arm64-kpti"), "-append")[0]
    assert get_profile("arm64").ram_base == 0x4000_0000


def test_hotplug_geometry():
    x86 = argv_for("x86_64", hotplug=True)
    assert opt(x86, "-m") == ["1024M,slots=4,maxmem=8192M"]
    arm = argv_for("arm64", hotplug=True, mem_mb=512)
    assert opt(arm, "-m") == ["512M,maxmem=4096M"]
    assert any(a.startswith("virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0") for a in arm)
    assert "memhp_default_state=online_movable" in opt(arm, "-append")[0]
    assert not any("virtio-mem" in a for a in argv_for("arm64"))


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
