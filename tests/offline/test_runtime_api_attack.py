"""HAProxy's runtime API is a socket in HAProxy's own runtime directory, and
root talks to it: the keys' ``ExecReload=+`` (``unitgen.inunit.gwkeys``, which
sends every key of the file), ``deploy``, ``status`` and the Ansible drain
module. HAProxy's user may change that directory, so a compromised HAProxy can
put a link to a root-only socket where its admin socket was, or leave a socket
another uid created there. Root must send neither anything.

The attacker is a real process of uid 65534 owning the runtime directory, as
HAProxy's dynamic user does; root's listener is 0600 in a 0700 directory.
Before the fix gwkeys sent ``prepare map ...`` to the root-only socket and the
Ansible module sent ``show servers state``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ansible.test_ansible_collection import _module
from tests.helpers import RecordingUnixListener
from unitgen.inunit.hareload import runtime_api

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
# uid 65534 in its own runtime directory: plants a link named admin.sock to argv[2]
PLANT = r"""
import os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.symlink(sys.argv[2], os.path.join(sys.argv[1], "admin.sock"))
print("PLANTED", flush=True)
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to be two uids")


@pytest.fixture
def planted() -> Iterator[tuple[Path, RecordingUnixListener]]:
    """HAProxy's runtime directory (uid 65534's) with its admin.sock a link its
    owner planted to a root-only socket that records what it is sent."""
    base = Path(tempfile.mkdtemp(prefix="unitgen-api-"))  # pytest's tmp is root's 0700
    base.chmod(0o755)
    root_only = RecordingUnixListener.root_only(base / "root")
    try:
        run = base / "unitgen-gw"
        run.mkdir(mode=0o700)
        os.chown(run, NOBODY, NOBODY)
        done = subprocess.run([sys.executable, "-I", "-c", PLANT, str(run), root_only.path],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.stdout.strip() == "PLANTED", done.stderr
        yield run, root_only
    finally:
        root_only.sock.close()
        shutil.rmtree(base)


def test_the_keys_reload_sends_no_key_through_a_link_haproxys_user_planted(planted, tmp_path):
    run, root_only = planted
    keys = tmp_path / "keys"
    keys.write_text("sk-attack-test-1 name=alice models=m rpm=5\n")
    keys.chmod(0o600)
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}))
    done = subprocess.run(
        [sys.executable, "-I", "-m", "unitgen.inunit.gwkeys", "--keys", str(keys),
         "--models", str(models), "--out", str(run), "--admin", str(run / "admin.sock")],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO)
    time.sleep(0.3)  # a connection the listener took would be recorded by now
    assert root_only.received == []
    assert done.returncode == 1 and "admin.sock is a link" in done.stderr, done.stderr
    # the maps were written for HAProxy's user all the same (its next start reads them)
    assert (run / "keys.map").stat().st_uid == NOBODY


@pytest.mark.parametrize("client", ["unitgen", "ansible"])
def test_root_sends_nothing_to_a_socket_another_uid_created_there(client, tmp_path):
    """The directory is uid 65534's; the socket in it was created by root (any
    uid but the directory's owner): nothing is sent, whoever asks."""
    run = tmp_path / "unitgen-gw"
    run.mkdir(mode=0o700)
    foreign = RecordingUnixListener(run / "admin.sock")
    os.chown(run, NOBODY, NOBODY)
    try:
        ask = (lambda: runtime_api(run / "admin.sock", "show info")) if client == "unitgen" \
            else (lambda: _module("unitgen_gateway_server").command(str(run / "admin.sock"), "show stat"))
        with pytest.raises(OSError, match=r"created by uid 0"):
            ask()
        time.sleep(0.3)
        assert [r for r in foreign.received if r] == []  # connected, then nothing sent
    finally:
        foreign.sock.close()


def test_the_drain_module_and_status_send_nothing_through_the_link(planted):
    run, root_only = planted
    with pytest.raises(OSError, match=r"link|Too many levels"):
        runtime_api(run / "admin.sock", "show stat")
    with pytest.raises(OSError):
        _module("unitgen_gateway_server").command(str(run / "admin.sock"), "show servers state")
    time.sleep(0.3)
    assert root_only.received == []


def test_haproxys_own_socket_is_still_answered(tmp_path):
    """The guard lets the directory owner's own listener through (no false refusal)."""
    run = tmp_path / "unitgen-gw"
    run.mkdir(mode=0o700)
    own = RecordingUnixListener(run / "admin.sock", b"")
    try:
        assert "200 OK" in runtime_api(run / "admin.sock", "show info")
        assert "200 OK" in _module("unitgen_gateway_server").command(str(run / "admin.sock"), "show info")
        assert own.received[:2] == [b"show info\n", b"show info\n"]
    finally:
        own.sock.close()
