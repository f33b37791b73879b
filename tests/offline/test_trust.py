"""The trusted-install check (issue 17, item 6): what root will run must be
root's alone, the interpreter as the units name it, everything its prefix
loads (``*.pth`` files run even under ``-I``), the standard library, unitgen's
package and templates, for every target. Both tests failed on the old check,
which looked at realpath(python) and unitgen's own ``.py`` files only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import unitgen

ROOT = Path(unitgen.__file__).resolve().parent.parent
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to uid 65534")


def _venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    os.chmod(where.parent, 0o755)
    return where / "bin" / "python"


def _untrusted(python: Path, package_parent: Path) -> list[str]:
    code = ("import sys, json; from unitgen.ops.trust import untrusted_paths; "
            "print(json.dumps(untrusted_paths(sys.argv[1])))")
    done = subprocess.run([str(python), "-c", code, str(python)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(package_parent), "PATH": os.environ["PATH"]},
                          check=True, timeout=120, cwd=package_parent)
    import json  # noqa: PLC0415

    found: list[str] = json.loads(done.stdout)
    return found


def _copy_of_unitgen(where: Path) -> Path:
    """unitgen's package and templates, as root's files in a directory of their own."""
    where.mkdir()
    shutil.copytree(ROOT / "unitgen", where / "unitgen",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "templates", where / "templates")
    os.chmod(where, 0o755)
    return where


def test_a_pth_file_another_user_owns_in_the_venv_is_refused(tmp_path):
    python = _venv(tmp_path / "venv")
    code = _copy_of_unitgen(tmp_path / "code")
    assert _untrusted(python, code) == []
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    pth = site / "_editable_evil.pth"
    pth.write_text("import os; os.system('id > /tmp/pwned-by-pth')\n")
    os.chown(pth, NOBODY, NOBODY)
    found = _untrusted(python, code)
    assert any(str(pth) in why and "uid 65534" in why for why in found), found


def test_a_venv_directory_another_user_can_write_is_refused(tmp_path):
    # the units run bin/python as written: its directory decides what that is
    python = _venv(tmp_path / "venv")
    code = _copy_of_unitgen(tmp_path / "code")
    os.chmod(python.parent, 0o777)
    found = _untrusted(python, code)
    assert any(why.startswith(f"{python.parent} is writable") for why in found), found


def test_templates_another_user_can_write_are_refused(tmp_path):
    python = _venv(tmp_path / "venv")
    code = _copy_of_unitgen(tmp_path / "code")
    os.chmod(code / "templates" / "systemd" / "server.j2", 0o666)
    found = _untrusted(python, code)
    assert any("server.j2 is writable" in why for why in found), found


def test_a_supervisor_deploy_as_root_runs_the_check(tmp_path):
    # before: a world-writable supwrap.py, which supervisord runs as root, was accepted
    code = _copy_of_unitgen(tmp_path / "code")
    os.chmod(code / "unitgen" / "inunit" / "supwrap.py", 0o666)
    spec = tmp_path / "x.toml"
    spec.write_text('name = "x"\nbackend = "vllm"\nmodel = "m"\n')
    conf = tmp_path / "conf.d"
    conf.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "unitgen", "deploy", "--target", "supervisor", "--conf-dir",
         str(conf), "--supervisor-url", f"unix://{tmp_path}/none.sock", str(spec)],
        capture_output=True, text=True, timeout=120, cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)})
    assert done.returncode != 0
    assert "supwrap.py is writable" in done.stderr, done.stderr
    assert list(conf.iterdir()) == [] or all(p.name.startswith(".") for p in conf.iterdir())
