"""Rendered units match the golden files byte for byte, and systemd-analyze
verify accepts every one of them with empty output; the same for the
supervisor target, whose conf files supervisor's own parser reads back."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.golden_files import (
    GOLDEN,
    REFUSED,
    SUPERVISOR_GOLDEN,
    example_specs,
    rendered,
    rendered_supervisor,
)
from tests.supervisor_readback import read_back
from unitgen.inunit.envfile import ENV_SECRETS_LINE, env_digest, parse_env_text


@pytest.mark.parametrize("spec", example_specs(), ids=lambda p: p.stem)
def test_golden(spec: Path) -> None:
    expected_dir = GOLDEN / spec.stem
    files = rendered(spec)
    on_disk = (p.relative_to(expected_dir).as_posix() for p in expected_dir.rglob("*")
               if p.is_file())
    assert sorted(files) == sorted(on_disk), (
        "file set changed; run python -m tests.golden_files if intended")
    for name, text in files.items():
        assert text == (expected_dir / name).read_bytes().decode("utf-8"), (
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
            if line.startswith(("ExecStart=", "ExecStartPost=", "ExecStartPre=", "ExecReload=",
                                "ExecStop=", "ExecStopPost=")):
                program = line.split("=", 1)[1].split()[0].lstrip("-@:+!")
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
    # a gateway's HAProxy files are no units (haproxy -c checks them: test_gateway.py)
    units = {n: t for n, t in rendered(spec).items() if not n.endswith(".env") and "/" not in n}
    assert verify_units(units, tmp_path) == "rc=0"


def test_verify_helper_reports_a_bad_key(tmp_path: Path) -> None:
    """The strict check can fail: an unknown key prints a warning even at rc=0."""
    out = verify_units({"bad.service": "[Service]\nExecStart=/bin/true\nBogus=1\n"}, tmp_path)
    assert "Unknown key 'Bogus'" in out


def test_every_example_has_golden_files_and_nothing_else_has():
    stems = {p.stem for p in example_specs()}
    assert {p.name for p in GOLDEN.iterdir()} - {SUPERVISOR_GOLDEN.name} == stems
    assert {p.name for p in SUPERVISOR_GOLDEN.iterdir()} == stems


@pytest.mark.parametrize("spec", example_specs(), ids=lambda p: p.stem)
def test_supervisor_golden(spec: Path) -> None:
    """Refused examples (on-demand, idle_stop, systemd directives, group) have
    their refusals as golden text: a change of what is refused shows too."""
    expected_dir = SUPERVISOR_GOLDEN / spec.stem
    files = rendered_supervisor(spec)
    on_disk = (p.relative_to(expected_dir).as_posix() for p in expected_dir.rglob("*")
               if p.is_file())  # a gateway's HAProxy files are below unitgen/gateways/
    assert sorted(files) == sorted(on_disk), (
        "file set changed; run python -m tests.golden_files if intended")
    for name, text in files.items():
        assert text == (expected_dir / name).read_bytes().decode("utf-8"), (
            f"supervisor/{spec.stem}/{name} differs; run python -m tests.golden_files if intended")


@pytest.mark.parametrize("spec", example_specs(), ids=lambda p: p.stem)
def test_supervisor_golden_files_read_back(spec: Path) -> None:
    """supervisor's own parser takes every golden conf file (two programs, no
    environment=), and the wrapper's reader its env file (the digest matches)."""
    files = rendered_supervisor(spec)
    if REFUSED in files:
        pytest.skip(f"the supervisor target refuses {spec.name}")
    [conf] = [t for n, t in files.items() if n.endswith(".conf")]
    # supervisor checks that log directories exist
    programs = read_back(conf.replace("/var/log/unitgen/", tempfile.gettempdir() + "/"))
    assert len(programs) == 2 and not any(p.environment for p in programs)
    [server] = [p for p in programs if p.group.endswith("-backend")]
    env_files = [n for n in files if n.endswith(".env")]
    if "--env-file" in server.argv:
        env_file = Path(server.argv[server.argv.index("--env-file") + 1]).name
        plain = list(parse_env_text(files[env_file].split(ENV_SECRETS_LINE)[0]).items())
        assert server.argv[server.argv.index("--env-digest") + 1] == env_digest(plain)
    elif "--gw-member-keys" in server.argv:  # a gateway's: the keys it sends its members
        assert env_files == [Path(server.argv[server.argv.index("--gw-member-keys") + 1]).name]
    else:
        assert env_files == []
