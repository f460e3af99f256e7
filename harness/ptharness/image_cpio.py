"""A writer for the cpio "newc" format the kernel unpacks as its initramfs.

Layout per entry (Documentation/driver-api/early-userspace/buffer-format.rst):
a 110-byte ASCII header ("070701" then 13 eight-digit hex fields), the NUL-terminated
name, padding to 4 bytes, the data, padding to 4 bytes. The archive ends with an entry
named "TRAILER!!!".
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class NewcWriter:
    """Append entries to a newc archive; `close()` writes the trailer.

    Entries get fixed mtimes and inode numbers in order, so the same inputs give the same
    bytes. Parent directories must be added before their children (the kernel does not
    create them).
    """

    def __init__(self, out: BinaryIO, *, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 1
        self._names: set[str] = set()
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes, *, uid: int = 0, gid: int = 0,
               nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        name = name.strip("/")
        if not name or name in self._names:
            raise ValueError(f"cpio: empty or duplicate name {name!r}")
        self._names.add(name)
        bname = name.encode() + b"\0"
        fields = (self._ino, mode, uid, gid, nlink, self._mtime, len(data), 0, 0,
                  rdev[0], rdev[1], len(bname), 0)
        self._ino += 1
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + bname + _pad4(len(header) + len(bname)))
        self._out.write(data + _pad4(len(data)))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, b"", nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, b"", rdev=(major, minor))

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def close(self) -> None:
        if not self._closed:
            self._entry(TRAILER, 0, b"")
            self._closed = True


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse a newc archive into (name, mode, data) tuples, trailer excluded (for tests)."""
    entries: list[tuple[str, int, bytes]] = []
    off = 0
    while True:
        if data[off:off + 6] != MAGIC:
            raise ValueError(f"cpio: bad magic at offset {off}")
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_off = off + 110
        name = data[name_off:name_off + namesize - 1].decode()
        data_off = name_off + namesize + _pad4_len(110 + namesize)
        if name == TRAILER:
            return entries
        entries.append((name, mode, data[data_off:data_off + size]))
        off = data_off + size + _pad4_len(size)


def _pad4_len(n: int) -> int:
    return -n % 4
