"""``unitgen ... --target supervisor`` end to end as a user runs it: a real
supervisord, the command in a subprocess, settings from options, environment
variables, and the supervisord.conf that supervisorctl would read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import custom_spec, free_port, get, write_spec
from tests.supervisord import Supervisord, supervisord_unavailable_reason


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisord]:
    reason = supervisord_unavailable_reason()
    if reason:
        pytest.skip(f"no supervisord: {reason}")
    box = Supervisord.start(tmp_path_factory.mktemp("supervisord-cli"))
    try:
        yield box
    finally:
        box.stop()


def unitgen(*args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("UNITGEN_")}
    return subprocess.run([sys.executable, "-m", "unitgen", *args], capture_output=True,
                          text=True, env={**base, **(env or {})}, cwd=cwd, timeout=120)


def _dirs(sd: Supervisord) -> dict[str, str]:
    return {"UNITGEN_SUPERVISOR_RUN_DIR": str(sd.root / "run"),
            "UNITGEN_SUPERVISOR_LOG_DIR": str(sd.root / "log"),
            "UNITGEN_SUPERVISOR_SECRETS_DIR": str(sd.root / "secrets")}


def test_render_prints_the_conf_file(tmp_path):
    spec = write_spec(tmp_path, "r", custom_spec("r", port=8123))
    done = unitgen("render", str(spec), "--target", "supervisor")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("----- unitgen: unitgen-r.conf -----\n")
    assert "[fcgi-program:r]\nsocket=tcp://127.0.0.1:8123\n" in done.stdout
    assert "[program:r-backend]" in done.stdout


def test_render_refusal_is_a_spec_error(tmp_path):
    spec = write_spec(tmp_path, "r", custom_spec("r", port=8123, extra='activation = "on-demand"\n'))
    done = unitgen("render", str(spec), "--target", "supervisor")
    assert done.returncode == 2
    assert f"error: {spec}: activation: \"on-demand\" is not available" in done.stderr


def test_deploy_status_logs_doctor_remove_from_options(sd, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "cli", custom_spec("cli", port=port))
    where = ("--target", "supervisor", "--supervisor-url", sd.url, "--conf-dir", str(sd.conf_dir))
    done = unitgen("deploy", str(spec), *where, "--json", env=_dirs(sd))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["instances"][0]["ready"] is True and data["target"] == "supervisor"
    assert get(port)[0] == 200
    done = unitgen("status", *where, "--json")
    assert json.loads(done.stdout)["instances"][0]["state"] == "ready"
    done = unitgen("logs", "cli", *where, "-n", "50")
    assert "standin: listening" in done.stdout
    done = unitgen("doctor", "cli", *where)
    assert done.returncode == 0, done.stdout + done.stderr
    done = unitgen("remove", "cli", *where)
    assert done.returncode == 0, done.stderr
    assert not (sd.conf_dir / "unitgen-cli.conf").exists()


def test_settings_from_environment_and_supervisord_conf(sd, tmp_path):
    """UNITGEN_TARGET picks the target; the URL and the include directory come
    from supervisord.conf in the working directory, as supervisorctl finds it."""
    (tmp_path / "supervisord.conf").write_text(sd.config.read_text())
    port = free_port()
    spec = write_spec(tmp_path, "envd", custom_spec("envd", port=port))
    env = {"UNITGEN_TARGET": "supervisor", **_dirs(sd)}
    done = unitgen("deploy", str(spec), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (sd.conf_dir / "unitgen-envd.conf").exists()
    done = unitgen("status", "envd", env=env, cwd=tmp_path)
    assert "ready" in done.stdout, done.stdout + done.stderr
    done = unitgen("remove", "envd", env={**env, "UNITGEN_SUPERVISOR_URL": sd.url,
                                          "UNITGEN_SUPERVISOR_CONF_DIR": str(sd.conf_dir)})
    assert done.returncode == 0, done.stderr


def test_unreachable_supervisord_is_a_clear_error(tmp_path):
    spec = write_spec(tmp_path, "x", custom_spec("x", port=free_port()))
    done = unitgen("deploy", str(spec), "--target", "supervisor", "--supervisor-url",
                   f"unix://{tmp_path}/nothing.sock", "--conf-dir", str(tmp_path / "conf.d"),
                   env=_dirs_for(tmp_path))
    assert done.returncode == 1
    assert "cannot reach supervisord" in done.stderr and "Traceback" not in done.stderr


def _dirs_for(root: Path) -> dict[str, str]:
    return {"UNITGEN_SUPERVISOR_RUN_DIR": str(root / "run"),
            "UNITGEN_SUPERVISOR_LOG_DIR": str(root / "log"),
            "UNITGEN_SUPERVISOR_SECRETS_DIR": str(root / "secrets")}


def test_remove_and_status_exit_as_the_readme_says_on_both_targets(sd):
    # issue 18: these had drifted under --target supervisor (both exited 1)
    where = ["--target", "supervisor", "--supervisor-url", sd.url, "--conf-dir", str(sd.conf_dir)]
    done = unitgen("remove", "never-was", *where, "--json", env=_dirs(sd))
    assert done.returncode == 0, done.stderr  # nothing to do
    data = json.loads(done.stdout)
    assert data["changed"] is False and data["absent"] == ["never-was"]
    done = unitgen("status", "never-was", *where, env=_dirs(sd))
    assert done.returncode == 2, done.stderr  # bad input: an unknown name
    assert "no unitgen instance never-was" in done.stderr
    done = unitgen("ls", *where, "--json", env=_dirs(sd))
    assert done.returncode == 0 and json.loads(done.stdout)["target"] == "supervisor"
    # and the systemd target's --user is refused here, with the reason
    done = unitgen("status", "--user", *where, env=_dirs(sd))
    assert done.returncode != 0 and "--user is for the systemd target" in done.stderr


def test_env_values_with_hash_and_semicolons_deploy(sd, tmp_path):
    # issue 18: env = { A = "#hash" } was refused by the supervisor target
    port = free_port()
    spec = write_spec(tmp_path, "hashy", custom_spec(
        "hashy", port=port, env={"A": "#hash", "B": "a ;b", "C": "%(here)s"}))
    where = ["--target", "supervisor", "--supervisor-url", sd.url, "--conf-dir", str(sd.conf_dir)]
    done = unitgen("deploy", str(spec), *where, env=_dirs(sd))
    try:
        assert done.returncode == 0, done.stderr
        assert get(port)[0] == 200
    finally:
        unitgen("remove", "hashy", *where, env=_dirs(sd))
