"""``ptlab map --svg``: a picture of a root's address space, one row per ptdump region (the
architecture's address markers: direct map, vmalloc, vmemmap, kernel image, modules, fixmap,
user...), each mapped run drawn where it lies in the region's mapped extent and coloured by
its permissions, with the region's page-size mix as a stacked bar."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from .arch import arch_for
from .formats.base import Attrs, Format

COLOURS = {  # permission class -> fill
    "W+X": "#d62728", "user": "#9467bd", "rw": "#2ca02c", "ro": "#1f77b4", "rx": "#ff7f0e",
}
SIZE_COLOURS = ("#c7e9c0", "#74c476", "#238b45", "#00441b")  # smallest page size first
WIDTH, ROW, LABEL = 1150, 34, 370


def perm(a: Attrs) -> str:
    if a.user:
        return "user"
    if a.writable and a.exec:
        return "W+X"
    if a.exec:
        return "rx"
    return "rw" if a.writable else "ro"


def _size(n: int) -> str:
    for unit, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}".removesuffix(".0") + unit
    return f"{n}B"


def regions(fmt: Format, runs: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    """Runs grouped by the ptdump marker section they start in, in VA order."""
    marks = [m for m in arch_for(fmt).ptdump_markers(fmt) if m.name is not None]
    out: dict[str, list[Any]] = {}
    for r in runs:
        name = next((m.name for m in reversed(marks) if m.start <= r.va), "low")
        out.setdefault(name, []).append(r)
    return list(out.items())


def render(fmt: Format, runs: Sequence[Any], title: str) -> str:
    """The SVG text."""
    groups = regions(fmt, runs)
    sizes = sorted({r.page_size for r in runs})
    bar = WIDTH - LABEL - 130
    h = 70 + ROW * len(groups) + 30
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" '
         f'font-family="monospace" font-size="11">',
         f'<rect width="{WIDTH}" height="{h}" fill="white"/>',
         f'<text x="10" y="18" font-size="14">{escape(title)}</text>']
    x = 10
    for name, colour in COLOURS.items():
        o.append(f'<rect x="{x}" y="30" width="12" height="12" fill="{colour}"/>'
                 f'<text x="{x + 16}" y="40">{name}</text>')
        x += 70
    for i, size in enumerate(sizes):
        colour = SIZE_COLOURS[min(i, len(SIZE_COLOURS) - 1)]
        o.append(f'<rect x="{x}" y="30" width="12" height="12" fill="{colour}"/>'
                 f'<text x="{x + 16}" y="40">{_size(size)} pages</text>')
        x += 100
    for row, (name, rs) in enumerate(groups):
        y = 60 + row * ROW
        lo, hi = rs[0].va, max(r.va + r.size for r in rs)
        mapped = sum(r.size for r in rs)
        o.append(f'<text x="10" y="{y + 12}">{escape(name)}</text>'
                 f'<text x="10" y="{y + 25}" fill="#555">{lo:#x} +{_size(hi - lo)}, '
                 f'{_size(mapped)} mapped</text>')
        o.append(f'<rect x="{LABEL}" y="{y}" width="{bar}" height="24" fill="#eee"/>')
        span = max(hi - lo, 1)
        for r in rs:
            rx = LABEL + bar * (r.va - lo) / span
            rw = max(bar * r.size / span, 0.5)
            o.append(f'<rect x="{rx:.2f}" y="{y}" width="{rw:.2f}" height="24" '
                     f'fill="{COLOURS[perm(r.attrs)]}"><title>{r.va:#x} +{_size(r.size)} '
                     f'{perm(r.attrs)} {_size(r.page_size)}</title></rect>')
        sx = WIDTH - 120
        for i, size in enumerate(sizes):  # page-size mix by bytes
            part = sum(r.size for r in rs if r.page_size == size) / mapped * 110
            if part:
                colour = SIZE_COLOURS[min(i, len(SIZE_COLOURS) - 1)]
                o.append(f'<rect x="{sx:.2f}" y="{y}" width="{part:.2f}" height="24" '
                         f'fill="{colour}"><title>{_size(size)}</title></rect>')
                sx += part
    o.append("</svg>")
    return "\n".join(o) + "\n"
