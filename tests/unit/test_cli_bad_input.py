"""Bad input the adversarial pass of issue 7 found: each gives one ``ptlab: error:`` line and
exit status 2 within seconds (FIFOs, unbounded scans, cyclic tables, ``--end 0``, newlines in
paths, a dump truncated while in use, non-ASCII digits, empty option values)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from ptlab.formats.catalog import by_name
from ptlab.memory import RawImage
from ptlab.memory.raw import FileChanged
from test_cli import make_x86_files, run

TIMEOUT = 60  # seconds: far above what a bounded run takes, far below "forever"


def ptlab(*argv: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ptlab.cli", *argv], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error(code: int, out: str, err: str, pattern: str) -> None:
    assert code == 2, (code, out, err)
    assert err.startswith("ptlab: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert pattern in err, err


@pytest.fixture
def x86(tmp_path):
    return make_x86_files(tmp_path)


@pytest.mark.parametrize("opt", ["--elf", "--raw", "--vmcoreinfo"])
def test_fifo_is_refused_not_opened_blocking(x86, tmp_path, opt):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    argv = [opt, str(fifo)] if opt != "--vmcoreinfo" else ["--elf", x86["core"], opt, str(fifo)]
    if opt == "--raw":
        argv += ["--format", "x86_64-4level"]
    p = ptlab(*argv, "info", timeout=20)  # blocked forever before the fix
    assert_one_error(p.returncode, p.stdout, p.stderr, "is not a regular file")


def test_device_is_refused(x86):
    assert_one_error(*run("--elf", "/dev/zero", "info"), "/dev/zero is not a regular file")
    assert_one_error(*run("--elf", x86["core"], "--vmcoreinfo", "/dev/zero", "info"),
                     "VMCOREINFO file /dev/zero is not a regular file")


def test_vmcoreinfo_scan_is_bounded(tmp_path):
    """A 1 TiB sparse raw image (a note planted just past the scan bound): the scan reads at most
    SCAN_LIMIT bytes, skips holes, and says where it stopped."""
    from ptlab.cli import SCAN_LIMIT

    big = tmp_path / "big.raw"
    note = (b"\x0b\0\0\0" + (200).to_bytes(4, "little") + bytes(4) + b"VMCOREINFO\0\0"
            + b"OSRELEASE=6.1.0\nPAGESIZE=4096\n")
    with open(big, "wb") as f:
        f.truncate(1 << 40)
        f.seek(SCAN_LIMIT + 0x1000)
        f.write(note.ljust(0x1000, b"\0"))
    t0 = time.monotonic()
    p = ptlab("--raw", str(big), "--vmcoreinfo", "scan", "info")
    elapsed = time.monotonic() - t0
    assert_one_error(p.returncode, p.stdout, p.stderr, "no VMCOREINFO note found")
    assert f"at most its first {SCAN_LIMIT >> 30}G" in p.stderr
    assert elapsed < 20, elapsed
    # the same note below the bound is found
    with open(big, "r+b") as f:
        f.seek(0x7000)
        f.write(note)
    code, out, err = run("--raw", str(big), "--vmcoreinfo", "scan", "--format",
                         "x86_64-4level", "info")
    assert code == 0, err
    assert "OSRELEASE=6.1.0" in out and "note found in memory at PA 0x7000" in out


def cycle_image(path) -> None:
    """Three tables whose 512 entries all point to the next: A -> B -> C -> A (12 KiB)."""
    f = by_name("x86_64-4level")
    tables = [0x0, 0x1000, 0x2000]
    with open(path, "wb") as out:
        for i in range(3):
            nxt = tables[(i + 1) % 3]
            out.write(np.full(512, f.table(nxt, 3), dtype="<u8").tobytes())


@pytest.mark.parametrize("cmd", ["walk", "ptdump", "wx"])
def test_cyclic_tables_end(tmp_path, cmd):
    img = tmp_path / "cycle.raw"
    cycle_image(img)
    t0 = time.monotonic()
    p = ptlab("--raw", str(img), "--format", "x86_64-4level", "--root", "0", cmd)
    elapsed = time.monotonic() - t0
    assert "Traceback" not in p.stderr
    assert elapsed < 20, elapsed
    if cmd == "wx":  # a partial walk gives no verdict, never "passed"
        assert p.returncode == 2 and "passed" not in p.stdout, (p.stdout, p.stderr)
        assert p.stderr.count("\n") == 1 and "work budget" in p.stderr
    else:
        assert p.returncode == 0, p.stderr
    if cmd == "walk":
        assert "(cycle)" in p.stdout and "budget" in p.stdout


@pytest.mark.parametrize("cmd", ["walk", "ptdump", "wx"])
def test_end_zero_is_an_empty_range(x86, cmd):
    assert_one_error(*run("--elf", x86["core"], cmd, "--end", "0"), "empty range")


def test_ptdump_end_bounds_the_lines(x86):
    code, out, err = run("--elf", x86["core"], "ptdump", "--start", "0xffffffff81000000",
                         "--end", "0xffffffff81200000")
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("0x")]
    assert lines and all(ln.startswith("0xffffffff81") for ln in lines), out


def test_newline_in_path_is_one_line(tmp_path):
    bad = tmp_path / "evil\nptlab: error: forged.core"
    assert_one_error(*run("--elf", str(bad), "info"), "evil\\nptlab: error: forged.core")
    bad.write_bytes(b"not an elf at all")
    assert_one_error(*run("--elf", str(bad), "info"), "not an ELF file")


@pytest.mark.parametrize("value", ["\u0661\u0660\u0660\u0660",  # Arabic-Indic 1000
                                   "\uff14\uff10\uff19\uff16",  # fullwidth 4096
                                   "0x\u0661\u0660\u0660\u0660"])
def test_non_ascii_digits_refused(x86, value):
    assert_one_error(*run("--elf", x86["core"], "--root", value, "walk"), "bad root PA")
    assert_one_error(*run("--elf", x86["core"], "translate", value), "bad VA")


@pytest.mark.parametrize(("opt", "argv"), [
    ("--format", ["--elf", "{core}", "--format", "", "walk"]),
    ("--elf", ["--elf", "", "walk"]),
    ("--raw", ["--raw", "", "walk"]),
    ("--vmcoreinfo", ["--elf", "{core}", "--vmcoreinfo", "", "walk"]),
    ("start", ["--elf", "{core}", "walk", "--start", ""]),
    ("end", ["--elf", "{core}", "walk", "--end", ""]),
    ("root", ["--elf", "{core}", "--root", "", "walk"]),
])
def test_empty_values_are_errors(x86, opt, argv):
    argv = [a.format(**x86) for a in argv]
    code, out, err = run(*argv)
    assert_one_error(code, out, err, "")
    assert opt.strip("-") in err or "bad" in err, err


def test_truncated_file_is_an_error_not_sigbus(x86, tmp_path):
    raw = x86["raw"]
    mem = RawImage(raw, [(0, 0x1000, 0x8000)])
    try:
        assert mem.read_table(0x1000, 512).any()
        os.truncate(raw, 0x1800)
        with pytest.raises(FileChanged, match="truncated while in use"):
            mem.read_table(0x1000, 512)
    finally:
        mem.close()


def test_cli_dump_truncated_while_open(x86, tmp_path):
    """The file shrinks after the CLI opened it (it used to be mapped: SIGBUS, no message)."""
    for kind, path, extra in (("raw", x86["raw"], ["--region", "0:0x1000:0x8000",
                                                   "--format", "x86_64-4level",
                                                   "--root", "0x1000"]),
                              ("elf", x86["core"], [])):
        size = os.path.getsize(path)
        script = textwrap.dedent(f"""
            import os, sys
            from ptlab import cli
            real = cli.open_input
            def open_then_truncate(args, *rest):
                src = real(args, *rest)
                os.truncate({path!r}, {min(size, 0x1800)})
                return src
            cli.open_input = open_then_truncate
            sys.exit(cli.main(["--{kind}", {path!r}, *{extra!r}, "walk"]))
        """)
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert p.returncode == 2, (kind, p.returncode, p.stderr)  # -7 was SIGBUS
        assert_one_error(p.returncode, p.stdout, p.stderr, "truncated while in use")
