"""``ptlab translate VA...``: the batch path (ptlab.vtop.translate_many) gives what the one-VA
trace (ptlab.walk.translate) gives, VA by VA, on built tables of several formats and on garbage
memory (cycles, tables outside memory, non-present entries); the CLI reads VAs from arguments,
a file and stdin, and writes text or one JSON object per line."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import time

import numpy as np
import pytest
from ptlab.arch import arch_for
from ptlab.formats.catalog import by_name
from ptlab.memory import SparseMemory
from ptlab.testing import TableBuilder
from ptlab.vtop import translate_many
from ptlab.walk import translate
from test_cli import make_x86_files, run

SEED = int(os.environ.get("PTLAB_SEED", random.randrange(1 << 30)))


def scalar_answers(fmt, mem, root, vas):
    out = []
    for va in vas:
        t = translate(fmt, mem, root, int(va))
        out.append((t.pa if t.level is not None else None, t.page_size, t.level, t.attrs,
                    t.fault))
    return out


def batch_answers(fmt, mem, root, vas):
    b = translate_many(fmt, mem, root, np.array(vas, dtype=np.uint64))
    out = []
    for i in range(len(vas)):
        leaf = b.level[i] >= 0
        out.append((int(b.pa[i]) if leaf else None, int(b.page_size[i]) if leaf else None,
                    int(b.level[i]) if leaf else None,
                    b.attr_table[b.attrs[i]] if leaf else None, b.faults[b.fault[i]]))
    return out


def random_vas(fmt, rng, near, n):
    """VAs near the mapped ones, random ones in range, and a few outside the format."""
    vas = [v + rng.randrange(1 << 22) for v in rng.choices(near, k=n // 2)]
    lo, hi = fmt.va_ranges()[-1]
    vas += [rng.randrange(lo, hi) for _ in range(n // 4)]
    vas += [rng.randrange(1 << 64) for _ in range(n // 4)]
    return [v & ((1 << 64) - 1) for v in vas]


@pytest.mark.parametrize("name", ["x86_64-4level", "x86_64-5level", "arm64-4k-48",
                                  "arm64-16k-47", "arm64-64k-42", "arm64-4k-39"])
def test_batch_equals_one_by_one_on_built_tables(name):
    rng = random.Random(f"{SEED}:{name}")
    print(f"PTLAB_SEED={SEED}")
    fmt = by_name(name)
    b = TableBuilder(fmt)
    ops = arch_for(fmt)
    base = ops.linear_map_base(fmt)
    attrs = fmt.normalize(ops.page_kernel)
    near = []
    for i in range(12):  # pages and blocks, some with other permissions
        level = rng.choice(sorted(fmt.leaf_levels & {0, 1}))
        esize = fmt.entry_size(level)
        va = (base + rng.randrange(1 << 30)) // esize * esize
        a = attrs.with_(writable=bool(i % 2), exec=bool(i % 3 == 0))
        try:
            b.map(va, 0x4000_0000 + i * esize, esize * rng.randrange(1, 4), fmt.normalize(a),
                  level=level)
        except Exception:  # overlaps an earlier mapping at another level: skip it
            continue
        near.append(va)
    vas = random_vas(fmt, rng, near, 4000)
    assert batch_answers(fmt, b.mem, b.root, vas) == scalar_answers(fmt, b.mem, b.root, vas)


@pytest.mark.parametrize("name", ["x86_64-4level", "arm64-4k-48"])
def test_batch_equals_one_by_one_on_garbage(name):
    """Random entries in a few pages that point at each other: cycles, tables outside
    memory, leaves, empties and malformed entries at every level."""
    rng = random.Random(f"{SEED}:garbage:{name}")
    fmt = by_name(name)
    page = fmt.table_bytes
    n_pages = 6
    mem = SparseMemory(n_pages * page + page)
    pointers = [p * page for p in range(n_pages)] + [0x7000_0000]  # last: outside memory
    for p in range(n_pages):
        raws = []
        for _ in range(page // 8):
            r = rng.random()
            if r < 0.5:
                raws.append(fmt.table(rng.choice(pointers), rng.randrange(1, fmt.top_level + 1)))
            elif r < 0.7:
                raws.append(0)
            else:
                raws.append(rng.randrange(1 << 64))
        mem.write_table(p * page, np.array(raws, dtype=np.uint64))
    vas = random_vas(fmt, rng, [fmt.va_ranges()[-1][0]], 3000)
    assert batch_answers(fmt, mem, 0, vas) == scalar_answers(fmt, mem, 0, vas)


def test_cli_many_vas(tmp_path, monkeypatch):
    x86 = make_x86_files(tmp_path)
    vas = ["0xffffffff81201000", "0xffffffff81000123", "0xffffffff81202000", "0x900000000000"]
    code, out, err = run("--elf", x86["core"], "translate", *vas)
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert lines == [
        "0xffffffff81201000 -> 0x6000  4K pte  rw kern x global accessed dirty",
        "0xffffffff81000123 -> 0x200123  2M pmd  ro kern x global accessed dirty",
        "0xffffffff81202000 fault: not present at pte",
        "0x0000900000000000 fault: non-canonical",
    ]
    listing = tmp_path / "vas.txt"
    listing.write_text("# kernel text\n0xffffffff81000123\n\n0xffffffff81201000  # W+X\n")
    code, out, err = run("--elf", x86["core"], "translate", "--json", "--file", str(listing))
    assert code == 0, err
    objs = [json.loads(ln) for ln in out.splitlines()]
    assert objs == [
        {"va": "0xffffffff81000123", "pa": "0x200123", "page_size": 2 << 20, "level": 1,
         "level_name": "pmd", "attrs": "ro kern x global accessed dirty", "fault": None},
        {"va": "0xffffffff81201000", "pa": "0x6000", "page_size": 4096, "level": 0,
         "level_name": "pte", "attrs": "rw kern x global accessed dirty", "fault": None},
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("0xffffffff81202000\n"))
    code, out, err = run("--elf", x86["core"], "translate", "--json", "-")
    assert code == 1
    assert json.loads(out) == {"va": "0xffffffff81202000", "pa": None, "page_size": None,
                               "level": None, "level_name": None, "attrs": None,
                               "fault": "not present at pte"}
    # one VA without --json keeps the per-level trace
    code, out, _ = run("--elf", x86["core"], "translate", "0xffffffff81201000")
    assert code == 0 and out.splitlines()[-1].startswith("=> PA 0x6000")


@pytest.mark.parametrize(("argv", "stdin", "pattern"), [
    (["translate", "--file", "{bad}"], "", "line 2: bad VA 'zz'"),
    (["translate", "-"], "0x1\n0x1g\n", "stdin line 2: bad VA"),
    (["translate", "-", "--file", "-"], "", "stdin ('-') given twice"),
    (["translate", "--file", "{empty}"], "", "no VA given"),
    (["translate"], "", "no VA given"),
    (["translate", "--file", "/nonexistent"], "", "cannot open VA file /nonexistent"),
])
def test_cli_translate_bad_input(tmp_path, monkeypatch, argv, stdin, pattern):
    x86 = make_x86_files(tmp_path)
    (tmp_path / "bad").write_text("0x1\nzz\n")
    (tmp_path / "empty").write_text("# nothing\n")
    files = {"bad": str(tmp_path / "bad"), "empty": str(tmp_path / "empty")}
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, out, err = run("--elf", x86["core"], *[a.format(**files) for a in argv])
    assert code == 2 and err.count("\n") == 1 and pattern in err, err


def test_batch_rate_on_a_linear_map():
    """The figure behind translate_vas_per_s: 200k VAs over a 1 GiB-guest linear map."""
    from ptlab.testing import linear_map_model

    b = linear_map_model()
    rng = np.random.default_rng(SEED)
    base = arch_for(b.fmt).linear_map_base(b.fmt)
    vas = base + rng.integers(0, 1 << 30, size=200_000, dtype=np.uint64)
    t0 = time.perf_counter()
    res = translate_many(b.fmt, b.mem, b.root, vas)
    secs = time.perf_counter() - t0
    print(f"translate_many: {len(vas) / secs:,.0f} VAs/s")
    assert res.mapped().sum() > 0.9 * len(vas)
    some = rng.choice(len(vas), 200, replace=False)
    want = scalar_answers(b.fmt, b.mem, b.root, vas[some])
    got = batch_answers(b.fmt, b.mem, b.root, vas[some])
    assert got == want


@pytest.mark.parametrize("distinct", [1, 5, 16, 17, 300])
def test_unique_without_sort_matches_numpy(distinct):
    """vtop._unique finds up to SMALL values by comparison, then falls back to np.unique: both
    give np.unique's values, first positions and inverse."""
    from ptlab.vtop import SMALL, _combo, _unique

    rng = np.random.default_rng(distinct)
    values = rng.choice(rng.integers(0, 1 << 63, distinct, dtype=np.uint64), 5000)
    u, first, inv = _unique(values)
    eu, efirst, einv = np.unique(values, return_index=True, return_inverse=True)
    if len(eu) <= SMALL:  # found in first-seen order: compare as sets with matching positions
        assert sorted(u.tolist()) == eu.tolist()
    else:
        assert u.tolist() == eu.tolist() and first.tolist() == efirst.tolist()
        assert inv.tolist() == einv.reshape(-1).tolist()
    assert (u[inv] == values).all() and (values[first] == u).all()
    assert all((values[first] == u).tolist())
    cols = [values, values % np.uint64(7), rng.integers(0, 3, len(values)).astype(np.uint64)]
    cfirst, cinv = _combo(cols)
    rows = list(zip(*(c.tolist() for c in cols), strict=True))
    for i in range(0, len(rows), 97):  # equal codes <=> equal rows, first is a representative
        assert rows[int(cfirst[cinv[i]])] == rows[i]
    assert len(cfirst) == len(set(rows))


def test_batch_equals_one_by_one_with_many_tables_and_attributes():
    """More distinct tables and attribute combinations than vtop's comparison path takes (SMALL):
    the sorting path answers as the one-VA trace does."""
    rng = random.Random(f"{SEED}:many")
    fmt = by_name("x86_64-4level")
    b = TableBuilder(fmt)
    ops = arch_for(fmt)
    base = ops.linear_map_base(fmt)
    attrs = fmt.normalize(ops.page_kernel)
    near = []
    for i in range(64):  # 4K pages in 64 different pte tables, 8 attribute combinations
        va = base + i * (2 << 20) + rng.randrange(512) * 4096
        a = attrs.with_(writable=bool(i & 1), exec=bool(i & 2), global_=bool(i & 4))
        b.map(va, 0x4000_0000 + i * 4096, 4096, fmt.normalize(a), level=0)
        near.append(va)
    vas = random_vas(fmt, rng, near, 3000) + near
    assert batch_answers(fmt, b.mem, b.root, vas) == scalar_answers(fmt, b.mem, b.root, vas)
    mapped = translate_many(fmt, b.mem, b.root, np.array(near, dtype=np.uint64))
    assert mapped.mapped().all() and len({id(a) for a in mapped.attr_table}) >= 8
