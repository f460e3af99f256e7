"""The CI definitions (.github/workflows/ci.yml, .gitlab-ci.yml) against the harness: their job
matrices list exactly the guest profiles and kernels ptharness knows, and each job runs the
Makefile's selection, caches images under the harness's image key and keeps the artifacts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ptharness.profiles import KERNELS, PROFILES

REPO = Path(__file__).resolve().parents[2]
GITHUB = REPO / ".github" / "workflows" / "ci.yml"
GITLAB = REPO / ".gitlab-ci.yml"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def run_lines(steps: list[dict[str, Any]]) -> str:
    return "\n".join(str(s.get("run", "")) for s in steps)


def test_github_matrix_is_profiles_times_kernels():
    job = load(GITHUB)["jobs"]["qemu"]
    matrix = job["strategy"]["matrix"]
    assert set(matrix) == {"profile", "kernel"}, "one job per (profile, kernel), nothing else"
    assert matrix["profile"] == list(PROFILES)
    assert matrix["kernel"] == list(KERNELS)  # strings: YAML would read 6.10 as 6.1
    assert job["strategy"]["fail-fast"] is False  # one profile's failure hides no other's
    runs = run_lines(job["steps"])
    assert re.search(r"make test-qemu ARCH=all PROFILE='\$\{\{ matrix.profile \}\}' "
                     r"KERNEL='\$\{\{ matrix.kernel \}\}'", runs)


def test_github_jobs_cache_images_by_key_and_upload_on_failure():
    jobs = load(GITHUB)["jobs"]
    assert jobs["qemu"]["needs"] == "lint-unit"
    assert "make lint" in run_lines(jobs["lint-unit"]["steps"])
    assert "make test-unit" in run_lines(jobs["lint-unit"]["steps"])
    for name, job in jobs.items():
        assert job["container"]["image"] == "debian:12", name
        assert "--shm-size" in job["container"]["options"], name  # guest RAM lives in /dev/shm
        steps = job["steps"]
        key = next(s for s in steps if s.get("id") == "image")
        assert "python -m ptharness.image --key" in key["run"], name
        cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache@"))
        assert cache["with"]["key"].endswith("${{ steps.image.outputs.key }}"), name
        assert steps.index(key) < steps.index(cache), name
        upload = next(s for s in steps
                      if str(s.get("uses", "")).startswith("actions/upload-artifact@"))
        assert upload["if"] == "failure()" and upload["with"]["path"] == "artifacts/", name


def test_gitlab_matrix_is_profiles_times_kernels():
    ci = load(GITLAB)
    job = ci["qemu"]
    (cell,) = job["parallel"]["matrix"]
    assert set(cell) == {"PROFILE", "KERNEL"}
    assert cell["PROFILE"] == list(PROFILES)
    assert cell["KERNEL"] == list(KERNELS)
    assert 'make test-qemu ARCH=all PROFILE="$PROFILE" KERNEL="$KERNEL"' in job["script"]
    assert "$PROFILE" in job["cache"]["key"] and "$KERNEL" in job["cache"]["key"]
    assert ci["default"]["image"] == "debian:12"
    assert any("ptharness.image --key" in line for line in ci["default"]["before_script"])
    for name in ("lint-unit", "qemu"):
        assert ci[name]["artifacts"]["paths"] == ["artifacts/"], name
        assert ci[name]["artifacts"]["reports"]["junit"].startswith("artifacts/"), name
    assert {"make lint", "make test-unit"} <= set(ci["lint-unit"]["script"])


def test_every_profile_has_an_image_arch_and_every_kernel_a_package():
    """A profile or kernel added to the harness must be buildable, or CI would fail late."""
    from ptharness.image import KERNEL_META, RECIPES

    assert {p.arch for p in PROFILES.values()} <= set(RECIPES)
    assert set(KERNELS) <= set(KERNEL_META)


@pytest.mark.parametrize("argv, message", [
    (["--kernel", "5.10", "x86_64"], "error: unknown kernel '5.10'; known: "),
    (["--profile", "x86_64,risc", "all"], "error: unknown guest profile 'risc'; known: "),
    (["--profile", "arm64", "x86_64"], "error: profiles 'arm64' include none of arch x86_64"),
    (["--kernel"], "usage: python -m ptharness.image"),
])
def test_image_command_bad_selection_is_one_clear_error(argv: list[str], message: str):
    proc = subprocess.run([sys.executable, "-m", "ptharness.image", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
