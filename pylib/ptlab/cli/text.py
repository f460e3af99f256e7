"""Text the commands print: sizes, attributes, level names, VA ranges, escaped messages,
lines written in chunks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO

from ..formats.base import Attrs, Format


def one_line(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (a file name holding a
    newline must not split an error message)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def level_name(fmt: Format, level: int | None) -> str:
    return "?" if level is None else fmt.level_name(level)


def size_text(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def attrs_text(a: Attrs | None) -> str:
    if a is None:
        return "-"
    bits = ["rw" if a.writable else "ro", "user" if a.user else "kern",
            "x" if a.exec else "nx"]
    if a.user:
        bits.append("ux" if a.uexec else "unx")
    bits += [name for name, on in (("global", a.global_), ("accessed", a.accessed),
                                   ("dirty", a.dirty), ("cont", a.contiguous), ("ns", a.ns),
                                   ("dbm", a.dbm)) if on]
    if not a.present:
        bits.insert(0, "NOT-PRESENT")
    for name in ("cache", "sw", "pkey", "shareability"):
        v = getattr(a, name)
        if v:
            bits.append(f"{name}={v}")
    return " ".join(bits)


def _ranges_text(fmt: Format) -> str:
    return ", ".join(f"{s:#x}-{e - 1:#x}" for s, e in fmt.va_ranges())


def write_lines(out: IO[str], lines: Iterator[str], chunk: int = 4096) -> int:
    """Write ``lines`` (newline added) in chunks of ``chunk`` lines; returns their number."""
    n, buf = 0, []
    for line in lines:
        buf.append(line)
        if len(buf) == chunk:
            out.write("\n".join(buf) + "\n")
            n, buf = n + len(buf), []
    if buf:
        out.write("\n".join(buf) + "\n")
    return n + len(buf)


def write_chunks(out: IO[str], chunks: Iterable[tuple[str, int]]) -> int:
    """Write text blocks given with their line counts; returns the lines written."""
    n = 0
    for text, lines in chunks:
        out.write(text)
        n += lines
    return n
