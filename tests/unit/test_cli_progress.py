"""The progress line: drawn on a terminal after its delay, cleared when stopped, counting the
bytes and tables read; nothing on a stream that is not a terminal."""

from __future__ import annotations

import io
import time

from ptlab.cli.progress import Progress, wanted
from ptlab.memory import RawImage


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_counts_and_clears(tmp_path):
    path = tmp_path / "ram.raw"
    path.write_bytes(bytes(1 << 20))
    mem = RawImage(str(path))
    err = Tty()
    p = Progress(mem, err, "search", delay=0.0, period=0.01)
    mem.read(0, 1 << 19)
    mem.read_table(0, 512)
    deadline = time.monotonic() + 30
    while "tables" not in err.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    p.stop()
    text = err.getvalue()
    assert text.startswith("\rptlab: search [") and text.endswith("\r\x1b[K"), text
    assert p.bytes >= (1 << 19) + 4096 and p.tables == 1  # read_table may call read
    assert "1 tables" in p.line() and "#" * 12 in p.line()  # over half of 1 MiB read
    assert "read" not in mem.__dict__ and "read_table" not in mem.__dict__  # put back
    mem.close()


def test_silent_before_delay_and_off_a_terminal(tmp_path):
    path = tmp_path / "ram.raw"
    path.write_bytes(bytes(1 << 16))
    mem = RawImage(str(path))
    err = Tty()
    p = Progress(mem, err, "walk", delay=60.0)
    mem.read(0, 4096)
    p.stop()
    assert err.getvalue() == "" and p.bytes == 4096
    assert wanted(Tty()) and not wanted(io.StringIO())
    mem.close()
