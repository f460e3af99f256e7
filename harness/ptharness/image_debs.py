"""Debian packages for the images: resolve, download and extract, never install.

Each Debian architecture gets a private apt state (lists + cache under the image cache,
status file /dev/null), so neither the host's dpkg architectures nor its package lists
are touched or relied on: `apt-get -o APT::Architecture=arm64 ... download` works on an
amd64 host. The host's sources.list is used as is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

Progress = Callable[[str], None]
LISTS_MAX_AGE_S = 24 * 3600


class PackageError(RuntimeError):
    """apt or dpkg failed, or a package is unknown."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str          # Debian architecture of the .deb ("amd64", "arm64", "all")
    depends: str       # raw Depends field ("" if none)

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def run(cmd: list[str], what: str, cwd: Path | None = None, timeout: float = 600,
        env: dict[str, str] | None = None) -> str:
    """``cmd``'s stdout; PackageError naming ``what`` with the output's last lines if it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                              env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PackageError(f"{what}: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise PackageError(f"{what} failed ({proc.returncode}): {tail}")
    return proc.stdout


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """Parse deb822 stanzas (apt-cache show output) into dicts; continuation lines joined."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur, key = {}, ""
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            cur[key] = value.strip()
    if cur:
        out.append(cur)
    return out


class AptArch:
    """Private apt state for one Debian architecture under `root` (images/cache/apt/<arch>)."""

    def __init__(self, debarch: str, root: Path) -> None:
        self.debarch = debarch
        self.root = root.resolve()
        self.lists = self.root / "lists"
        self.cache = self.root / "cache"

    def options(self) -> list[str]:
        opts = [
            f"-o=Dir::State::Lists={self.lists}",
            f"-o=Dir::Cache={self.cache}",
            "-o=Dir::State::status=/dev/null",
            f"-o=APT::Architecture={self.debarch}",
            f"-o=APT::Architectures::={self.debarch}",
            "-o=Debug::NoLocking=1",
        ]
        if os.geteuid() == 0:
            opts.append("-o=APT::Sandbox::User=root")
        return opts

    def _lists_age(self) -> float | None:
        stamp = self.root / "updated"
        return time.time() - stamp.stat().st_mtime if stamp.exists() else None

    def update(self, progress: Progress, *, force: bool = False) -> None:
        """apt-get update into the private lists when missing, stale (> 1 day) or forced.

        A failed refresh of existing lists only warns (offline rebuilds keep working).
        """
        age = self._lists_age()
        if not force and age is not None and age < LISTS_MAX_AGE_S:
            return
        (self.lists / "partial").mkdir(parents=True, exist_ok=True)
        (self.cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        progress(f"apt: updating package lists for {self.debarch}")
        try:
            run(["apt-get", "-q", *self.options(), "update"], f"apt-get update ({self.debarch})")
        except PackageError as e:
            if age is None:
                raise
            progress(f"apt: refresh failed, using lists {age / 3600:.0f} h old: {e}")
            return
        (self.root / "updated").touch()

    def _memo(self) -> tuple[float, dict[str, dict[str, str]]]:
        stamp = self.root / "updated"
        mtime = stamp.stat().st_mtime if stamp.exists() else 0.0
        try:
            memo = json.loads((self.root / "candidates.json").read_text())
            if memo.get("stamp") == mtime:
                return mtime, memo["packages"]
        except (OSError, ValueError, KeyError):
            pass
        return mtime, {}

    def show(self, names: list[str]) -> dict[str, Package]:
        """The candidate version of each package.

        Answers are remembered until the lists are next updated, so a cached image lookup
        needs no apt-cache run (which takes ~0.5 s per call).
        """
        mtime, memo = self._memo()
        if all(n in memo for n in names):
            return {n: Package(**memo[n]) for n in names}
        found = self._apt_show(names)
        memo.update({n: asdict(p) for n, p in found.items()})
        tmp = self.root / f"candidates.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps({"stamp": mtime, "packages": memo}))
        tmp.rename(self.root / "candidates.json")
        return found

    def _apt_show(self, names: list[str]) -> dict[str, Package]:
        """The candidate version of each package (one apt-cache call)."""
        text = run(["apt-cache", *self.options(), "show", "--no-all-versions", *names],
                   f"apt-cache show {' '.join(names)} ({self.debarch})")
        found: dict[str, Package] = {}
        for st in parse_stanzas(text):
            if "Package" in st and "Version" in st:
                found.setdefault(st["Package"], Package(
                    st["Package"], st["Version"], st.get("Architecture", self.debarch),
                    st.get("Depends", "")))
        missing = [n for n in names if n not in found]
        if missing:
            raise PackageError(f"no {self.debarch} candidate for: {' '.join(missing)}")
        return found

    def kernel_package(self, meta: str) -> Package:
        """The linux-image-<abi> package the meta package (e.g. linux-image-amd64) names."""
        dep = self.show([meta])[meta].depends
        for alt in dep.split(","):
            name = alt.split("|")[0].strip().split(" ")[0]
            if name.startswith("linux-image-") and name != meta:
                return self.show([name])[name]
        raise PackageError(f"{meta} names no linux-image package (Depends: {dep!r})")

    def download(self, pkg: Package, dest: Path, progress: Progress) -> Path:
        """The .deb of `pkg` in `dest`, downloaded unless already there."""
        deb = dest / pkg.deb_name
        if deb.exists():
            return deb
        dest.mkdir(parents=True, exist_ok=True)
        progress(f"apt: downloading {pkg.name} {pkg.version} ({self.debarch})")
        run(["apt-get", "-q", *self.options(), "download", f"{pkg.name}={pkg.version}"],
            f"apt-get download {pkg.name}", cwd=dest)
        if not deb.exists():
            got = sorted(p.name for p in dest.glob(f"{pkg.name}_*.deb"))
            raise PackageError(f"apt-get download {pkg.name}: expected {deb.name}, have {got}")
        return deb


def extract(deb: Path, dest: Path, progress: Progress) -> Path:
    """dpkg-deb -x `deb` into `dest` (once: an existing tree is reused)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    progress(f"dpkg-deb: extracting {deb.name}")
    try:
        run(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def host_versions(names: list[str]) -> dict[str, str]:
    """Installed versions of host packages (dpkg-query); a missing one raises."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Version} ${db:Status-Abbrev}\n", *names],
        capture_output=True, text=True)
    found: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("ii"):
            found[parts[0].split(":")[0]] = parts[1]
    missing = [n for n in names if n not in found]
    if missing:
        raise PackageError(f"host packages not installed: {' '.join(missing)}"
                           " (make host-deps installs them)")
    return found
