"""The static dropbear recipe: deb-src entries from the host's sources, .dsc parsing, a 3.0
(quilt) source package unpacked and patched (with a small package made here), bad inputs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from ptharness.image_debs import PackageError
from ptharness.image_dropbear import AptSource, deb_src_entries, dsc_files, unpack

DEB822 = """\
Types: deb
# a comment line inside the stanza
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security/
Suites: bookworm-security
Components: main contrib
Enabled: no
"""


def test_deb822_debian_entries_get_deb_src_twins():
    out = deb_src_entries(DEB822, deb822=True)
    assert out == ("Types: deb-src\nURIs: http://deb.debian.org/debian\n"
                   "Suites: bookworm bookworm-updates\nComponents: main\n"
                   "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")


def test_one_line_debian_entries_get_deb_src_twins():
    text = ("deb http://deb.debian.org/debian bookworm main  # the archive\n"
            "# deb http://deb.debian.org/debian bookworm-backports main\n"
            "deb [arch=amd64] http://security.debian.org/debian-security bookworm-security main\n"
            "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
            "deb-src http://deb.debian.org/debian bookworm main\n")
    assert deb_src_entries(text, deb822=False) == (
        "deb-src http://deb.debian.org/debian bookworm main\n"
        "deb-src [arch=amd64] http://security.debian.org/debian-security bookworm-security main\n")


def test_sources_without_a_debian_entry_are_one_error(tmp_path: Path):
    etc = tmp_path / "etc"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "other.sources").write_text(DEB822.split("\n\n")[1] + "\n")
    (etc / "sources.list.d" / "debian.sources.disabled").write_text(DEB822)  # not read by apt
    with pytest.raises(PackageError, match="no Debian archive entry"):
        AptSource(tmp_path / "apt", etc).write_sources()
    (etc / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    apt = AptSource(tmp_path / "apt", etc)
    apt.write_sources()
    assert (apt.sources / "ptlab-src.list").read_text().startswith("deb-src http://deb.")
    assert (apt.sources / "ptlab-src.sources").read_text() == ""
    assert any(o.endswith(str(apt.sources)) for o in apt.options())


def _tar(path: Path, files: dict[str, bytes], mode: str) -> None:
    with tarfile.open(path, mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


PATCH = b"""\
--- a/hello.c
+++ b/hello.c
@@ -1 +1 @@
-int answer = 41;
+int answer = 42;
"""


def _source_package(tmp: Path, orig_top: str = "pkg-1.0") -> Path:
    _tar(tmp / "pkg_1.0.orig.tar.bz2", {f"{orig_top}/hello.c": b"int answer = 41;\n",
                                         f"{orig_top}/debian/stale": b"upstream's own\n"},
         "w:bz2")
    _tar(tmp / "pkg_1.0-1.debian.tar.xz", {"debian/patches/series": b"# comment\nfix.patch\n",
                                            "debian/patches/fix.patch": PATCH}, "w:xz")
    dsc = tmp / "pkg_1.0-1.dsc"
    dsc.write_text("Format: 3.0 (quilt)\nSource: pkg\nFiles:\n"
                   " 0123 10 pkg_1.0.orig.tar.bz2\n 4567 20 pkg_1.0-1.debian.tar.xz\n"
                   "Checksums-Sha256:\n 89ab 10 pkg_1.0.orig.tar.bz2\n")
    return dsc


def test_unpack_applies_the_series_over_upstream(tmp_path: Path):
    dsc = _source_package(tmp_path)
    assert dsc_files(dsc) == ["pkg_1.0.orig.tar.bz2", "pkg_1.0-1.debian.tar.xz"]
    tree = unpack(dsc, tmp_path / "work")
    assert tree == tmp_path / "work" / "pkg-1.0"
    assert (tree / "hello.c").read_text() == "int answer = 42;\n"
    assert not (tree / "debian" / "stale").exists()  # upstream's debian/ replaced


def test_unpack_refuses_a_tarball_with_two_tops(tmp_path: Path):
    dsc = _source_package(tmp_path)
    _tar(tmp_path / "pkg_1.0.orig.tar.bz2", {"a/x": b"", "b/y": b""}, "w:bz2")
    with pytest.raises(PackageError, match="not one top directory"):
        unpack(dsc, tmp_path / "work")


def test_unpack_names_a_patch_that_does_not_apply(tmp_path: Path):
    dsc = _source_package(tmp_path)
    _tar(tmp_path / "pkg_1.0.orig.tar.bz2", {"pkg-1.0/hello.c": b"int other;\n"}, "w:bz2")
    with pytest.raises(PackageError, match="patch fix.patch failed"):
        unpack(dsc, tmp_path / "work")


@pytest.mark.parametrize("python_has_filters", [True, False])
def test_unpack_refuses_members_outside_the_tree(tmp_path: Path, monkeypatch,
                                                 python_has_filters: bool):
    """With tarfile's data filter or, on a Python without it (Debian 12's 3.11.2), the
    module's own checks: a member escaping the tree is one PackageError, nothing written."""
    if not python_has_filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile filters")
    dsc = _source_package(tmp_path)
    _tar(tmp_path / "pkg_1.0-1.debian.tar.xz", {"debian/../../escaped": b"x"}, "w:xz")
    with pytest.raises(PackageError, match="escaped"):
        unpack(dsc, tmp_path / "work")
    assert not (tmp_path / "work" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()
    dsc = _source_package(tmp_path)  # and a good package still unpacks the same way
    assert (unpack(dsc, tmp_path / "work2") / "hello.c").read_text() == "int answer = 42;\n"
