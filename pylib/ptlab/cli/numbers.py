"""Numbers from the command line: integers with an optional size suffix, VAs and raw-image
regions."""

from __future__ import annotations

from .errors import CliError

U64 = (1 << 64) - 1
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_int(text: str, what: str = "number") -> int:
    """Decimal or 0x/0o/0b-prefixed integer (underscores allowed), optional K/M/G/T suffix."""
    t = text.strip().replace("_", "").lower()
    if not t.isascii():  # int() would take Arabic-Indic, fullwidth, ... digits
        raise CliError(f"bad {what} {text!r} (use ASCII decimal or 0x-prefixed hex)")
    mult = 1
    if t and t[-1] in _SUFFIX and not t.startswith("0x"):
        mult, t = _SUFFIX[t[-1]], t[:-1]
    try:
        value = int(t, 0) * mult
    except ValueError:
        raise CliError(f"bad {what} {text!r} (use decimal or 0x-prefixed hex)") from None
    if value < 0:
        raise CliError(f"bad {what} {text!r}: negative")
    return value


def parse_va(text: str) -> int:
    v = parse_int(text, "VA")
    if v > U64:
        raise CliError(f"VA {text!r} does not fit in 64 bits")
    return v


def parse_region(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise CliError(f"bad region {text!r}: want PA:FILE_OFFSET:SIZE")
    pa, off, size = (parse_int(p, f"{name} in region {text!r}:")
                     for p, name in zip(parts, ("PA", "file offset", "size"), strict=True))
    return pa, off, size
