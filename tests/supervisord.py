"""A real supervisord (from PyPI) for tests and benches: its own config in a
temp dir, a Unix socket there, an include directory there; stopped by its pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from unitgen.ops.supervisor.rpc import Endpoint, SupervisorRPC
from unitgen.ops.supervisor.site import Site
from unitgen.targets.base import find_proxyd
from unitgen.targets.supervisor.render import SupervisorContext

MAIN_CONF = """\
[supervisord]
nodaemon=true
logfile={root}/supervisord.log
pidfile={root}/supervisord.pid
childlogdir={root}/childlogs
loglevel=info

[unix_http_server]
file={root}/supervisor.sock
chmod=0700

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root}/supervisor.sock

[include]
files={root}/conf.d/*.conf
"""


def supervisord_unavailable_reason() -> str:
    """Why a supervisord cannot run here ('' when it can)."""
    try:
        import supervisor  # noqa: F401, PLC0415
    except ImportError:
        return "supervisor is not installed (pip install '.[supervisor]')"
    try:
        find_proxyd()
    except Exception as exc:
        return str(exc)
    return ""


class Supervisord:
    """One supervisord process in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf_dir = root / "conf.d"
        self.config = root / "supervisord.conf"
        self.socket = root / "supervisor.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, root: Path) -> Supervisord:
        """Write the config, start supervisord and wait until it answers."""
        self = cls(root)
        (root / "childlogs").mkdir(parents=True, exist_ok=True)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(MAIN_CONF.format(root=root), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=(root / "supervisord.stderr").open("wb"),
            env=env, start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("supervisord exited: "
                                   + (root / "supervisord.stderr").read_text(errors="replace"))
            if self.socket.exists():
                try:
                    state = self.rpc().call("getState")
                except Exception:
                    state = {}
                if state.get("statename") == "RUNNING":
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("supervisord did not answer within 20 s")

    @property
    def url(self) -> str:
        """Its XML-RPC URL."""
        return f"unix://{self.socket}"

    def rpc(self) -> SupervisorRPC:
        """An XML-RPC client."""
        return SupervisorRPC(Endpoint(self.url), timeout=60)

    def raw(self) -> xmlrpc.client.ServerProxy:
        """The plain proxy, for calls tests make directly."""
        return self.rpc()._proxy

    def target(self, root: Path | None = None) -> Site:
        """A unitgen target for this supervisord; run, log and secret dirs under ``root``."""
        base = root or self.root
        ctx = SupervisorContext(python=sys.executable, proxyd=find_proxyd(),
                                run_dir=str(base / "run"), log_dir=str(base / "log"),
                                secrets_dir=str(base / "secrets"), config_dir=str(base / "etc"))
        return Site(Endpoint(self.url), self.conf_dir, ctx)

    def stop(self) -> None:
        """SIGTERM by pid (supervisord stops its programs), SIGKILL after 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        """Stop and delete the directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
