"""``--user-root`` (walk, ptdump, translate): the x86 PTI user PGD (kernel PGD + 0x1000) and
the arm64 KPTI tramp_pg_dir (swapper_pg_dir - 0x2000) on built kernel tables (the layouts of
test_cli_check): the same output as ``--root`` at that PA, the user side's own mappings; an
error when there is no user-side table (no PTI)."""

from __future__ import annotations

import io

from ptlab.cli import main
from ptlab.testing import TableBuilder
from test_cli_check import ARM, DATA, RAM, TEXT, X86, arm64_kernel, attrs, x86_kernel


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def x86_args(tmp_path, b: TableBuilder) -> list[str]:
    path = tmp_path / "x86.raw"
    path.write_bytes(b.mem.read(0, RAM))
    return ["--raw", str(path), "--format", X86.name]


def test_x86_pti_user_pgd(tmp_path):
    b, _ = x86_kernel()
    args = x86_args(tmp_path, b)
    for cmd in ("walk", "ptdump"):
        user = run(*args, "--root", hex(b.root), cmd, "--user-root")
        direct = run(*args, "--root", hex(b.root + 0x1000), cmd)
        kernel = run(*args, "--root", hex(b.root), cmd)
        assert user[0] == 0 and user == direct and user != kernel, user
    # kernel data is not in the user PGD, the entry text is
    code, out, _ = run(*args, "--root", hex(b.root), "translate", "--user-root", hex(DATA),
                       hex(TEXT))
    assert code == 1 and len(out.splitlines()) == 2, out
    assert "not mapped" in out.splitlines()[0] or "fault" in out.splitlines()[0], out
    assert run(*args, "--root", hex(b.root), "translate", hex(DATA), hex(TEXT))[0] == 0


def test_x86_no_pti(tmp_path):
    b = TableBuilder(X86, base=0x200_0000)  # one 4 KiB PGD: the next page is no user PGD
    b.map(TEXT, 0x100_0000, 2 << 20, attrs(X86, exec=True, uexec=True), level=1)
    code, out, err = run(*x86_args(tmp_path, b), "--root", hex(b.root), "walk", "--user-root")
    assert code == 2 and not out
    assert err.startswith("ptlab: error: no user-side root") and err.count("\n") == 1, err


def test_arm64_tramp_pg_dir(tmp_path):
    b, _ = arm64_kernel()
    path = tmp_path / "arm.raw"
    path.write_bytes(b.mem.read(0x4000_0000, 32 << 20))
    args = ["--raw", str(path), "--region", f"0x40000000:0:{32 << 20:#x}", "--format", ARM.name,
            "--root", hex(b.root)]
    user = run(*args, "walk", "--user-root")
    direct = run(*args[:-1], hex(b.root - 0x2000), "walk")
    assert user[0] == 0 and user == direct and user != run(*args, "walk"), user
    assert user[1].startswith("0x"), user
