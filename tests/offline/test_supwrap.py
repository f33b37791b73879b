"""The in-program wrappers of the supervisor target, run as real processes:
fd 0 becomes fd 3 with LISTEN_FDS/LISTEN_PID, secrets come from the env file,
``hold`` hands its socket over, ``listener_pid`` finds a server by its socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import STANDIN, get, wait_for
from unitgen.inunit.envfile import (
    StaleEnvFileError,
    UnsafeFileError,
    copy_credential,
    own_directory,
    read_env_file,
)
from unitgen.inunit.supproxy import listener_pid
from unitgen.targets.supervisor import escape

WRAP = [sys.executable, "-m", "unitgen.inunit.supwrap"]


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_exec_fd3_env_file_and_same_pid(tmp_path):
    sock = _listening()
    port = sock.getsockname()[1]
    record = tmp_path / "rec.json"
    secret = tmp_path / "x.env"
    secret.write_text("MY_KEY=k=with=equals and spaces\n")
    secret.chmod(0o600)  # as deploy writes it: the wrapper refuses a file others can read
    env = {**os.environ, "STANDIN_RECORD": str(record)}
    proc = subprocess.Popen([*WRAP, "exec", "--fd3", "--env-file", str(secret),
                             "--mkdir", str(tmp_path / "run" / "d"), "--",
                             sys.executable, str(STANDIN), "--", "-x"],
                            stdin=sock.fileno(), env=env)
    try:
        sock.close()  # only the server holds it now
        assert wait_for(record.exists, 10)
        code, body = get(port)
        rec = json.loads(record.read_text())
        assert code == 200 and body["pid"] == proc.pid == rec["pid"]  # exec kept the pid
        assert rec["env"]["LISTEN_FDS"] == "1" and rec["env"]["LISTEN_PID"] == str(proc.pid)
        assert rec["env"]["MY_KEY"] == "k=with=equals and spaces"
        assert rec["argv"] == ["--", "-x"]
        assert (tmp_path / "run" / "d").stat().st_mode & 0o777 == 0o700
    finally:
        proc.kill()
        proc.wait()


def test_hold_hands_the_socket_and_keeps_it_across_a_crash(tmp_path):
    sock = _listening()
    port = sock.getsockname()[1]
    serve = str(tmp_path / "h" / "listen.sock")
    holder = subprocess.Popen([*WRAP, "hold", "--serve", serve], stdin=sock.fileno())
    sock.close()
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(2):
            server = subprocess.Popen([*WRAP, "exec", "--fd3-from", serve, "--",
                                       sys.executable, str(STANDIN)])
            servers.append(server)
            code, body = get(port, timeout=20)
            assert code == 200 and body["pid"] == server.pid
            server.send_signal(signal.SIGKILL)
            server.wait()
            # the holder keeps the socket: a client now is queued, not refused
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
    finally:
        for p in [*servers, holder]:
            p.kill()
            p.wait()


def test_listener_pid_finds_tcp_and_unix_servers(tmp_path):
    path = str(tmp_path / "s.sock")
    code = ("import socket,sys,time\n"
            "a=socket.socket(); a.bind(('127.0.0.1',0)); a.listen()\n"
            f"u=socket.socket(socket.AF_UNIX); u.bind({path!r}); u.listen()\n"
            "print(a.getsockname()[1], flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert listener_pid(f"127.0.0.1:{port}") == proc.pid
        assert listener_pid(path) == proc.pid
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and listener_pid(path) is not None:
        time.sleep(0.05)
    assert listener_pid(path) is None


def test_env_file_format(tmp_path):
    path = tmp_path / "e.env"
    path.write_text("A=1\n# comment\n\nB==x\n")
    path.chmod(0o600)
    assert read_env_file(str(path)) == {"A": "1", "B": "=x"}


def _env_file(path: Path, plain: list[tuple[str, str]],
              secrets: list[tuple[str, str]] | None = None) -> Path:
    lines = ["# header", escape.ENV_FILE_FORMAT, *(escape.env_file_line(k, v) for k, v in plain)]
    if secrets:
        lines += [escape.ENV_SECRETS_LINE, *(escape.env_file_line(k, v) for k, v in secrets)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def test_exec_passes_every_value_byte_exact_and_checks_the_digest(tmp_path):
    plain = [("A", "#hash"), ("B", "a ;b"), ("C", "%(here)s"), ("D", 'p"q'), ("E", "l1\nl2\r\n"),
             ("F", "back\\n\\"), ("G", " ünï ")]
    secrets = [("KEY", "#sk \\ \n")]
    path = _env_file(tmp_path / "x.env", plain, secrets)
    digest = escape.env_digest(plain)
    assert read_env_file(str(path), digest) == dict(plain + secrets)
    record = tmp_path / "rec.json"
    done = subprocess.run([*WRAP, "exec", "--env-file", str(path), "--env-digest", digest, "--",
                           sys.executable, "-c", "import json, os, sys; json.dump(dict(os.environ), "
                           f"open({str(record)!r}, 'w'))"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    env = json.loads(record.read_text(encoding="utf-8"))
    assert {k: env[k] for k, _ in plain + secrets} == dict(plain + secrets)
    # an env file of another deploy (plain variables changed): refused, server not started
    _env_file(path, [*plain[:-1], ("G", "changed")], secrets)
    with pytest.raises(StaleEnvFileError):
        read_env_file(str(path), digest)
    record.unlink()
    done = subprocess.run([*WRAP, "exec", "--env-file", str(path), "--env-digest", digest, "--",
                           "/bin/touch", str(record)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "deployed with" in done.stderr and not record.exists()
    # secrets are not covered (the digest is in a readable file): a new key is read
    _env_file(path, plain, [("KEY", "rotated")])
    assert read_env_file(str(path), digest)["KEY"] == "rotated"


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks are root's: as another user it reads as itself")
def test_root_reads_only_a_secret_file_of_its_own(tmp_path):
    # issue 17, item 5: a secret file the server's user owned (0.x handed it over)
    # let that user append PYTHONPATH=... and run code as root on the next start
    path = tmp_path / "e.env"
    path.write_text("A=1\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeFileError, match="not root's alone"):
        read_env_file(str(path))
    os.chown(path, 0, 0)
    path.chmod(0o640)
    with pytest.raises(UnsafeFileError, match="readable by others"):
        read_env_file(str(path))
    link = tmp_path / "l.env"
    link.symlink_to(path)
    with pytest.raises(OSError):
        read_env_file(str(link))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_never_hands_a_linked_run_directory_to_a_user(tmp_path):
    # issue 17, item 3: unitgen-NAME -> /etc planted by the user made /etc theirs
    victim = tmp_path / "etc-stand-in"
    victim.mkdir()
    (victim / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    (run / "unitgen-x").symlink_to(victim)
    with pytest.raises(OSError):
        own_directory(str(run / "unitgen-x"), 65534, 65534)
    assert victim.stat().st_uid == 0 and victim.lstat().st_uid == 0
    # and a run directory another user can write is refused before anything is made
    os.chmod(run, 0o777)
    with pytest.raises(UnsafeFileError, match="not root's alone"):
        own_directory(str(run / "unitgen-y"), 65534, 65534)
    assert not (run / "unitgen-y").exists()
    os.chmod(run, 0o755)
    own_directory(str(run / "unitgen-z"), 65534, 65534)
    st = (run / "unitgen-z").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o700)


def test_exec_hands_a_gateway_its_keys_copy_and_the_exporter_as_fd4(tmp_path):
    # the supervisor target's gateway: root copies the 0600 keys file into the
    # runtime directory and binds the exporter before HAProxy (here the
    # stand-in's recorder) starts; both reach it after the exec
    sock = _listening()
    keys = tmp_path / "keys"
    keys.write_text("sk-1\n")
    keys.chmod(0o600)
    metrics = _listening()
    port = metrics.getsockname()[1]
    metrics.close()  # a free port for the wrapper to bind
    run = tmp_path / "run" / "unitgen-gw"
    check = ("import os, socket; s = socket.socket(fileno=4); "
             "print(s.getsockname()[1], open(os.environ['KEYS']).read().strip(), flush=True)")
    done = subprocess.run([*WRAP, "exec", "--fd3", "--mkdir", str(run), "--credential",
                           f"api-keys:{keys}", "--listen-fd4", f"127.0.0.1:{port}", "--",
                           sys.executable, "-c", check], stdin=sock.fileno(),
                          env={**os.environ, "KEYS": str(run / "api-keys")},
                          capture_output=True, text=True, timeout=30)
    sock.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(port), "sk-1"]
    copy = (run / "api-keys").stat()
    assert copy.st_mode & 0o777 == 0o400 and copy.st_uid == os.geteuid()


def test_exec_hands_a_gateway_the_keys_it_sends_its_members(tmp_path):
    # the keys a gateway sends members with keys of their own: root's 0600 secret
    # file, copied for HAProxy's user (0400) before it starts; none yet: empty
    secret = tmp_path / "gw.env"
    secret.write_text("r1 Bearer sk-member-1\n")
    secret.chmod(0o600)
    run = tmp_path / "run" / "unitgen-gw"
    read = "import sys; print(open(sys.argv[1]).read().strip(), flush=True)"
    for source, said in ((secret, "r1 Bearer sk-member-1"), (tmp_path / "none.env", "")):
        done = subprocess.run([*WRAP, "exec", "--mkdir", str(run), "--gw-member-keys",
                               str(source), "--", sys.executable, "-c", read,
                               str(run / "member-keys.map")],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == said
        copy = (run / "member-keys.map").stat()
        assert copy.st_mode & 0o777 == 0o400 and copy.st_uid == os.geteuid()
    if os.geteuid() == 0:  # a secret file someone else may change hands on nothing
        secret.chmod(0o644)
        done = subprocess.run([*WRAP, "exec", "--mkdir", str(run), "--gw-member-keys",
                               str(secret), "--", "/bin/true"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "not root's alone" in done.stderr, done.stderr


def test_exec_refuses_a_bad_credential_and_starts_nothing(tmp_path):
    done = subprocess.run([*WRAP, "exec", "--mkdir", str(tmp_path / "r"), "--credential",
                           f"k:{tmp_path / 'missing'}", "--", "/bin/true"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "No such file or directory: " in done.stderr, done.stderr
    assert "not starting the server" in done.stderr
    done = subprocess.run([*WRAP, "exec", "--credential", f"k:{tmp_path}", "--", "/bin/true"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "give both" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_copies_a_credential_only_from_a_file_of_its_own_and_never_through_a_link(
        tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-1\n")
    keys.chmod(0o600)
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    own_directory(str(run / "unitgen-gw"), 65534, 65534)
    # the user owns its directory: a link it planted where the copy goes is replaced,
    # never followed (root would write the keys into /etc/... otherwise)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (run / "unitgen-gw" / "api-keys").symlink_to(victim)
    copy = copy_credential(f"api-keys:{keys}", str(run / "unitgen-gw"), 65534, 65534)
    assert victim.read_text() == "untouched\n"
    st = os.lstat(copy)
    assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o400) and Path(copy).read_text() == "sk-1\n"
    # a keys file another user could change is not handed on
    os.chown(keys, 65534, 65534)
    with pytest.raises(UnsafeFileError, match="not root's alone"):
        copy_credential(f"api-keys:{keys}", str(run / "unitgen-gw"), 65534, 65534)
    with pytest.raises(ValueError, match="NAME:PATH"):
        copy_credential(f"../x:{keys}", str(run / "unitgen-gw"), 65534, 65534)


def test_usage_errors():
    done = subprocess.run([*WRAP, "exec", "/bin/true"], capture_output=True, text=True)
    assert done.returncode == 2 and "after --" in done.stderr
    done = subprocess.run([*WRAP, "exec", "--"], capture_output=True, text=True)
    assert done.returncode == 2
