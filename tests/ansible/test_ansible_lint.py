"""ansible-lint (production profile, offline) passes on the role and the example
playbooks, and the same run does catch a broken copy of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ansible.test_ansible_live import collections_path

pytestmark = pytest.mark.ansible

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
LINT = Path(sys.executable).parent / "ansible-lint"


def lint(project: Path, home: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.skip("ansible-lint is not installed (pip install -e '.[dev]')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "PATH": f"{LINT.parent}:{env.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_HOME": str(home / "ansible"),
        # the collection's full names (unitgen.unitgen.*) resolve to this project
        "ANSIBLE_COLLECTIONS_PATH": str(collections_path(home, project)),
        "XDG_CACHE_HOME": str(home / "cache"),
        "NO_COLOR": "1",
    })
    return subprocess.run([str(LINT), "--offline", "--nocolor"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def test_role_and_playbooks_pass_ansible_lint(tmp_path):
    done = lint(ANSIBLE, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr


def test_ansible_lint_catches_a_broken_role(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ANSIBLE, project, ignore=shutil.ignore_patterns(".ruff_cache", "__pycache__"))
    tasks = project / "roles" / "unitgen" / "tasks" / "main.yml"
    tasks.write_text(tasks.read_text() + "\n- shell: echo {{ unitgen_scope }}\n")
    done = lint(project, tmp_path)
    assert done.returncode != 0
    assert "name[missing]" in done.stdout + done.stderr


MODULES = ("unitgen_instance", "unitgen_status", "unitgen_gateway_server")


def test_ansible_doc_reads_every_module_by_its_full_name(tmp_path):
    doc = LINT.parent / "ansible-doc"
    if not doc.exists():
        pytest.skip("ansible-core is not installed")
    done = subprocess.run(
        [str(doc), "--json", *(f"unitgen.unitgen.{m}" for m in MODULES)],
        env={**os.environ, "ANSIBLE_HOME": str(tmp_path),
             "ANSIBLE_COLLECTIONS_PATH": str(collections_path(tmp_path))},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = json.loads(done.stdout)
    assert set(docs) == {f"unitgen.unitgen.{m}" for m in MODULES}
    instance = docs["unitgen.unitgen.unitgen_instance"]["doc"]
    assert instance["options"]["state"]["choices"] == ["present", "absent"]
    assert "instances" in docs["unitgen.unitgen.unitgen_status"]["return"]
