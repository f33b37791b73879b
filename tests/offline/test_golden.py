"""Rendered units match the golden files byte for byte, and systemd-analyze
verify accepts every one of them with empty output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.golden_files import GOLDEN, example_specs, rendered


@pytest.mark.parametrize("spec", example_specs(), ids=lambda p: p.stem)
def test_golden(spec: Path) -> None:
    expected_dir = GOLDEN / spec.stem
    files = rendered(spec)
    assert sorted(files) == sorted(p.name for p in expected_dir.iterdir()), (
        "file set changed; run python -m tests.golden_files if intended")
    for name, text in files.items():
        assert text == (expected_dir / name).read_text(encoding="utf-8"), (
            f"{spec.stem}/{name} differs; run python -m tests.golden_files if intended")


def verify_units(units: dict[str, str], tmp_path: Path) -> str:
    """Run systemd-analyze verify over units in a scratch root; return its output.

    The units name programs of the target host (vllm, /opt/...): the scratch
    root gets an empty executable at each of those paths, and the distribution's
    unit files, so verify checks everything but the programs' contents.
    """
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for src in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(src).is_dir():
            shutil.copytree(src, root / "usr/lib/systemd/system", symlinks=True,
                            dirs_exist_ok=True)
            break
    for name, text in units.items():
        (unit_dir / name).write_text(text)
        for line in text.splitlines():
            if line.startswith(("ExecStart=", "ExecStartPost=", "ExecStartPre=")):
                program = line.split("=", 1)[1].split()[0]
                path = Path(program) if program.startswith("/") else Path("/usr/bin") / program
                stub = root / path.relative_to("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
    done = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no",
         *[str(unit_dir / n) for n in units]],
        capture_output=True, text=True,
    )
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}".strip()


@pytest.mark.parametrize("spec", example_specs(), ids=lambda p: p.stem)
def test_systemd_analyze_verify_is_silent(spec: Path, tmp_path: Path) -> None:
    units = {n: t for n, t in rendered(spec).items() if not n.endswith(".env")}
    assert verify_units(units, tmp_path) == "rc=0"


def test_verify_helper_reports_a_bad_key(tmp_path: Path) -> None:
    """The strict check can fail: an unknown key prints a warning even at rc=0."""
    out = verify_units({"bad.service": "[Service]\nExecStart=/bin/true\nBogus=1\n"}, tmp_path)
    assert "Unknown key 'Bogus'" in out
