"""Templates are found from an installed wheel and from the editable install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from unitgen.targets.systemd.render import templates_dir

ROOT = Path(__file__).resolve().parents[2]


def test_editable_install_uses_repo_templates():
    assert templates_dir() == ROOT / "templates"


@pytest.mark.timeout(600)
def test_wheel_carries_templates_and_renders(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", ".hypothesis", ".mypy_cache", ".ruff_cache", "dist", "build",
        ".pytest_cache", "*.egg-info"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(src)], capture_output=True, text=True)
    if built.returncode != 0 and "Could not find a version" in built.stderr:
        pytest.skip("the build backend (hatchling) cannot be fetched here")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("unitgen_units-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = env_dir / "bin" / "python"
    # The parent environment has an editable unitgen; hide it so only the wheel counts.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--target", site, str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "s.toml").write_text('name = "w"\nbackend = "vllm"\nmodel = "m"\nport = 9\n')
    code = ("import unitgen.targets.systemd.render as r, sys; print(r.templates_dir()); "
            "from unitgen.cli import main; main(['render', 's.toml'])")
    run = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, cwd=work)
    assert run.returncode == 0, run.stderr
    first, rest = run.stdout.split("\n", 1)
    assert first.startswith(site) and first.endswith("unitgen/templates")
    assert "----- unitgen: w.socket -----" in rest and "ListenStream=127.0.0.1:9" in rest
