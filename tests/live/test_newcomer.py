"""What a new user hit (issue 10): each place they were stuck or misled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.helpers import STANDIN, write_spec
from tests.live.test_operate_live import cli, cli_json
from unitgen.cli import cli as unitgen_cli
from unitgen.ops.systemd.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[2]


def _options(group: click.Group, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += _options(command, f"{prefix}{name} ")
            continue
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    out.append((f"{prefix}{name}", opt))
    return out


def test_every_option_in_help_is_documented():
    docs = (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    missing = [f"{cmd} {opt}" for cmd, opt in _options(unitgen_cli) if opt not in docs]
    assert not missing, f"options missing from README.md and docs/: {missing}"
    for name in unitgen_cli.commands:
        assert f"`{name}" in docs, f"command {name} is not documented"


def test_help_shows_examples_and_the_exit_code_table_and_whole_summaries():
    done = subprocess.run([sys.executable, "-m", "unitgen", "--help"], capture_output=True,
                          text=True)
    assert "Examples:" in done.stdout and "Exit codes" in done.stdout
    for code in ("0 ", "1 ", "2 ", "3 "):
        assert f"  {code} " in done.stdout
    commands = done.stdout.split("Commands:")[1].split("Examples:")[0]
    assert "..." not in commands  # no summary cut mid-sentence
    readme = (ROOT / "README.md").read_text()
    assert "| 3 |" in readme  # the same table in the README


def test_check_of_one_file_twice_says_so(tmp_path):
    spec = write_spec(tmp_path, "demo", 'name = "demo"\nbackend = "vllm"\nmodel = "m"\n')
    done = subprocess.run([sys.executable, "-m", "unitgen", "check", str(spec), str(spec)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "is given twice" in done.stderr and "also the name" not in done.stderr


@pytest.fixture
def box(sandbox: Sandbox):
    yield sandbox
    names = sorted(p.stem for p in sandbox.unit_dir.glob("*.socket")
                   if "unitgen-instance" in p.read_text())
    if names:
        cli(sandbox, "remove", "--user", *names)


def spec(directory: Path, name: str, extra: str = "") -> Path:
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        f'{extra}[health]\ntimeout = "30s"\n'))


@pytest.mark.systemd
def test_a_program_not_on_the_managers_path_is_refused_with_the_fix(box, tmp_path):
    bindir = tmp_path / "venv-bin"
    bindir.mkdir()
    exe = bindir / "vllm"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
    exe.chmod(0o755)
    path = write_spec(tmp_path, "q", 'name = "q"\nbackend = "vllm"\nmodel = "m"\n')
    env = {**os.environ, **box.env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "unitgen", "deploy", "--user", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "vllm is not on the manager's PATH" in done.stderr
    assert f'set executable = "{exe}"' in done.stderr
    assert not (box.unit_dir / "q.socket").exists()
    # check (maybe for another host) only notes it
    done = subprocess.run([sys.executable, "-m", "unitgen", "check", str(path)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0


@pytest.mark.systemd
def test_logs_tell_the_whole_story_in_time_order(box, tmp_path):
    rc, data = cli_json(box, "deploy", "--user", str(spec(tmp_path, "story")))
    assert rc == 0, data
    done = cli(box, "logs", "--user", "story", "-n", "200")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "standin: listening" in out  # the server
    assert "public 127.0.0.1:" in out and "ready after" in out  # the public probe
    assert "Started" in out or "Starting" in out  # systemd's own messages about the units


@pytest.mark.systemd
def test_exit_codes_of_unknown_instances_and_ls_has_a_header(box, tmp_path):
    for verb in ("status", "logs", "doctor"):
        assert cli(box, verb, "--user", "nope").returncode == 2, verb
    assert cli(box, "remove", "--user", "nope").returncode == 0
    assert cli_json(box, "deploy", "--user", str(spec(tmp_path, "lsa")))[0] == 0
    lines = cli(box, "ls", "--user").stdout.splitlines()
    assert lines[0].split() == ["NAME", "BACKEND", "ADDRESS", "ACTIVATION"]
    assert lines[1].split()[0] == "lsa"
    assert lines[0].index("BACKEND") == lines[1].index("custom")  # aligned


@pytest.mark.systemd
def test_deploy_diff_is_shown_before_the_restart(box, tmp_path):
    assert cli_json(box, "deploy", "--user", str(spec(tmp_path, "dif")))[0] == 0
    done = cli(box, "deploy", "--user", "--diff",
               str(spec(tmp_path, "dif", 'env = { X = "1" }\n')))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.index("+Environment=") < out.index("dif: updated")
    data = json.loads(cli(box, "deploy", "--user", "--dry-run", "--diff", "--json",
                          str(spec(tmp_path, "dif", 'env = { X = "2" }\n'))).stdout)
    assert "+Environment=" in data["instances"][0]["diff"]
    assert data["instances"][0]["action"] == "would-update"
