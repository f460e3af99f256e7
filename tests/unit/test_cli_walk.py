"""``ptlab walk`` / ``ptdump`` over big tables: an engine-built arm64 linear map in 4K pages
(ptlab.dump.synthetic) walks as the engine mapped it, whole, with a work budget that grows
with the memory (the walker's default would stop a 64 GiB machine's walk); the cached line
formatting prints what :func:`ptlab.cli.run_text` prints."""

from __future__ import annotations

import io
import os

import pytest
from ptlab.arch import arch_for
from ptlab.cli import RunLines, main, run_text, walk_budget
from ptlab.dump.synthetic import linear_map_image
from ptlab.formats.catalog import by_name
from ptlab.memory import RawImage
from ptlab.testing import TableBuilder
from ptlab.walk import Walker, translate


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return linear_map_image(tmp_path_factory.mktemp("synth") / "linear.raw", 256 << 20)


def test_linear_map_walks_as_one_run_of_4k_pages(image):
    code, out, err = run(*image.cli_args(), "walk")
    assert code == 0 and not err
    lines = out.splitlines()
    pages = image.ram >> 12
    assert lines[0].startswith(f"{image.linear:#018x}-{image.linear + image.ram:#018x}")
    assert f"{pages} x 4K   pte  rw kern nx global" in lines[0]
    assert lines[-1] == f"# 1 runs, {1 + 1 + 1 + pages // 512} tables, 0 anomalies"
    mem = RawImage(image.path, [(image.ram_base, 0, image.ram)])
    try:  # the one-VA trace (not the walker) agrees at both ends and inside
        fmt = by_name(image.format)
        for off in (0, 0x1234_5000 % image.ram, image.ram - 4096):
            t = translate(fmt, mem, image.root, image.linear + off)
            assert (t.pa, t.page_size, t.level) == (image.ram_base + off, 4096, 0)
    finally:
        mem.close()


def test_ptdump_of_linear_map(image):
    code, out, err = run(*image.cli_args(), "ptdump")
    assert code == 0 and not err
    line = [ln for ln in out.splitlines() if ln.startswith(f"{image.linear:#018x}-")]
    # one line however many tables: ptdump coalesces the whole linear map (arch/arm64/mm/
    # ptdump.c prints PAGE_KERNEL as RW NX SHD AF UXN MEM/NORMAL)
    assert len(line) == 1, line
    assert line[0].split()[1:] == [f"{image.ram >> 20}M", "PTE", "RW", "NX", "SHD", "AF", "UXN",
                                   "MEM/NORMAL"]


def test_budget_grows_with_memory(image, tmp_path):
    """The walk's work grows linearly with RAM; the CLI's budget for a 64 GiB image holds 64
    times the work of this image's walk (the walker's default does not)."""
    from ptlab.walk.walker import DEFAULT_MAX_WORK

    mem = RawImage(image.path, [(image.ram_base, 0, image.ram)])
    try:
        w = Walker(by_name(image.format), mem, image.root, **walk_budget(mem))
        runs = list(w.runs())
        assert len(runs) == 1 and w.complete
        per_gib = w.work * (1 << 30) // image.ram
    finally:
        mem.close()
    big = tmp_path / "64g.raw"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # sparse
    mem = RawImage(big)
    try:
        budget = walk_budget(mem)["max_work"]
    finally:
        mem.close()
        os.unlink(big)
    assert 64 * per_gib > DEFAULT_MAX_WORK  # the default would cut the walk short
    assert 64 * per_gib <= budget


def test_cached_run_lines_equal_run_text():
    fmt = by_name("x86_64-4level")
    b = TableBuilder(fmt)
    ops = arch_for(fmt)
    base = ops.linear_map_base(fmt)
    a = fmt.normalize(ops.page_kernel)
    for i in range(6):
        b.map(base + i * (4 << 20), 0x100000 * (i + 1), 0x3000, fmt.normalize(
            a.with_(writable=bool(i & 1))), level=0)
    b.map(base + (64 << 20), 0x4000_0000, 4 << 20, a, level=1)
    runs = list(Walker(fmt, b.mem, b.root).runs())
    lines = RunLines(fmt)
    assert len(runs) >= 7
    assert [lines(r) for r in runs] == [run_text(fmt, r) for r in runs]
    assert [lines(r) for r in runs] == [run_text(fmt, r) for r in runs]  # from the cache


def test_run_lines_chunks_equal_rows() -> None:
    """RunLines.chunks (one ``%`` per block of lines) prints what rows() prints, line for line,
    across block boundaries, for every size, level and attrs, up to a run ending at 2**64."""
    from ptlab.cli.runs import RunLines
    from ptlab.formats.base import Attrs, Kind
    from ptlab.formats.catalog import by_name

    fmt = by_name("x86_64-4level")
    kinds = [Attrs(present=True, writable=w, exec=x, global_=True)
             for w in (False, True) for x in (False, True)]
    rows = [(0xFFFF_8880_0000_0000 + i * 0x3000, 0x1000 << (i % 3), i * 0x5000,
             4096 << (9 * (i % 2)), i % 2, kinds[i % 4], 1 + i % 7, Kind.LEAF, None)
            for i in range(1000)]
    rows.append((0xFFFF_FFFF_FFE0_0000, 0x20_0000, 0x4000_0000, 0x20_0000, 1, kinds[0], 1,
                 Kind.LEAF, None))
    want = "".join(line + "\n" for line in RunLines(fmt).rows(rows))
    chunks = list(RunLines(fmt).chunks(rows, chunk=97))
    assert "".join(text for text, _ in chunks) == want
    assert [n for _, n in chunks] == [97] * 10 + [31]
    assert want.splitlines()[-1].startswith("0xffffffffffe00000-0x10000000000000000 ")


def test_run_lines_json_chunks_equal_run_json() -> None:
    """RunLines.json_chunks prints ``json.dumps(run_json(fmt, run))`` for every run, byte for
    byte, across block boundaries, for every level and attrs (user, not present, cache and
    software bits), up to a run ending at 2**64."""
    import json

    from ptlab.cli.runs import RunLines, run_json
    from ptlab.formats.base import Attrs, Kind
    from ptlab.walk.runs import Run

    fmt = by_name("x86_64-4level")
    kinds = [Attrs(present=p, writable=w, exec=x, user=u, global_=not u, cache=c, sw=s)
             for p in (True, False) for w in (False, True) for x in (False, True)
             for u in (False, True) for c, s in ((0, 0), (2, 5))]
    rows = [(0xFFFF_8880_0000_0000 + i * 0x3000, 0x1000 << (i % 3), i * 0x5000,
             4096 << (9 * (i % 3)), i % 3, kinds[i % len(kinds)], 1 + i % 7, Kind.LEAF, None)
            for i in range(1000)]
    rows.append((0xFFFF_FFFF_FFE0_0000, 0x20_0000, 0x4000_0000, 0x20_0000, 1, kinds[0], 1,
                 Kind.LEAF, None))
    runs = [Run(va=va, size=size, pa=pa, page_size=ps, level=lv, attrs=a, count=n)
            for va, size, pa, ps, lv, a, n, _, _ in rows]
    want = "".join(json.dumps(run_json(fmt, r)) + "\n" for r in runs)
    chunks = list(RunLines(fmt).json_chunks(rows, chunk=97))
    assert "".join(text for text, _ in chunks) == want
    assert [n for _, n in chunks] == [97] * 10 + [31]
    assert json.loads(want.splitlines()[-1])["end"] == "0x10000000000000000"
