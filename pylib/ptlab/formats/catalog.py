"""Every format configuration ptlab knows, by name."""

from __future__ import annotations

from .base import Format


def all_configs() -> list[Format]:
    """All x86-64 and arm64 configurations (one instance each)."""
    from .arm64 import CONFIGS as ARM64
    from .x86 import CONFIGS as X86

    return [*X86, *ARM64]


def by_name(name: str) -> Format:
    """The configuration called ``name`` (e.g. ``x86_64-5level``, ``arm64-4k-48``)."""
    configs = {f.name: f for f in all_configs()}
    try:
        return configs[name]
    except KeyError:
        known = ", ".join(sorted(configs))
        raise ValueError(f"unknown format {name!r} (known: {known})") from None
