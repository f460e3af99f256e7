"""A progress bar on stderr for commands that take over a second (terminals only).

:class:`Progress` counts the bytes and tables a command reads through its memory (the
instance's ``read``/``read_table``/``view`` wrapped in place, so the memory keeps its type and
attributes) and a timer thread redraws one status line: a bar of the bytes read against the
memory's size (a search reads each mapped byte once; a walk reads only tables, so its bar
stays short and the table count is the measure), the tables read and the seconds taken. It
draws nothing before ``delay`` seconds and clears its line when stopped.
"""

from __future__ import annotations

import threading
import time
from typing import IO, Any

from ..memory import PhysMemory
from .text import size_text

WIDTH = 24  # characters of the bar


def wanted(err: IO[str]) -> bool:
    """Whether ``err`` is a terminal."""
    try:
        return bool(err.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """Count reads through ``mem``; draw a status line on ``err`` after ``delay`` seconds."""

    def __init__(self, mem: PhysMemory, err: IO[str], what: str, *, delay: float = 1.0,
                 period: float = 0.2) -> None:
        self.mem, self.err, self.what = mem, err, what
        self.delay, self.period = delay, period
        self.bytes = self.tables = 0
        self.total = sum(e - s for s, e in mem.ranges())
        self.drawn = False
        self._saved: dict[str, Any] = {}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        for name in ("read", "read_table", "view") if hasattr(mem, "__dict__") else ():
            orig = getattr(mem, name, None)
            if orig is not None:
                self._saved[name] = mem.__dict__.get(name)
                setattr(mem, name, self._counting(name, orig))
        self._thread = threading.Thread(target=self._loop, name="ptlab-progress", daemon=True)
        self._thread.start()

    def _counting(self, name: str, orig: Any) -> Any:
        def wrapped(pa: int, n: int) -> Any:
            if name == "read_table":
                self.tables += 1
                self.bytes += n * 8
            else:
                self.bytes += n
            return orig(pa, n)
        return wrapped

    def line(self) -> str:
        """The status line as drawn now."""
        frac = min(1.0, self.bytes / self.total) if self.total else 0.0
        fill = int(frac * WIDTH)
        return (f"ptlab: {self.what} [{'#' * fill}{'.' * (WIDTH - fill)}] "
                f"{size_text(self.bytes)} of {size_text(self.total)} read, {self.tables} "
                f"tables, {time.monotonic() - self._t0:.1f} s")

    def _loop(self) -> None:
        if self._stop.wait(self.delay):
            return
        while not self._stop.is_set():
            try:
                self.err.write("\r" + self.line() + "\x1b[K")
                self.err.flush()
                self.drawn = True
            except (OSError, ValueError):
                return
            self._stop.wait(self.period)

    def stop(self) -> None:
        """Stop drawing, clear the line, put the memory's own methods back."""
        self._stop.set()
        self._thread.join()
        for name, saved in self._saved.items():
            if saved is None:
                self.mem.__dict__.pop(name, None)
            else:
                setattr(self.mem, name, saved)
        if self.drawn:
            try:
                self.err.write("\r\x1b[K")
                self.err.flush()
            except (OSError, ValueError):
                pass
