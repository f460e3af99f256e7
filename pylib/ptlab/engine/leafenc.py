"""Vectorised leaf encoding: many output addresses, one set of attributes, one level.

Derived once per (attrs, level) from the format's scalar codec: the raw value of a leaf
with OA 0 plus, per OA bit, which raw bits that OA bit flips. For every format ptlab has
(x86 incl. L1TF-inverted non-present entries, arm64 incl. LPA/LPA2 OA placement) encoding
is XOR-linear in the OA, so ``raw = base ^ f(oa)``; the derivation is checked against the
scalar codec on sample addresses and falls back to a scalar loop if that ever fails.
A format may provide its own ``encode_oas(oas, attrs, level)``; it is then used instead.
"""

from __future__ import annotations

import random

import numpy as np

from ..formats.base import Attrs, Format

_Plan = tuple[int, int, tuple[tuple[int, int], ...], bool]


class LeafEncoder:
    """``encode(oas, attrs, level)`` -> uint64 raws of leaves mapping ``oas``."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self._plans: dict[tuple[Attrs, int], _Plan] = {}
        self._native = getattr(fmt, "encode_oas", None)

    def encode(self, oas: np.ndarray, attrs: Attrs, level: int) -> np.ndarray:
        if self._native is not None:
            return np.asarray(self._native(oas, attrs, level), dtype=np.uint64)
        plan = self._plans.get((attrs, level))
        if plan is None:
            plan = self._plans[(attrs, level)] = self._derive(attrs, level)
        base, ident, extras, scalar = plan
        oas = np.asarray(oas, dtype=np.uint64)
        if scalar:
            leaf = self.fmt.leaf
            return np.fromiter((leaf(int(o), attrs, level) for o in oas), np.uint64, oas.size)
        out = (oas & np.uint64(ident)) ^ np.uint64(base)
        for bit, delta in extras:
            out ^= ((oas >> np.uint64(bit)) & np.uint64(1)) * np.uint64(delta)
        return out

    def one(self, oa: int, attrs: Attrs, level: int) -> int:
        return self.fmt.leaf(oa, attrs, level)

    def _derive(self, attrs: Attrs, level: int) -> _Plan:
        fmt = self.fmt
        base = fmt.leaf(0, attrs, level)
        lo, hi = fmt.shift(level), fmt.pa_bits
        ident, extras = 0, []
        for bit in range(lo, hi):
            delta = fmt.leaf(1 << bit, attrs, level) ^ base
            if delta == 1 << bit:
                ident |= delta
            else:
                extras.append((bit, delta))
        plan: _Plan = (base, ident, tuple(extras), False)
        rng = random.Random(level * 7919 + hash(attrs) % 65521)
        samples = [((1 << hi) - 1) >> lo << lo] + [
            rng.randrange(0, 1 << hi) >> lo << lo for _ in range(6)
        ]
        self._plans[(attrs, level)] = plan
        got = self.encode(np.array(samples, dtype=np.uint64), attrs, level)
        if [int(g) for g in got] != [fmt.leaf(s, attrs, level) for s in samples]:
            return (base, 0, (), True)
        return plan
