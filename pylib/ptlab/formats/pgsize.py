"""The best page size for the start of a mapping (after generic_pt's pt_compute_best_pgsize).

Mapping [va, va+size) -> [pa, pa+size) with the fewest leaves means starting, at every step,
with the largest page size ``p`` that

1. VA and PA both start at: ``va % p == 0 and pa % p == 0``, and
2. ends inside the range: ``p <= size``,

among the format's leaf page sizes (or the subset a caller allows). Page sizes are powers of
two, so the largest candidate is the lowest set bit of ``va | pa | 2**floor(log2(size))``;
the answer is the largest allowed size not above it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np

from .base import Format, FormatError


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise FormatError(f"{name} must be an integer, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=64)
def _leaf_sizes(fmt: Format) -> tuple[int, ...]:
    return tuple(sorted(fmt.page_sizes().values(), reverse=True))


def allowed_page_sizes(fmt: Format, allowed: Iterable[int] | None = None) -> tuple[int, ...]:
    """``allowed`` checked against ``fmt``'s leaf page sizes (default: all), largest first."""
    if allowed is None:
        return _leaf_sizes(fmt)
    sizes = set(_leaf_sizes(fmt))
    if isinstance(allowed, str | bytes) or not isinstance(allowed, Iterable):
        raise FormatError(f"allowed must be an iterable of page sizes, got {allowed!r}")
    picked = {_int("page size", p) for p in allowed}
    unknown = picked - sizes
    if unknown:
        valid = ", ".join(f"{s:#x}" for s in sorted(sizes))
        bad = ", ".join(f"{s:#x}" for s in sorted(unknown))
        raise FormatError(f"{fmt.name} has no leaf page size {bad} (valid: {valid})")
    return tuple(sorted(picked, reverse=True))


def best_page_size(
    fmt: Format, va: int, pa: int, size: int, allowed: Iterable[int] | None = None
) -> int:
    """The largest leaf page size of ``fmt`` (or of ``allowed``, a subset of its page sizes)
    that can map the start of [va, va+size) to ``pa``; 0 when none can (VA or PA not aligned
    to the smallest candidate, or ``size`` below it).

    ``va`` is a canonical VA and [va, va+size) must lie in one of ``fmt.va_ranges()``;
    [pa, pa+size) must lie below ``2**fmt.pa_bits``. Raises :class:`FormatError` otherwise.
    """
    va, pa, size = _int("VA", va), _int("PA", pa), _int("size", size)
    if size <= 0:
        raise FormatError(f"size must be positive, got {size:#x}")
    if not any(s <= va and va + size <= e for s, e in fmt.va_ranges()):
        raise FormatError(
            f"[{va:#x}, {va + size:#x}) is not inside one VA range of {fmt.name}"
        )
    if pa < 0 or pa + size > 1 << fmt.pa_bits:
        raise FormatError(
            f"[{pa:#x}, {pa + size:#x}) is not below 2**{fmt.pa_bits} ({fmt.name})"
        )
    candidates = allowed_page_sizes(fmt, allowed)
    mask = va | pa | 1 << (size.bit_length() - 1)
    limit = mask & -mask  # lowest set bit: VA, PA and the length's top bit all allow it
    for p in candidates:
        if p <= limit:
            return p
    return 0
