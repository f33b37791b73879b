"""Where the supervisor target works: supervisord's URL, its include directory,
and the directories for runtime sockets, logs and secrets. Built once from
options and environment variables and passed to every operation."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import UnitgenError
from unitgen.ops.supervisor.rpc import (
    Endpoint,
    SupervisorRPC,
    credentials,
    default_conf_dir,
    default_url,
    find_config,
)
from unitgen.plan.instance import runtime_subdir
from unitgen.targets.base import find_proxyd  # the same binary serves both targets
from unitgen.targets.supervisor.render import SupervisorContext

__all__ = ["ENV_VARS", "Site", "check_run_dir", "clear_run_dir", "context", "log_dir",
           "make_dir"]

# Every setting can come from the environment, so a container image sets them once.
ENV_VARS = {
    "url": "UNITGEN_SUPERVISOR_URL",
    "conf_dir": "UNITGEN_SUPERVISOR_CONF_DIR",
    "config": "UNITGEN_SUPERVISOR_CONFIG",
    "run_dir": "UNITGEN_SUPERVISOR_RUN_DIR",
    "log_dir": "UNITGEN_SUPERVISOR_LOG_DIR",
    "secrets_dir": "UNITGEN_SUPERVISOR_SECRETS_DIR",
    "config_dir": "UNITGEN_SUPERVISOR_CONFIG_DIR",
}


@dataclass(frozen=True)
class Site:
    """One supervisord and the directories unitgen uses with it."""

    endpoint: Endpoint
    conf_dir: Path
    ctx: SupervisorContext

    @property
    def secrets_dir(self) -> Path:
        """Where mode-0600 secret files go."""
        return Path(self.ctx.secrets_dir)

    def rpc(self, timeout: float | None = 30.0) -> SupervisorRPC:
        """An XML-RPC client."""
        return SupervisorRPC(self.endpoint, timeout=timeout)

    @classmethod
    def resolve(cls, url: str | None = None, conf_dir: Path | None = None,
                *, need_proxyd: bool = True) -> Site:
        """Options first, then environment variables, then what supervisorctl would
        read (``[supervisorctl] serverurl``, the ``[include]`` directory)."""
        config = find_config(os.environ.get(ENV_VARS["config"]) or None)
        url = url or os.environ.get(ENV_VARS["url"]) or default_url(config)
        if conf_dir is None:
            env_dir = os.environ.get(ENV_VARS["conf_dir"])
            conf_dir = Path(env_dir) if env_dir else default_conf_dir(config)
        if conf_dir is None:
            where = str(config) if config else "no supervisord.conf found in the usual places"
            raise UnitgenError(f"no directory for conf files ({where} has no [include] files); "
                               "pass --conf-dir or set UNITGEN_SUPERVISOR_CONF_DIR")
        return cls(Endpoint(url, credentials(config)), conf_dir, context(need_proxyd=need_proxyd))


def context(*, need_proxyd: bool = True) -> SupervisorContext:
    """This interpreter, the installed proxyd, and the run/log/secret/config
    directories (environment variables, else /run/unitgen, /var/log/unitgen,
    /etc/unitgen/secrets, /etc: gateways in /etc/unitgen/gateways)."""
    return SupervisorContext(
        python=sys.executable,
        proxyd=find_proxyd() if need_proxyd else "systemd-socket-proxyd",
        run_dir=os.environ.get(ENV_VARS["run_dir"], "/run/unitgen"),
        log_dir=os.environ.get(ENV_VARS["log_dir"], "/var/log/unitgen"),
        secrets_dir=os.environ.get(ENV_VARS["secrets_dir"], "/etc/unitgen/secrets"),
        config_dir=os.environ.get(ENV_VARS["config_dir"], "/etc"),
    )


def check_run_dir(run: Path) -> None:
    """Root makes each instance's runtime directory in ``run`` and hands it to the
    server's user: a ``run`` another user can write would let them plant a link
    there (``unitgen-NAME -> /etc``), so it is refused."""
    try:
        run.mkdir(parents=True, exist_ok=True, mode=0o755)
        st = run.stat()
    except OSError as exc:
        raise UnitgenError(f"cannot create {run}: {exc.strerror}") from None
    if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise UnitgenError(f"the run directory {run} can be written by a user other than root "
                           f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); root "
                           "makes each instance's socket directory there: use a directory only "
                           "root can write (UNITGEN_SUPERVISOR_RUN_DIR; docs/supervisor.md)")

def clear_run_dir(run: str, name: str) -> None:
    """A removed instance's runtime directory goes with it, as systemd's
    ``RuntimeDirectory=`` does (a gateway's copy of its API keys is there). Only
    root writes ``run`` (:func:`check_run_dir`): the entry is no planted link."""
    with contextlib.suppress(OSError):
        shutil.rmtree(Path(run) / runtime_subdir(name))


def log_dir(directory: Path) -> None:
    """supervisord does not create log directories. The servers' logs can hold
    prompts (vLLM's request log): the directory is root's alone (0700)."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = directory.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            directory.chmod(0o700)
    except OSError as exc:
        raise UnitgenError(f"cannot create {directory}: {exc.strerror}") from None

def make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnitgenError(f"cannot create {directory}: {exc.strerror}") from None
