"""Guest images: a Debian kernel + a newc initramfs (busybox, dropbear, ptagent, modules).

`ensure_image(arch, kernel)` returns a cached image or builds it. The kernel is the one a
Debian meta package currently names: linux-image-amd64 / -arm64 for the 6.1 series (the default,
:data:`ptharness.profiles.KERNELS`), linux-image-6.12-amd64 / -arm64 for 6.12; packages are
downloaded and extracted, never installed; dropbear is Debian's source package built static
(:mod:`ptharness.image_dropbear`). The cache key covers every package version, dropbear's
source version and a hash of the recipe (images/rootfs, module and package lists, guest agent
source, this builder).
Usage: `python -m ptharness.image [--kernel K] [--profile P,..] [--key] ARCH|all` (the
images the profiles of ARCH need; ``--key`` prints each image's directory name, a CI cache
key, instead of building).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ptharness.image_cpio import NewcWriter
from ptharness.image_debs import AptArch, Package, PackageError, extract, host_versions
from ptharness.image_dropbear import BINARY as DROPBEAR_BINARY
from ptharness.image_dropbear import static_dropbear
from ptharness.image_elf import ElfError, library_closure, vmlinux_from_bzimage
from ptharness.image_entry import la57_entry_image
from ptharness.image_modules import ModuleError, ModuleTree, read_ko, strip_signature
from ptharness.profiles import KERNELS, get_kernel, select_profiles

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
GUEST_SRC = REPO / "guest"
RECIPE_VERSION = 1

Progress = Callable[[str], None]


class ImageError(RuntimeError):
    """The image cannot be built (missing tool or package, bad kernel, ...)."""


@dataclass(frozen=True)
class Image:
    arch: str              # "x86_64" | "arm64"
    kernel: Path           # bzImage / arm64 Image
    vmlinux: Path | None   # x86: decompressed ELF vmlinux with a PVH note, else None
    la57_entry: Path | None  # x86: the vmlinux's 5-level entry (image_entry.py), else None
    initrd: Path           # newc initramfs
    host_key_pub: str      # "ssh-ed25519 AAAA..." (dropbear host key, OpenSSH format)
    kernel_version: str    # e.g. "6.1.0-56-amd64"
    package_version: str   # e.g. "6.1.192-2"


@dataclass(frozen=True)
class ArchRecipe:
    arch: str
    debarch: str
    triplet: str
    loader_dirs: tuple[str, ...]
    host_userland: bool    # True: busybox from the host; False: downloaded
    kernel_name: str       # boot image in the image dir: "bzImage" (+ PVH "vmlinux") | "Image"

    def meta(self, kernel: str) -> str:
        """The meta package naming the current linux-image of kernel series ``kernel``."""
        return KERNEL_META[kernel].format(debarch=self.debarch)

    @property
    def libdirs(self) -> list[str]:
        return [f"/lib/{self.triplet}", f"/usr/lib/{self.triplet}", "/lib", "/usr/lib"]


# Debian bookworm's meta package of each kernel series: linux-image-amd64 depends on the 6.1
# linux-image-6.1.0-N-amd64, linux-image-6.12-amd64 on linux-image-6.12.N+deb12-amd64.
KERNEL_META = {"6.1": "linux-image-{debarch}", "6.12": "linux-image-6.12-{debarch}"}

RECIPES = {
    "x86_64": ArchRecipe("x86_64", "amd64", "x86_64-linux-gnu", ("/lib64",), True, "bzImage"),
    "arm64": ArchRecipe("arm64", "arm64", "aarch64-linux-gnu", ("/lib",), False, "Image"),
}


def cache_root() -> Path:
    return Path(os.environ.get("PTLAB_IMAGE_CACHE", IMAGES / "cache"))


def _list_file(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines()
            if ln.split("#")[0].strip()]


def module_lists(path: Path) -> tuple[list[str], list[str]]:
    """(early, late) module names of a modules-<arch>.txt: /init loads the early ones before
    SSH starts, the ``late`` ones after PTLAB-READY, in the background."""
    early: list[str] = []
    late: list[str] = []
    for entry in _list_file(path):
        name, *flags = entry.split()
        if flags not in ([], ["late"]):
            raise ImageError(f"{path.name}: bad entry {entry!r} (NAME or NAME late)")
        (late if flags else early).append(name)
    return early, late


def recipe_hash(arch: str) -> str:
    """Hash of everything besides package versions that goes into an image."""
    h = hashlib.sha256(f"recipe {RECIPE_VERSION} {arch}\n".encode())
    files = sorted((IMAGES / "rootfs").rglob("*")) + [
        IMAGES / f"modules-{arch}.txt", IMAGES / f"packages-{arch}.txt",
        GUEST_SRC / "ptagent.c", GUEST_SRC / "ptinit.c", GUEST_SRC / "ptinit.h",
        GUEST_SRC / "Makefile",
        *sorted(Path(__file__).parent.glob("image*.py")),
    ]
    for f in files:
        if f.is_file():
            label = f.relative_to(REPO) if f.is_relative_to(REPO) else f
            h.update(f"{label} {f.stat().st_mode & 0o111}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class _Inputs:
    recipe: ArchRecipe
    kernel: Package
    userland: dict[str, str]    # package -> version
    dropbear: str               # Debian source version built static (image_dropbear)
    key: str

    @property
    def outdir(self) -> Path:
        return cache_root() / f"{self.recipe.arch}-{self.kernel.version}-{self.key}"

    @property
    def series(self) -> str:
        """The kernel series ("6.1") of the package version ("6.1.192-3")."""
        return ".".join(self.kernel.version.split(".")[:2])


def _inputs(arch: str, kernel_series: str, progress: Progress) -> tuple[_Inputs, AptArch]:
    if arch not in RECIPES:
        raise ImageError(f"unknown arch {arch!r} (expected one of {', '.join(RECIPES)})")
    recipe = RECIPES[arch]
    apt = AptArch(recipe.debarch, cache_root() / "apt" / recipe.debarch)
    with _lock(f"apt-{recipe.debarch}"):
        apt.update(progress, force=os.environ.get("PTLAB_APT_REFRESH") == "1")
    kernel = apt.kernel_package(recipe.meta(kernel_series))
    if not kernel.version.startswith(kernel_series + "."):
        raise ImageError(f"{recipe.meta(kernel_series)} names {kernel.name} {kernel.version},"
                         f" not a {kernel_series} kernel")
    names = _list_file(IMAGES / f"packages-{arch}.txt")
    if recipe.host_userland:
        userland = host_versions(names)
    else:
        userland = {n: p.version for n, p in apt.show(names).items()}
    dropbear = apt.show([DROPBEAR_BINARY])[DROPBEAR_BINARY].version
    blob = json.dumps({"kernel": [kernel.name, kernel.version], "userland": userland,
                       "dropbear": dropbear, "recipe": recipe_hash(arch)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return _Inputs(recipe, kernel, userland, dropbear, key), apt


def _load(outdir: Path) -> Image | None:
    meta = outdir / "image.json"
    try:
        d = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not all(k in d for k in _META_KEYS):
        return None
    return Image(
        arch=d["arch"], kernel=outdir / d["kernel"],
        vmlinux=outdir / d["vmlinux"] if d["vmlinux"] else None,
        la57_entry=outdir / d["la57_entry"] if d["la57_entry"] else None,
        initrd=outdir / d["initrd"], host_key_pub=d["host_key_pub"],
        kernel_version=d["kernel_version"], package_version=d["package_version"])


_META_KEYS = ("arch", "kernel", "vmlinux", "la57_entry", "initrd", "host_key_pub", "kernel_version",
              "package_version")


@contextmanager
def _lock(name: str) -> Iterator[None]:
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".lock-{name}", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _series(kernel: str | None) -> str:
    """The kernel series to build: ``kernel``, else $PTLAB_KERNEL, else the default."""
    try:
        return get_kernel(kernel or os.environ.get("PTLAB_KERNEL"))
    except ValueError as e:
        raise ImageError(str(e)) from None


def image_key(arch: str, kernel: str | None = None, *, progress: Progress = print) -> str:
    """Name of the image directory `ensure_image` uses (<arch>-<version>-<key>): it changes
    with every input of the image, so it serves as a CI cache key."""
    try:
        return _inputs(arch, _series(kernel), progress)[0].outdir.name
    except (PackageError, OSError, subprocess.SubprocessError) as e:
        raise ImageError(f"image {arch}: {e}") from None


def ensure_image(arch: str, kernel: str | None = None, *, progress: Progress = print) -> Image:
    """The image for `arch` with a kernel of series `kernel` (None: $PTLAB_KERNEL, else
    the default), built into images/cache/<arch>-<version>-<key>/ if missing.

    Raises ImageError with one clear message on any failure.
    """
    try:
        inputs, apt = _inputs(arch, _series(kernel), progress)
        image = _load(inputs.outdir)
        if image is not None:
            return image
        with _lock(arch):
            image = _load(inputs.outdir)
            if image is not None:
                return image
            return _build(inputs, apt, progress)
    except (PackageError, ElfError, ModuleError, OSError, subprocess.SubprocessError) as e:
        raise ImageError(f"image {arch}: {e}") from None


# ---------------------------------------------------------------------------- build steps


def _run(cmd: list[str], what: str, **kw: object) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ImageError(f"{what}: {e}") from None
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def _kernel_tree(inputs: _Inputs, apt: AptArch, progress: Progress) -> tuple[Path, str]:
    arch = inputs.recipe.arch
    deb = apt.download(inputs.kernel, cache_root() / "debs" / arch, progress)
    tree = extract(deb, cache_root() / "pkg" / arch / f"{inputs.kernel.name}_"
                   f"{inputs.kernel.version}", progress)
    kvers = sorted(p.name for p in (tree / "lib" / "modules").iterdir() if p.is_dir())
    if len(kvers) != 1:
        raise ImageError(f"expected one kernel under {tree}/lib/modules, found {kvers}")
    return tree, kvers[0]


def _userland_root(inputs: _Inputs, apt: AptArch, progress: Progress) -> Path:
    """Root holding busybox: the host, or the extracted debs."""
    if inputs.recipe.host_userland:
        return Path("/")
    arch = inputs.recipe.arch
    tag = hashlib.sha256(json.dumps(inputs.userland, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_root() / "pkg" / arch / f"userland-{tag}"
    if root.is_dir():
        return root
    pkgs = apt.show(list(inputs.userland))
    debs = [apt.download(p, cache_root() / "debs" / arch, progress) for p in pkgs.values()]
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for deb in debs:
            progress(f"dpkg-deb: extracting {deb.name}")
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _kernel_files(tree: Path, kver: str, arch: str, progress: Progress) -> dict[str, Path]:
    """The boot files of one extracted kernel, prepared once per kernel package (kept in
    its tree, hard-linked into each image): x86 bzImage + PVH vmlinux + its 5-level entry,
    arm64 raw Image."""
    vmlinuz = tree / "boot" / f"vmlinuz-{kver}"
    return _BOOT_FILES[RECIPES[arch].kernel_name](tree, vmlinuz, progress)


def _bzimage_files(tree: Path, vmlinuz: Path, progress: Progress) -> dict[str, Path]:
    """The bzImage as packaged, the PVH-bootable vmlinux inside it and that vmlinux's
    5-level entry (the bzImage's setup with :mod:`image_entry`'s payload)."""
    vmlinux = tree / "boot" / "ptlab-vmlinux"
    if not vmlinux.is_file():
        progress("kernel: extracting the PVH vmlinux from the bzImage")
        tmp = vmlinux.with_name(f"ptlab-vmlinux.tmp{os.getpid()}")
        tmp.write_bytes(vmlinux_from_bzimage(vmlinuz.read_bytes()))
        tmp.rename(vmlinux)
    entry = tree / "boot" / "ptlab-la57entry"  # made anew: ms, and it follows image_entry.py
    tmp = entry.with_name(f"ptlab-la57entry.tmp{os.getpid()}")
    tmp.write_bytes(la57_entry_image(vmlinuz.read_bytes(), vmlinux.read_bytes()))
    tmp.rename(entry)
    return {"bzImage": vmlinuz, "vmlinux": vmlinux, "la57entry": entry}


def _image_files(tree: Path, vmlinuz: Path, progress: Progress) -> dict[str, Path]:
    """The arm64 raw Image (Documentation/arch/arm64/booting.rst), gunzipped."""
    image = tree / "boot" / "ptlab-Image"
    if not image.is_file():
        data = vmlinuz.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if data[0x38:0x3C] != b"ARM\x64":
            raise ImageError(f"{vmlinuz.name} is not an arm64 Image (no ARM\\x64 magic)")
        tmp = image.with_name(f"ptlab-Image.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.rename(image)
    return {"Image": image}


_BOOT_FILES = {"bzImage": _bzimage_files, "Image": _image_files}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _agent(arch: str, progress: Progress) -> Path:
    progress(f"guest: building ptagent for {arch}")
    target = f"build/ptagent-{arch}"
    _run(["make", "-s", "-C", str(GUEST_SRC), target], f"make {target}")
    return GUEST_SRC / target


def _host_key(outdir: Path) -> str:
    key = outdir / "host_key"
    _run(["dropbearkey", "-t", "ed25519", "-f", str(key)], "dropbearkey -t ed25519")
    out = _run(["dropbearkey", "-y", "-f", str(key)], "dropbearkey -y")
    for line in out.splitlines():
        if line.startswith("ssh-ed25519 "):
            return " ".join(line.split()[:2])
    raise ImageError(f"dropbearkey -y printed no ssh-ed25519 line: {out!r}")


class _Tree:
    """cpio entries with parent directories created on demand."""

    def __init__(self, w: NewcWriter) -> None:
        self.w = w

    def dirs(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if not self.w.has(d):
                self.w.add_dir(d)

    def dir(self, path: str, perm: int = 0o755) -> None:
        self.dirs(path)
        if not self.w.has(path):
            self.w.add_dir(path, perm)

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self.dirs(path)
        self.w.add_file(path, data, perm)

    def symlink(self, path: str, target: str) -> None:
        self.dirs(path)
        self.w.add_symlink(path, target)


def _initramfs(out: Path, *, recipe: ArchRecipe, userland: Path, dropbear: Path, agent: Path,
               host_key: Path, kernel_tree: Path, kver: str, progress: Progress) -> int:
    modules = ModuleTree(kernel_tree / "lib" / "modules" / kver)
    early, late = module_lists(IMAGES / f"modules-{recipe.arch}.txt")
    order = modules.load_order(early)
    late_order = modules.load_order(early + late)[len(order):]
    progress(f"initramfs: modules in load order: {' '.join(m.name for m in order)}"
             f" (late: {' '.join(m.name for m in late_order)})")
    busybox = userland / "bin/busybox"
    for f in (dropbear, busybox):
        if not f.is_file():
            raise ImageError(f"{f} missing (package not installed/extracted?)")
    libs = library_closure(dropbear, userland, recipe.libdirs)  # none: it is static
    with open(out, "wb") as fh:
        w = NewcWriter(fh)
        t = _Tree(w)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/dropbear", "etc/ptlab", "proc",
                  "sys", "dev", "run", "mnt", "var", "lib", *(x.strip("/") for x in
                                                                recipe.loader_dirs)):
            t.dir(d)
        t.dir("root", 0o700)
        t.dir("tmp", 0o1777)
        t.symlink("var/run", "/run")
        w.add_chardev("dev/console", 5, 1)
        w.add_chardev("dev/null", 1, 3, 0o666)
        rootfs = IMAGES / "rootfs"
        for src in sorted(rootfs.rglob("*")):
            rel = src.relative_to(rootfs).as_posix()
            if src.is_dir():
                t.dir(rel)
            else:
                perm = 0o600 if rel == "etc/shadow" else 0o644
                t.file(rel, src.read_bytes(), perm)
        t.file("bin/busybox", busybox.read_bytes(), 0o755)
        t.symlink("bin/sh", "busybox")
        t.file("usr/sbin/dropbear", dropbear.read_bytes(), 0o755)
        for guest_path, host in sorted(libs.items()):
            t.file(guest_path, host.read_bytes(), 0o755)
        t.file("bin/ptagent", agent.read_bytes(), 0o755)
        t.symlink("init", "/bin/ptagent")  # ptagent runs as /init (guest/ptinit.c)
        t.file("etc/dropbear/host_key", host_key.read_bytes(), 0o600)
        t.file("etc/ptlab/kernel_version", f"{kver}\n".encode())
        t.file("etc/ptlab/modules", "".join(f"{m.relpath}\n" for m in order).encode())
        t.file("etc/ptlab/modules.late",
               "".join(f"{m.relpath}\n" for m in late_order).encode())
        for m in order + late_order:
            t.file(f"lib/modules/{kver}/{m.relpath}", strip_signature(read_ko(m.path)))
        w.close()
    return out.stat().st_size


def _build(inputs: _Inputs, apt: AptArch, progress: Progress) -> Image:
    recipe = inputs.recipe
    arch = recipe.arch
    t0 = time.monotonic()
    progress(f"image {arch}: building {inputs.kernel.name} {inputs.kernel.version}"
             f" -> {inputs.outdir}")
    tree, kver = _kernel_tree(inputs, apt, progress)
    userland = _userland_root(inputs, apt, progress)
    with _lock("dropbear"):  # one source download and build at a time, shared by kernels
        dropbear = static_dropbear(arch, recipe.triplet, inputs.dropbear, cache_root(),
                                   progress)
    agent = _agent(arch, progress)

    outdir = inputs.outdir
    shutil.rmtree(outdir, ignore_errors=True)     # a broken earlier result (no image.json)
    tmp = outdir.with_name(outdir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = _kernel_files(tree, kver, arch, progress)
        kernel_name = recipe.kernel_name
        vmlinux_name = "vmlinux" if "vmlinux" in files else None
        la57_name = "la57entry" if "la57entry" in files else None
        for name, src in files.items():
            _link_or_copy(src, tmp / name)
        shutil.copy(tree / "boot" / f"config-{kver}", tmp / "config")
        pub = _host_key(tmp)
        (tmp / "host_key.pub").write_text(pub + "\n")
        progress("initramfs: writing newc archive")
        size = _initramfs(tmp / "initrd.img", recipe=recipe, userland=userland,
                          dropbear=dropbear, agent=agent, host_key=tmp / "host_key",
                          kernel_tree=tree, kver=kver, progress=progress)
        meta = {"arch": arch, "kernel": kernel_name, "vmlinux": vmlinux_name,
                "la57_entry": la57_name,
                "initrd": "initrd.img", "host_key_pub": pub, "kernel_version": kver,
                "package_version": inputs.kernel.version, "kernel_package": inputs.kernel.name,
                "userland": inputs.userland, "dropbear": inputs.dropbear,
                "recipe": recipe_hash(arch),
                "initrd_bytes": size}
        (tmp / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
        tmp.rename(outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"image {arch}: built in {time.monotonic() - t0:.1f} s (initrd {size >> 10} KiB)")
    _prune(inputs, tree)
    image = _load(outdir)
    assert image is not None
    return image


STALE_AFTER_S = 900


def _prune(inputs: _Inputs, tree: Path) -> None:
    """Remove this arch's superseded images of the same kernel series (older than 15 minutes,
    so a harness that just looked one up keeps it) and extracted kernels of other versions of
    the series (6.1 and 6.12 images live side by side)."""
    root = cache_root()
    now = time.time()
    arch, series = inputs.recipe.arch, inputs.series
    for d in root.glob(f"{arch}-{series}.*"):
        if d != inputs.outdir and ".tmp" not in d.name and (d / "image.json").is_file() \
                and now - (d / "image.json").stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(d, ignore_errors=True)
    for d in (root / "pkg" / arch).glob(f"linux-image-{series}.*"):
        if d != tree and ".tmp" not in d.name:
            shutil.rmtree(d, ignore_errors=True)
    for deb in (root / "debs" / arch).glob(f"linux-image-{series}.*.deb"):
        if deb.name != inputs.kernel.deb_name:
            deb.unlink(missing_ok=True)


USAGE = (f"usage: python -m ptharness.image [--kernel {'|'.join(KERNELS)}] [--profile P[,P...]]"
         f" [--key] {'|'.join((*RECIPES, 'all'))}")


def _arches(arch: str, profiles: str) -> list[str]:
    """The architectures whose images the profiles ``profiles`` (all if "") of ``arch`` need."""
    try:
        chosen = select_profiles(arch, profiles)
    except ValueError as e:
        raise ImageError(str(e)) from None
    return [a for a in RECIPES if any(p.arch == a for p in chosen)]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, str] = {"--kernel": "", "--profile": ""}
    key_only = False
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--key":
            key_only = True
        elif flag in opts and args:
            opts[flag] = args.pop(0)
        else:
            print(USAGE, file=sys.stderr)
            return 2
    if len(args) != 1 or args[0] not in (*RECIPES, "all"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        kernel = _series(opts["--kernel"])
        arches = _arches(args[0], opts["--profile"])
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet: Progress = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    for arch in arches:
        t0 = time.monotonic()
        try:
            if key_only:
                print(image_key(arch, kernel, progress=quiet))
                continue
            image = ensure_image(arch, kernel, progress=lambda s: print(s, flush=True))
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"image {arch}: {image.kernel_version} ({image.package_version}) ready in"
              f" {time.monotonic() - t0:.2f} s: {image.initrd.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
