"""Parse ptdump text (x86-64 or arm64 debugfs format) back into :class:`DumpRun` lines."""

from __future__ import annotations

import re

from .render import X86_LEVEL_NAMES, DumpRun, _size_text

__all__ = ["PtdumpParseError", "detect_arch", "parse"]

_LINE = re.compile(r"^0x([0-9a-f]{16})-0x([0-9a-f]{16})   +(\d+)([BKMGTPE]) (.*)$")
_HEADER = re.compile(r"^---\[ (.*) \]---$")
_SKIPPED = re.compile(r"^\.\.\. \d+ entr(y|ies) skipped \.\.\. ?$")
_ARM64_LEVELS = ("PGD", "P4D", "PUD", "PMD", "PTE")
_UNITS = "BKMGTPE"


class PtdumpParseError(ValueError):
    """Text that is not ptdump output (message names the line)."""


def _arch_of(rest: str) -> str | None:
    words = rest.split()
    if words and words[-1] in X86_LEVEL_NAMES:
        return "x86_64"
    if words and words[0] in _ARM64_LEVELS:
        return "arm64"
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
    arch = arch or (detect_arch(text) if text.strip() else "x86_64")
    if arch not in ("x86_64", "arm64"):
        raise PtdumpParseError(f"no ptdump format for arch {arch!r}")
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
        words = rest.split()
        if arch == "x86_64":
            if not words or words[-1] not in X86_LEVEL_NAMES:
                raise PtdumpParseError(f"line {n}: no x86 level name: {line!r}")
            level, flags = words[-1], tuple(words[:-1])
            span_text = _size_text((end - va) % (1 << 64), _UNITS)
        else:
            if not words or words[0] not in _ARM64_LEVELS:
                raise PtdumpParseError(f"line {n}: no arm64 level name: {line!r}")
            level, flags = words[0], tuple(words[1:])
            span_text = _size_text(((end - va) % (1 << 64)) >> 10, _UNITS[1:])
        if span_text.strip() != f"{number}{unit}":
            raise PtdumpParseError(
                f"line {n}: size {number}{unit} does not match the range ({span_text.strip()})")
        out.append(DumpRun(va, end, flags, level, section))
    return out
