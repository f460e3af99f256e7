"""``--json`` of info, walk, ptdump and wx: one JSON object per line, the same facts as the
text output (same runs, same ptdump lines, same verdict and exit status)."""

from __future__ import annotations

import json

import pytest
from ptlab import dump
from test_cli import DATA_VA, TEXT_VA, WX_VA, make_x86_files, run


@pytest.fixture
def x86(tmp_path):
    return make_x86_files(tmp_path)


def objects(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_info_json(x86):
    code, out, err = run("--elf", x86["core"], "info", "--json")
    (obj,) = objects(out)
    assert (code, err) == (0, "")
    assert obj["kind"] == "elf" and obj["machine"] == "x86_64"
    assert obj["format"] == "x86_64-4level" and obj["root"] == hex(x86["root"])
    assert obj["vmcoreinfo"]["OSRELEASE"] == "6.1.0-test"
    assert obj["cpus"][0]["control"]["cr3"] == hex(x86["root"])
    code, out, _ = run("--raw", x86["raw"], "info", "--json")
    (obj,) = objects(out)
    assert code == 0 and obj["format"] is None and "--format NAME is required" in obj["why"]


def test_walk_json_equals_text(x86):
    code, text, _ = run("--elf", x86["core"], "walk")
    code2, out, err = run("--elf", x86["core"], "walk", "--json")
    objs = objects(out)
    assert code == code2 == 0 and not err
    runs, summary = objs[:-1], objs[-1]
    assert [r["va"] for r in runs] == [hex(TEXT_VA), hex(DATA_VA), hex(WX_VA)]
    assert text.splitlines()[-1] == (f"# 3 runs, {summary['tables']} tables, 0 anomalies")
    assert summary["runs"] == 3 and summary["anomalies"] == 0
    assert runs[0]["page_size"] == 2 << 20 and runs[0]["level_name"] == "pmd"
    assert runs[0]["pa"] == "0x200000" and runs[0]["attrs"].startswith("ro kern x")


def test_ptdump_json_equals_text(x86):
    _, text, _ = run("--elf", x86["core"], "ptdump")
    code, out, err = run("--elf", x86["core"], "ptdump", "--json")
    objs = [o for o in objects(out) if "va" in o]
    parsed = dump.parse(text)
    assert code == 0 and not err
    assert [(int(o["va"], 16), o["size"], o["level"], tuple(o["flags"]), o["section"])
            for o in objs] == [(r.va, r.size, r.level, r.flags, r.section) for r in parsed]
    _, part, _ = run("--elf", x86["core"], "ptdump", "--json", "--start", hex(TEXT_VA),
                     "--end", hex(WX_VA))
    assert [o["va"] for o in objects(part)] == [hex(TEXT_VA), hex(DATA_VA)]


def test_wx_json(x86):
    code, out, _ = run("--elf", x86["core"], "wx", "--json")
    objs = objects(out)
    assert code == 1 and [o["wx"]["va"] for o in objs[:-1]] == [hex(WX_VA)]
    assert objs[-1]["passed"] is False and "1 W+X pages found" in objs[-1]["verdict"]
    code, out, _ = run("--elf", x86["core"], "wx", "--json", "--end", hex(WX_VA))
    assert code == 0 and objects(out) == [
        {"verdict": "x86/mm: Checked W+X mappings: passed, no W+X pages found.",
         "passed": True}]
