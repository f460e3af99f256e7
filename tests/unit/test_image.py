"""Image build pieces without QEMU: newc writer, deb822 parsing, recipe, cache hits."""

from __future__ import annotations

import functools
import io
import stat
import struct

import pytest
from ptharness import image as image_mod
from ptharness.image_cpio import NewcWriter, read_newc
from ptharness.image_debs import Package, parse_stanzas
from ptharness.image_elf import interpreter


def _archive(build) -> bytes:
    buf = io.BytesIO()
    w = NewcWriter(buf)
    build(w)
    w.close()
    return buf.getvalue()


def test_newc_round_trip_and_alignment():
    payloads = {f"bin/f{n}": bytes(range(n % 256)) * (n // 7 + 1) for n in range(0, 23)}

    def build(w: NewcWriter) -> None:
        w.add_dir("bin")
        for name, data in payloads.items():
            w.add_file(name, data, 0o755)
        w.add_symlink("bin/sh", "busybox")
        w.add_chardev("dev-console", 5, 1)

    data = _archive(build)
    assert len(data) % 4 == 0
    entries = read_newc(data)
    names = [e[0] for e in entries]
    assert names[0] == "bin" and names[-2:] == ["bin/sh", "dev-console"]
    got = {n: (m, d) for n, m, d in entries}
    for name, payload in payloads.items():
        mode, body = got[name]
        assert body == payload
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755
    assert stat.S_ISDIR(got["bin"][0])
    assert stat.S_ISLNK(got["bin/sh"][0]) and got["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(got["dev-console"][0])


def test_newc_header_fields():
    data = _archive(lambda w: w.add_chardev("dev/console", 5, 1, 0o600))
    assert data[:6] == b"070701"
    fields = [int(data[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    ino, mode, _uid, _gid, nlink, _mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, check = fields
    assert ino == 1 and nlink == 1 and size == 0 and check == 0
    assert mode == stat.S_IFCHR | 0o600 and (rmaj, rmin) == (5, 1)
    assert namesize == len("dev/console") + 1
    assert data.endswith(b"TRAILER!!!\0" + b"\0" * (-(110 + 11) % 4))


def test_newc_deterministic_and_rejects_duplicates():
    def build(w: NewcWriter) -> None:
        w.add_file("a", b"x")
        w.add_file("b", b"yy")

    assert _archive(build) == _archive(build)
    w = NewcWriter(io.BytesIO())
    w.add_file("a", b"")
    with pytest.raises(ValueError):
        w.add_file("/a/", b"")
    w.close()
    with pytest.raises(ValueError):
        w.add_file("c", b"")


def test_read_newc_rejects_garbage():
    with pytest.raises(ValueError):
        read_newc(b"070707" + b"0" * 200)


def test_parse_stanzas_and_deb_name():
    text = ("Package: linux-image-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-amd64"
            " (= 6.1.192-2)\nDescription: x\n more\n\nPackage: busybox-static\n"
            "Version: 1:1.35.0-4\nArchitecture: arm64\n")
    st = parse_stanzas(text)
    assert [s["Package"] for s in st] == ["linux-image-amd64", "busybox-static"]
    assert st[0]["Description"] == "x\nmore"
    assert st[0]["Depends"].startswith("linux-image-6.1.0-56-amd64")
    pkg = Package("busybox-static", "1:1.35.0-4", "arm64", "")
    assert pkg.deb_name == "busybox-static_1%3a1.35.0-4_arm64.deb"


def test_recipe_hash_tracks_rootfs(tmp_path, monkeypatch):
    base = image_mod.recipe_hash("x86_64")
    assert base == image_mod.recipe_hash("x86_64")
    assert base != image_mod.recipe_hash("arm64")
    fake = tmp_path / "images"
    (fake / "rootfs").mkdir(parents=True)
    (fake / "rootfs" / "init").write_text("#!/bin/sh\n")
    monkeypatch.setattr(image_mod, "IMAGES", fake)
    monkeypatch.setattr(image_mod, "GUEST_SRC", tmp_path / "guest")
    h1 = image_mod.recipe_hash("x86_64")
    (fake / "rootfs" / "init").write_text("#!/bin/sh\necho changed\n")
    assert image_mod.recipe_hash("x86_64") != h1


def test_unknown_arch_is_one_clear_error():
    with pytest.raises(image_mod.ImageError, match="unknown arch"):
        image_mod.ensure_image("sparc", progress=lambda s: None)
    assert image_mod.main(["sparc"]) == 2


@functools.cache
def built_image(arch: str) -> image_mod.Image:
    """The current image of ``arch``, built if missing (``make images`` does the same)."""
    return image_mod.ensure_image(arch, progress=lambda s: None)


@pytest.mark.parametrize("arch", sorted(image_mod.RECIPES))
def test_built_image_contents(arch: str, tmp_path):
    img = built_image(arch)
    assert img.arch == arch
    assert img.host_key_pub.startswith("ssh-ed25519 AAAA")
    entries = {n: (m, d) for n, m, d in read_newc(img.initrd.read_bytes())}
    for need in ("init", "bin/busybox", "bin/ptagent", "usr/sbin/dropbear",
                 "etc/dropbear/host_key", "etc/passwd", "etc/ptlab/modules", "dev/console"):
        assert need in entries, need
    assert stat.S_IMODE(entries["etc/dropbear/host_key"][0]) == 0o600
    assert entries["etc/passwd"][1].startswith(b"root:x:0:0:root:/root:/bin/sh")
    machine = {"x86_64": 62, "arm64": 183}[img.arch]   # EM_X86_64, EM_AARCH64
    for prog in ("bin/busybox", "bin/ptagent", "usr/sbin/dropbear"):
        assert struct.unpack_from("<H", entries[prog][1], 18)[0] == machine, prog
    # dropbear built static from Debian's source (image_dropbear): no loader, no library
    (tmp_path / "dropbear").write_bytes(entries["usr/sbin/dropbear"][1])
    assert interpreter(tmp_path / "dropbear") is None
    assert not [n for n in entries if ".so" in n.rsplit("/", 1)[-1]]
    kver = entries["etc/ptlab/kernel_version"][1].decode().strip()
    assert kver == img.kernel_version
    late = entries["etc/ptlab/modules.late"][1].decode().split()
    assert late and not set(late) & set(entries["etc/ptlab/modules"][1].decode().split())
    for rel in entries["etc/ptlab/modules"][1].decode().split() + late:
        assert f"lib/modules/{kver}/{rel}" in entries
        ko = entries[f"lib/modules/{kver}/{rel}"][1]
        assert ko[:4] == b"\x7fELF" and not ko.endswith(b"~Module signature appended~\n")
    if img.arch == "x86_64":
        assert img.vmlinux is not None and img.vmlinux.read_bytes()[:4] == b"\x7fELF"
    else:
        assert img.vmlinux is None and img.kernel.read_bytes()[0x38:0x3C] == b"ARM\x64"


def test_cached_ensure_image_is_fast():
    import time

    arch = "x86_64"
    built_image(arch)
    lines: list[str] = []
    t0 = time.monotonic()
    img = image_mod.ensure_image(arch, progress=lines.append)
    assert time.monotonic() - t0 < 2.0
    assert lines == [] and img.initrd.is_file()


def test_prune_keeps_current_and_recent(tmp_path, monkeypatch):
    import os as _os
    import time as _time

    monkeypatch.setenv("PTLAB_IMAGE_CACHE", str(tmp_path))
    kernel = Package("linux-image-6.1.0-9-amd64", "6.1.9-1", "amd64", "")
    recipe = image_mod.RECIPES["x86_64"]
    inputs = image_mod._Inputs(recipe, kernel, {}, "2022.83-1", "k" * 12)
    old = _time.time() - 2 * image_mod.STALE_AFTER_S
    dirs = {}
    # "6.12": an image of the other kernel series, which a 6.1 build leaves alone
    for name, mtime in [("cur", None), ("stale", old), ("recent", None), ("arm", old),
                        ("6.12", old)]:
        d = inputs.outdir if name == "cur" else tmp_path / (
            f"arm64-6.1.1-{name}" if name == "arm" else
            "x86_64-6.12.9-1-k" if name == "6.12" else f"x86_64-6.1.1-{name}")
        d.mkdir(parents=True)
        (d / "image.json").write_text("{}")
        if mtime:
            _os.utime(d / "image.json", (mtime, mtime))
        dirs[name] = d
    tree = tmp_path / "pkg/x86_64" / f"{kernel.name}_{kernel.version}"
    other = tmp_path / "pkg/x86_64/linux-image-6.1.0-8-amd64_6.1.8-1"
    debs = tmp_path / "debs/x86_64"
    for d in (tree, other, debs):
        d.mkdir(parents=True)
    (debs / kernel.deb_name).write_bytes(b"")
    (debs / "linux-image-6.1.0-8-amd64_6.1.8-1_amd64.deb").write_bytes(b"")
    other612 = tmp_path / "pkg/x86_64/linux-image-6.12.9+deb12-amd64_6.12.9-1"
    other612.mkdir(parents=True)
    deb612 = "linux-image-6.12.9+deb12-amd64_6.12.9-1_amd64.deb"
    (debs / deb612).write_bytes(b"")
    image_mod._prune(inputs, tree)
    assert {n for n, d in dirs.items() if d.exists()} == {"cur", "recent", "arm", "6.12"}
    assert tree.exists() and not other.exists() and other612.exists()
    assert sorted(p.name for p in debs.iterdir()) == sorted([kernel.deb_name, deb612])
