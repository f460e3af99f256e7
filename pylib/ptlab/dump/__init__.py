"""ptdump: the kernel's page-table dump text (x86-64 and arm64), its parser, a W+X audit and
a semantic diff of two walks."""

from .audit import WXReport, check_wx, is_wx, wx_runs
from .diff import Change, diff, shifted
from .markers import Marker, arm64_markers, default_markers, x86_markers
from .parse import PtdumpParseError, detect_arch, parse
from .render import (
    DumpRun,
    Header,
    Skipped,
    dump,
    format_items,
    format_line,
    format_runs,
    kernel_ranges,
    note_runs,
    render,
)

__all__ = [
    "Change", "DumpRun", "Header", "Marker", "PtdumpParseError", "Skipped", "WXReport",
    "arm64_markers", "check_wx", "default_markers", "detect_arch", "diff", "dump",
    "format_items", "format_line", "format_runs", "is_wx", "kernel_ranges", "note_runs",
    "parse", "render", "shifted", "wx_runs", "x86_markers",
]
