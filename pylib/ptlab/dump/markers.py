"""The kernel's ptdump address markers (``struct addr_marker``), from :mod:`ptlab.arch`.

The values are the architecture modules' (x86-64: :func:`ptlab.arch.x86_64.markers`, arm64:
:func:`ptlab.arch.arm64.markers`); this module names them for ptdump users.
"""

from __future__ import annotations

from ..arch import END, Marker, arch_for
from ..arch.arm64 import layout as arm64_layout
from ..arch.arm64 import markers as arm64_markers
from ..arch.x86_64 import markers as x86_markers
from ..formats.base import Format

__all__ = ["END", "Marker", "arm64_layout", "arm64_markers", "default_markers", "x86_markers"]


def default_markers(fmt: Format, **overrides: object) -> list[Marker]:
    """The markers the kernel uses for ``fmt`` (keyword overrides as in x86_markers /
    arm64_markers, e.g. the guest's KASLR'd page_offset_base or FIXADDR_START)."""
    return arch_for(fmt).ptdump_markers(fmt, **overrides)
