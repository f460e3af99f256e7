"""``ptlab map --svg``: a picture of a root's address space, one row per ptdump region (the
architecture's address markers: direct map, vmalloc, vmemmap, kernel image, modules, fixmap,
user...), each mapped run drawn where it lies in the region's mapped extent and coloured by
its permissions, with the region's page-size mix as a stacked bar."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Box:
    """A filled rectangle (``title``: its tooltip in the SVG)."""

    x: float
    y: float
    w: float
    h: float
    fill: str
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Label:
    x: float
    y: float
    text: str
    fill: str | None = None
    size: int | None = None


def layout(fmt: Format, runs: Sequence[Any], title: str) -> tuple[int, int, list[Box | Label]]:
    """The picture as (width, height, shapes in drawing order)."""
    groups = regions(fmt, runs)
    sizes = sorted({r.page_size for r in runs})
    bar = WIDTH - LABEL - 130
    h = 70 + ROW * len(groups) + 30
    o: list[Box | Label] = [Box(0, 0, WIDTH, h, "white"), Label(10, 18, title, size=14)]
    x = 10
    for name, colour in COLOURS.items():
        o += [Box(x, 30, 12, 12, colour), Label(x + 16, 40, name)]
        x += 70
    for i, size in enumerate(sizes):
        colour = SIZE_COLOURS[min(i, len(SIZE_COLOURS) - 1)]
        o += [Box(x, 30, 12, 12, colour), Label(x + 16, 40, f"{_size(size)} pages")]
        x += 100
    for row, (name, rs) in enumerate(groups):
        y = 60 + row * ROW
        lo, hi = rs[0].va, max(r.va + r.size for r in rs)
        mapped = sum(r.size for r in rs)
        o += [Label(10, y + 12, name),
              Label(10, y + 25, f"{lo:#x} +{_size(hi - lo)}, {_size(mapped)} mapped", "#555"),
              Box(LABEL, y, bar, 24, "#eee")]
        span = max(hi - lo, 1)
        for r in rs:
            o.append(Box(LABEL + bar * (r.va - lo) / span, y, max(bar * r.size / span, 0.5), 24,
                         COLOURS[perm(r.attrs)],
                         f"{r.va:#x} +{_size(r.size)} {perm(r.attrs)} {_size(r.page_size)}"))
        sx = WIDTH - 120
        for i, size in enumerate(sizes):  # page-size mix by bytes
            part = sum(r.size for r in rs if r.page_size == size) / mapped * 110
            if part:
                o.append(Box(sx, y, part, 24, SIZE_COLOURS[min(i, len(SIZE_COLOURS) - 1)],
                             _size(size)))
                sx += part
    return WIDTH, h, o


def render(fmt: Format, runs: Sequence[Any], title: str) -> str:
    """The SVG text."""
    w, h, shapes = layout(fmt, runs, title)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
         f'font-family="monospace" font-size="11">']
    for s in shapes:
        if isinstance(s, Label):
            attrs = (f' fill="{s.fill}"' if s.fill else "") + (
                f' font-size="{s.size}"' if s.size else "")
            o.append(f'<text x="{s.x:g}" y="{s.y:g}"{attrs}>{escape(s.text)}</text>')
        elif s.title is None:
            o.append(f'<rect x="{s.x:g}" y="{s.y:g}" width="{s.w:g}" height="{s.h:g}" '
                     f'fill="{s.fill}"/>')
        else:
            o.append(f'<rect x="{s.x:.2f}" y="{s.y:g}" width="{s.w:.2f}" height="{s.h:g}" '
                     f'fill="{s.fill}"><title>{escape(s.title)}</title></rect>')
    o.append("</svg>")
    return "\n".join(o) + "\n"

# A 3x5 bitmap font for the PNG's labels (rows top to bottom; letters drawn as capitals but a
# lower-case x, so "0x..." reads as hex).
_GLYPHS = dict(zip(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:+-/_()=#?x",
    "111101101101111 010110010010111 111001111100111 111001111001111 101101111001001 "
    "111100111001111 111100111101111 111001010010010 111101111101111 111101111001111 "
    "010101111101101 110101110101110 011100100100011 110101101101110 111100110100111 "
    "111100110100100 011100101101011 101101111101101 111010010010111 001001001101010 "
    "101101110101101 100100100100111 101111111101101 110101101101101 010101101101010 "
    "110101110100100 010101101110011 110101110101101 011100010001110 111010010010010 "
    "101101101101111 101101101101010 101101111111101 101101010101101 101101010010010 "
    "111001010100111 000000000000000 000000000000010 000000000010100 000010000010000 "
    "000010111010000 000000111000000 001001010100100 000000000000111 001010010010001 "
    "100010010010100 000111000111000 101111101111101 111001010000010 000101010101000"
    .split(), strict=True))


def _rgb(colour: str) -> bytes:
    """``#rgb``/``#rrggbb`` or ``white`` as three bytes."""
    if colour == "white":
        return b"\xff\xff\xff"
    hexa = colour.removeprefix("#")
    if len(hexa) == 3:
        hexa = "".join(c * 2 for c in hexa)
    return bytes.fromhex(hexa)


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png(width: int, height: int, shapes: Sequence[Box | Label]) -> bytes:
    """The picture rasterised into an 8-bit RGB PNG (labels in :data:`_GLYPHS`' 3x5 font)."""
    px = bytearray(b"\xff" * (width * height * 3))

    def fill(x0: float, y0: float, x1: float, y1: float, rgb: bytes) -> None:
        a, b = max(0, int(x0)), min(width, max(int(x0) + 1, round(x1)))
        for y in range(max(0, int(y0)), min(height, round(y1))):
            px[(y * width + a) * 3:(y * width + b) * 3] = rgb * max(0, b - a)

    for s in shapes:
        if isinstance(s, Box):
            fill(s.x, s.y, s.x + s.w, s.y + s.h, _rgb(s.fill))
        else:
            k = 3 if s.size and s.size > 11 else 2  # pixels per font dot
            rgb = _rgb(s.fill or "#000")
            for i, ch in enumerate(s.text):
                glyph = _GLYPHS.get(ch) or _GLYPHS.get(ch.upper()) or _GLYPHS["?"]
                for dot in (d for d, bit in enumerate(glyph) if bit == "1"):
                    x0, y0 = s.x + (4 * i + dot % 3) * k, s.y - (5 - dot // 3) * k
                    fill(x0, y0, x0 + k, y0 + k, rgb)
    rows = b"".join(b"\x00" + bytes(px[y * width * 3:(y + 1) * width * 3])
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows, 6)) + _chunk(b"IEND", b""))
