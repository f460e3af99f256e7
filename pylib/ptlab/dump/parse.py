"""Parse ptdump text (x86-64 or arm64 debugfs format) back into :class:`DumpRun` lines."""

from __future__ import annotations

import re

from ..arch import ArchError, all_arches, arch_for
from .render import DumpRun

__all__ = ["PtdumpParseError", "detect_arch", "parse"]

_LINE = re.compile(r"^0x([0-9a-f]{16})-0x([0-9a-f]{16})   +(\d+)([BKMGTPE]) (.*)$")
_HEADER = re.compile(r"^---\[ (.*) \]---$")
_SKIPPED = re.compile(r"^\.\.\. \d+ entr(y|ies) skipped \.\.\. ?$")


class PtdumpParseError(ValueError):
    """Text that is not ptdump output (message names the line)."""


def _arch_of(rest: str) -> str | None:
    words = rest.split()
    for ops in all_arches():
        if ops.ptdump_words(words) is not None:
            return ops.name
    return None


def detect_arch(text: str) -> str:
    """"x86_64" or "arm64" from the first range line of ``text``."""
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and (arch := _arch_of(m.group(5))):
            return arch
    raise PtdumpParseError("no ptdump range line found")


def parse(text: str, arch: str | None = None) -> list[DumpRun]:
    """Range lines of ``text`` with the section (marker) each was printed under.

    Headers set the section; "... N entries skipped ..." notes and blank lines are skipped.
    Anything else raises :class:`PtdumpParseError` naming the line.
    """
    if not isinstance(text, str):
        raise TypeError(f"ptdump text must be str, not {type(text).__name__}")
    if arch is None and not text.strip():
        return []
    try:
        ops = arch_for(arch or detect_arch(text))
    except ArchError:
        raise PtdumpParseError(f"no ptdump format for arch {arch!r}") from None
    section = ""
    out: list[DumpRun] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or _SKIPPED.match(line):
            continue
        if h := _HEADER.match(line):
            section = h.group(1)
            continue
        m = _LINE.match(line)
        if not m:
            raise PtdumpParseError(f"line {n}: not a ptdump line: {line!r}")
        va, end = int(m.group(1), 16), int(m.group(2), 16)
        number, unit, rest = int(m.group(3)), m.group(4), m.group(5)
        split = ops.ptdump_words(rest.split())
        if split is None:
            raise PtdumpParseError(f"line {n}: no {ops.name} level name: {line!r}")
        level, flags = split
        span_text = ops.ptdump_size_text((end - va) % (1 << 64))
        if span_text.strip() != f"{number}{unit}":
            raise PtdumpParseError(
                f"line {n}: size {number}{unit} does not match the range ({span_text.strip()})")
        out.append(DumpRun(va, end, flags, level, section))
    return out
