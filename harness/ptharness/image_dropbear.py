"""The guests' SSH server: Debian's dropbear source package, built static per architecture.

Why not the ``dropbear-bin`` binary: under TCG every piece of guest code runs through QEMU's
translator the first time it runs, after every boot and after every ``loadvm`` (which drops all
translations). Debian's dynamically linked dropbear maps seven libraries (libtomcrypt,
libtommath, libgmp, libcrypt, libz, libc, ld.so; 3.9 MiB of the initramfs) and relocates them
at each start. Built static from the same source with Debian's patches applied, it starts in
about half the time in an arm64 guest, and the initramfs shrinks from 7.1 to 4.0 MiB
(measured: README, "Boot and reset").

The source comes through a private apt state whose sources are the host's Debian archive
entries turned into ``deb-src`` (apt checks the files against the signed Sources index). The
build uses dropbear's bundled libtomcrypt/libtommath (Debian links its libtom packages, which
have no static cross libraries here), no zlib (SSH compression is never negotiated) and no
password authentication at all (there is no static libcrypt for arm64 here, and the testbed's
SSH takes keys only).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from ptharness.image_debs import AptArch, PackageError, run
from ptharness.image_elf import interpreter

Progress = Callable[[str], None]
SOURCE = "dropbear"
BINARY = "dropbear-bin"  # the binary package whose candidate version names the source to build
CONFIGURE = (
    "--enable-static", "--enable-bundled-libtom", "--disable-zlib", "--disable-pam",
    "--disable-lastlog", "--disable-utmp", "--disable-utmpx", "--disable-wtmp",
    "--disable-wtmpx", "--disable-pututline", "--disable-pututxline",
)
LOCALOPTIONS = "#define DROPBEAR_SVR_PASSWORD_AUTH 0\n#define DROPBEAR_CLI_PASSWORD_AUTH 0\n"
# Debian's archive layout: entries of the host's sources whose URI ends so get a deb-src twin
_DEBIAN_URI = re.compile(r"/debian(-security)?/?$")


def build_hash() -> str:
    """Hash of this recipe (flags, options, this file): part of the build's cache name."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def deb_src_entries(text: str, deb822: bool) -> str:
    """The ``deb-src`` twins of the Debian archive entries in one apt sources file
    (``deb822``: a ``.sources`` file, else a one-line ``.list`` file)."""
    out: list[str] = []
    if not deb822:
        for line in text.splitlines():
            words = line.split("#")[0].split()
            uri = next((w for w in words[1:] if not w.startswith("[")), "")
            if words and words[0] == "deb" and _DEBIAN_URI.search(uri):
                out.append("deb-src" + line.split("#")[0].strip()[3:])
        return "".join(f"{x}\n" for x in out)
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.strip() and not line.lstrip().startswith("#") and ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        uris = fields.get("uris", "").split()
        if "deb" in fields.get("types", "").split() and uris and all(
                _DEBIAN_URI.search(u) for u in uris) and fields.get("enabled", "yes") != "no":
            lines = ["Types: deb-src", f"URIs: {' '.join(uris)}",
                     f"Suites: {fields.get('suites', '')}",
                     f"Components: {fields.get('components', '')}"]
            if "signed-by" in fields:
                lines.append(f"Signed-By: {fields['signed-by']}")
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


class AptSource(AptArch):
    """A private apt state with the ``deb-src`` twins of the host's Debian entries."""

    def __init__(self, root: Path, etc: Path = Path("/etc/apt")) -> None:
        super().__init__("amd64", root)
        self.sources = self.root / "sources.list.d"
        self._etc = etc

    def options(self) -> list[str]:
        return [*super().options(), f"-o=Dir::Etc::SourceList={self.root / 'none.list'}",
                f"-o=Dir::Etc::SourceParts={self.sources}"]

    def write_sources(self) -> None:
        self.sources.mkdir(parents=True, exist_ok=True)
        files = [self._etc / "sources.list"] + sorted((self._etc / "sources.list.d").glob("*"))
        texts = {".list": "", ".sources": ""}
        for f in files:
            if f.is_file() and f.suffix in texts:
                texts[f.suffix] += deb_src_entries(f.read_text(), f.suffix == ".sources")
        if not any(t.strip() for t in texts.values()):
            raise PackageError(f"no Debian archive entry in {self._etc}/sources.list*"
                               " to fetch dropbear's source from")
        for suffix, text in texts.items():
            (self.sources / f"ptlab-src{suffix}").write_text(text)
        (self.root / "none.list").write_text("")

    def update(self, progress: Progress, *, force: bool = False) -> None:
        self.write_sources()
        super().update(progress, force=force)

    def source(self, name: str, version: str, dest: Path, progress: Progress) -> Path:
        """The ``.dsc`` of source package ``name`` at ``version`` with its files in ``dest``
        (downloaded and checked by apt, its lists brought up to date first, unless there
        already)."""
        dsc = dest / f"{name}_{version.split(':')[-1]}.dsc"
        if dsc.exists():
            return dsc
        self.update(progress)
        dest.mkdir(parents=True, exist_ok=True)
        progress(f"apt: downloading source {name} {version}")
        run(["apt-get", "-q", *self.options(), "source", "--download-only",
             f"{name}={version}"], f"apt-get source {name}={version}", cwd=dest)
        if not dsc.exists():
            raise PackageError(f"apt-get source {name}: no {dsc.name} in {dest}")
        return dsc


def dsc_files(dsc: Path) -> list[str]:
    """The file names a ``.dsc`` lists (its ``Files:`` field)."""
    names: list[str] = []
    in_files = False
    for line in dsc.read_text(errors="replace").splitlines():
        if line.startswith("Files:"):
            in_files = True
        elif in_files and line.startswith(" "):
            names.append(line.split()[-1])
        elif in_files:
            break
    return names


def extract_tar(t: tarfile.TarFile, dest: Path) -> None:
    """Extract ``t`` into ``dest``, refusing members that would land outside it and special
    files: tarfile's "data" filter where Python has it (3.11.4+), else the same checks here
    (Debian 12's python3 is 3.11.2)."""
    if hasattr(tarfile, "data_filter"):
        try:
            t.extractall(dest, filter="data")
        except tarfile.FilterError as e:
            raise PackageError(f"{t.name}: {e}") from None
        return
    root = dest.resolve()
    for m in t.getmembers():
        target = (root / m.name).resolve()
        link = (target.parent / m.linkname).resolve() if m.issym() else (
            (root / m.linkname).resolve() if m.islnk() else root)
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise PackageError(f"{t.name}: {m.name!r} is a special file")
        if not (target.is_relative_to(root) and link.is_relative_to(root)):
            raise PackageError(f"{t.name}: {m.name!r} would be extracted outside {dest}")
    t.extractall(dest)


def unpack(dsc: Path, dest: Path) -> Path:
    """A 3.0 (quilt) source package unpacked into ``dest``: the upstream tarball (without a
    debian/ of its own), then the debian/ tarball, then every patch of debian/patches/series
    applied in order."""
    files = dsc_files(dsc)
    orig = [f for f in files if ".orig.tar." in f and not f.endswith(".asc")]
    debian = [f for f in files if ".debian.tar." in f]
    if len(orig) != 1 or len(debian) != 1:
        raise PackageError(f"{dsc.name}: expected one .orig and one .debian tarball: {files}")
    with tarfile.open(dsc.parent / orig[0]) as t:
        top = {m.name.split("/")[0] for m in t.getmembers()}
        if len(top) != 1:
            raise PackageError(f"{orig[0]}: not one top directory: {sorted(top)[:5]}")
        extract_tar(t, dest)
    tree = dest / top.pop()
    shutil.rmtree(tree / "debian", ignore_errors=True)  # as dpkg-source: upstream's debian/ goes
    with tarfile.open(dsc.parent / debian[0]) as t:
        extract_tar(t, tree)
    series = tree / "debian" / "patches" / "series"
    patches = [ln.split("#")[0].split()[0] for ln in series.read_text().splitlines()
               if ln.split("#")[0].strip()] if series.exists() else []
    for p in patches:
        run(["patch", "-p1", "-s", "-N", "-i", str(tree / "debian" / "patches" / p)],
            f"patch {p}", cwd=tree)
    return tree


def static_dropbear(arch: str, triplet: str, version: str, cache: Path,
                    progress: Progress) -> Path:
    """The static dropbear server for ``arch`` built from Debian's source ``version``
    (cached in ``cache/dropbear/``; the caller holds the build lock)."""
    out = cache / "dropbear" / f"{arch}-{version.split(':')[-1]}-{build_hash()}" / "dropbear"
    if out.is_file():
        return out
    dsc = AptSource(cache / "apt" / "source").source(SOURCE, version, cache / "src" / SOURCE,
                                                     progress)
    work = out.parent.with_name(out.parent.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        tree = unpack(dsc, work)
        (tree / "localoptions.h").write_text(LOCALOPTIONS)
        progress(f"dropbear {version}: building static for {arch}")
        env = {**os.environ, "CC": f"{triplet}-gcc"}
        run(["./configure", "-q", f"--host={triplet}", *CONFIGURE], "dropbear configure",
            cwd=tree, env=env)
        run(["make", "-s", f"-j{os.cpu_count() or 1}", "PROGRAMS=dropbear", "STATIC=1"],
            "dropbear make", cwd=tree, env=env, timeout=900)
        binary = tree / "dropbear"
        if interpreter(binary) is not None:
            raise PackageError(f"dropbear for {arch} is not static ({interpreter(binary)})")
        run([f"{triplet}-strip", str(binary)], f"{triplet}-strip dropbear")
        final = work / "dropbear"
        binary.rename(final)
        shutil.rmtree(tree)
        work.rename(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
