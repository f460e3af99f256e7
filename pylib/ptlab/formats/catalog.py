"""Every format configuration ptlab knows, by name."""

from __future__ import annotations

from .base import Format


def all_configs() -> list[Format]:
    """All x86-64 and arm64 configurations (one instance each)."""
    from .arm64 import CONFIGS as ARM64
    from .x86 import CONFIGS as X86

    return [*X86, *ARM64]


def by_name(name: str) -> Format:
    """The configuration called ``name`` (e.g. ``x86_64-5level``, ``arm64-4k-48``), or a
    variant a format module builds on demand (``arm64-4k-52-ttbr0``: the user regime of a
    52-bit arm64 kernel, :func:`ptlab.formats.arm64.variant`)."""
    from .arm64 import variant as arm64_variant

    configs = {f.name: f for f in all_configs()}
    found = configs.get(name) or arm64_variant(name)
    if found is None:
        known = ", ".join(sorted(configs))
        raise ValueError(f"unknown format {name!r} (known: {known}, and the -ttbr0 of each "
                         "arm64 one)")
    return found
