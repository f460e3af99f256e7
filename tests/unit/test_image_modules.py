"""Module metadata and load order: synthetic ELF modules, plus the real extracted kernel
packages in images/cache when present."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest
from ptharness import image as image_mod
from ptharness.image_modules import ModuleError, ModuleTree, depends, modinfo, module_name


def fake_ko(info: dict[str, str]) -> bytes:
    """A minimal little-endian ELF64 with sections: null, .modinfo, .shstrtab."""
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    shstr_off = body_off + len(body)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x28, shoff)
    struct.pack_into("<HHH", ehdr, 0x3A, 64, 3, 2)

    def sh(name: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 3 if name == 10 else 1, 0, 0, off, size,
                           0, 0, 1, 0)

    pad = b"\0" * (shoff - shstr_off - len(shstr))
    return (bytes(ehdr) + body + shstr + pad + sh(0, 0, 0) + sh(1, body_off, len(body))
            + sh(10, shstr_off, len(shstr)))


def make_tree(root: Path, mods: dict[str, str], builtin: list[str] = (), xz: tuple = ()):
    moddir = root / "lib/modules/6.1.0-test"
    for name, deps in mods.items():
        d = moddir / "kernel/drivers" / name[:1]
        d.mkdir(parents=True, exist_ok=True)
        data = fake_ko({"license": "GPL", "depends": deps, "name": name})
        if name in xz:
            (d / f"{name.replace('_', '-')}.ko.xz").write_bytes(lzma.compress(
                data, format=lzma.FORMAT_XZ))
        else:
            (d / f"{name}.ko").write_bytes(data)
    (moddir / "modules.builtin").write_text("".join(f"kernel/{b}.ko\n" for b in builtin))
    return moddir


def test_modinfo_and_depends():
    info = modinfo(fake_ko({"depends": "virtio_ring,virtio", "alias": "a", "vermagic": "6.1"}))
    assert info["vermagic"] == ["6.1"]
    assert depends(info) == ["virtio_ring", "virtio"]
    assert depends(modinfo(fake_ko({"depends": ""}))) == []
    with pytest.raises(ModuleError):
        modinfo(b"not an elf at all" * 8)


def test_module_name():
    assert module_name("a/b/net-failover.ko.xz") == "net_failover"
    assert module_name("virtio_pci.ko") == "virtio_pci"


def test_load_order_dependencies_first(tmp_path):
    moddir = make_tree(tmp_path, {
        "virtio_net": "virtio,net_failover", "net_failover": "failover", "failover": "",
        "virtio": "virtio_ring", "virtio_ring": "", "unrelated": "",
        "qemu_fw_cfg": "",
    }, builtin=["drivers/virtio/virtio_ring"], xz=("net_failover",))
    tree = ModuleTree(moddir)
    order = [m.name for m in tree.load_order(["virtio_net", "qemu_fw_cfg", "virtio"])]
    assert sorted(order) == ["failover", "net_failover", "qemu_fw_cfg", "virtio",
                             "virtio_net", "virtio_ring"]
    for a, b in [("failover", "net_failover"), ("net_failover", "virtio_net"),
                 ("virtio", "virtio_net"), ("virtio_ring", "virtio")]:
        assert order.index(a) < order.index(b)
    rel = {m.name: m.relpath for m in tree.load_order(["net_failover"])}
    assert rel["net_failover"].endswith("net-failover.ko")    # stored decompressed


def test_builtin_dependency_is_skipped(tmp_path):
    moddir = make_tree(tmp_path, {"virtio_pci": "virtio"}, builtin=["drivers/virtio/virtio"])
    assert [m.name for m in ModuleTree(moddir).load_order(["virtio_pci"])] == ["virtio_pci"]


def test_missing_and_cycle(tmp_path):
    moddir = make_tree(tmp_path, {"a_mod": "b_mod", "b_mod": "a_mod", "c_mod": "nope"})
    tree = ModuleTree(moddir)
    with pytest.raises(ModuleError, match="cycle"):
        tree.load_order(["a_mod"])
    with pytest.raises(ModuleError, match="'nope' not found"):
        tree.load_order(["c_mod"])


@pytest.mark.parametrize("arch", sorted(image_mod.RECIPES))
def test_real_kernel_module_order(arch: str):
    """The extracted Debian kernel package of the current image (built if missing)."""
    img = image_mod.ensure_image(arch, progress=lambda s: None)
    pkg = image_mod.cache_root() / "pkg" / arch
    moddir = pkg / f"linux-image-{img.kernel_version}_{img.package_version}" / "lib" / "modules" \
        / img.kernel_version
    assert moddir.is_dir(), f"{moddir}: the image's kernel package is not extracted"
    tree = ModuleTree(moddir)
    assert len(tree.files) > 1000
    order = tree.load_order(["virtio_net", "virtio_pci", "qemu_fw_cfg"])
    names = [m.name for m in order]
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert "virtio_pci" in names and "virtio_pci_modern_dev" in names
    pos = {n: i for i, n in enumerate(names)}
    for m in order:        # every non-built-in dependency comes earlier
        for dep in m.depends:
            assert dep in tree.builtin or pos[dep] < pos[m.name]
    vn = tree.module("virtio_net")
    assert "net_failover" in vn.depends


def test_strip_signature():
    """The appended signature (PKCS#7 blob, struct module_signature, magic) goes; an unsigned
    module and a real one's ELF part stay byte for byte."""
    from ptharness.image_modules import SIG_INFO, SIG_MAGIC, strip_signature

    elf = fake_ko({"name": "a_mod", "depends": ""})
    sig = bytes(range(200))
    signed = elf + sig + SIG_INFO.pack(0, 0, 2, 0, 0, len(sig)) + SIG_MAGIC
    assert strip_signature(signed) == elf
    assert strip_signature(elf) == elf
    with pytest.raises(ModuleError, match="exceeds"):
        strip_signature(elf[:10] + SIG_INFO.pack(0, 0, 2, 0, 0, 1 << 20) + SIG_MAGIC)
    from ptharness.image_modules import read_ko

    kos = sorted(Path(image_mod.cache_root()).glob(
        "pkg/*/*/lib/modules/*/kernel/drivers/firmware/qemu_fw_cfg.ko*"))
    for ko in kos:  # Debian's real, signed modules when the package cache holds them
        data = read_ko(ko)
        stripped = strip_signature(data)
        assert data.endswith(SIG_MAGIC) and len(stripped) < len(data) - 256
        assert modinfo(stripped)["name"] == ["qemu_fw_cfg"]


def test_module_lists_early_and_late(tmp_path):
    """modules-<arch>.txt: NAME loads before SSH, NAME late after PTLAB-READY; anything else
    is one clear error."""
    good = tmp_path / "modules-x.txt"
    good.write_text("# comment\nvirtio_pci\nqemu_fw_cfg late  # no dependents\nvirtio_net\n")
    assert image_mod.module_lists(good) == (["virtio_pci", "virtio_net"], ["qemu_fw_cfg"])
    bad = tmp_path / "modules-y.txt"
    bad.write_text("virtio_pci early\n")
    with pytest.raises(image_mod.ImageError, match="bad entry 'virtio_pci early'"):
        image_mod.module_lists(bad)
    real = image_mod.module_lists(image_mod.IMAGES / "modules-arm64.txt")
    assert "virtio_net" in real[0] and "virtio_mem" in real[1]
