"""Gateways under supervisord (:class:`unitgen.features.gateway.config.GatewayBinding`):
their files below the target's configuration directory
(``CONFIG/unitgen/gateways/<name>``), the runtime API in the gateway's runtime
directory, a reload as SIGUSR2 to HAProxy's master over XML-RPC
(``signalProcess``: the master keeps its pid and the socket, new workers take
over), and members' public programs (``[fcgi-program:NAME]``) holding their
ports."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from unitgen.errors import UnitgenError
from unitgen.features.gateway.discovery import DISCOVERY
from unitgen.features.gateway.doctor import SocketState
from unitgen.features.gateway.files import read_settings
from unitgen.features.gateway.plan import GatewayPlan
from unitgen.features.gateway.render import FILES, MEMBER_KEYS
from unitgen.inunit import hareload
from unitgen.inunit.envfile import read_env_file
from unitgen.inunit.gwkeys import member_key_lines, push, write_maps
from unitgen.inunit.keycopy import copy_for_owner
from unitgen.ops.supervisor.rpc import SupervisorRPC
from unitgen.ops.supervisor.site import Site
from unitgen.targets.base import RenderedFile
from unitgen.targets.supervisor.gateway import (
    gateway_dir,
    member_keys_path,
    render_gateway_files,
    runtime_dir,
)
from unitgen.targets.supervisor.render import secret_name

__all__ = ["SupervisorGateway"]

# supervisord's states in which a program holds its socket (supervisor/states.py)
_HOLDING = ("RUNNING", "STARTING")


class SupervisorGateway:
    """The gateway binding of one supervisord."""

    def __init__(self, site: Site, rpc: SupervisorRPC) -> None:
        self.site = site
        self.rpc = rpc
        self.ctx = site.ctx
        self._workers: dict[str, set[int]] = {}  # gateway -> its workers before a signal

    def directory(self, gateway: str) -> Path:
        """``CONFIG/unitgen/gateways/<gateway>``."""
        return gateway_dir(self.ctx.config_dir, gateway)

    def discovery_file(self) -> Path:
        """``CONFIG/unitgen/prometheus/unitgen.json``."""
        return Path(self.ctx.config_dir) / "unitgen" / "prometheus" / DISCOVERY

    def admin_socket(self, gateway: str) -> Path:
        """``RUN/unitgen-<gateway>/admin.sock``."""
        return Path(runtime_dir(self.ctx.run_dir, gateway)) / "admin.sock"

    def files(self, gateway: str, plan: GatewayPlan,
              where: tuple[str, str]) -> list[RenderedFile]:
        """The gateway's HAProxy files as the supervisor target writes them."""
        return render_gateway_files(gateway, plan, self.ctx.config_dir, self.ctx.run_dir, where)

    @property
    def root_only(self) -> bool:
        """supervisord (root) runs the gateway's wrapper, which reads the keys as root."""
        return os.geteuid() == 0

    def secret(self, instance: str, variable: str) -> str | None:
        """From the instance's env file (root's, 0600)."""
        try:
            return read_env_file(str(self.site.secrets_dir / secret_name(instance))).get(variable)
        except (OSError, ValueError):
            return None

    def path(self, f: RenderedFile) -> Path:
        """Below the target's configuration directory; the member keys with the
        instances' secrets."""
        return (self.site.secrets_dir if f.secret else Path(self.ctx.config_dir)) / f.name

    def reload(self, gateway: str) -> str | None:
        """SIGUSR2 to a running gateway's HAProxy master (its outcome; None when
        it is not running)."""
        program = f"{gateway}-backend"
        try:
            info = self.rpc.call("getProcessInfo", program)
        except UnitgenError:
            return None  # not loaded
        if info.get("statename") != "RUNNING" or not info.get("pid"):
            return None
        self.before_signal(gateway)
        self.rpc.call("signalProcess", program, "USR2")
        self.after_signal(gateway)
        return f"SIGUSR2 to HAProxy's master, pid {info['pid']}; its new worker serves"

    def before_signal(self, gateway: str) -> None:
        """As the systemd unit's ``ExecReload=`` (:mod:`unitgen.inunit.hareload`):
        the master waited for until it takes SIGUSR2 (it drops one that comes
        while it starts) and its workers noted. Then the keys it sends its
        members copied again for HAProxy's user, and its keys files as maps
        again, handed to the running worker (what the wrapper does at start;
        :mod:`unitgen.inunit.keycopy`, :mod:`unitgen.inunit.gwkeys`): a changed
        key holds from this reload on."""
        info = self.rpc.call("getProcessInfo", f"{gateway}-backend")
        try:
            before, why = hareload.before_signal(int(info["pid"]), str(self.admin_socket(gateway)),
                                                 hareload.RELOAD_TIMEOUT)
        except ProcessLookupError:
            why = f"HAProxy's master (pid {info['pid']}) is gone"
        if why is not None:
            raise UnitgenError(f"{gateway}: {why}")
        self._workers[gateway] = before
        self._keys_again(gateway)  # the master takes the signal: no key goes ahead of it

    def after_signal(self, gateway: str) -> None:
        """Until a worker other than the one noted before the signal serves: a
        change the route list does not show (a member's key) holds then."""
        why = hareload.new_worker(str(self.admin_socket(gateway)),
                                  self._workers.pop(gateway, set()), hareload.RELOAD_TIMEOUT)
        if why is not None:
            raise UnitgenError(f"{gateway}: {why}")

    def _keys_again(self, gateway: str) -> None:
        run = runtime_dir(self.ctx.run_dir, gateway)
        secret = member_keys_path(gateway, str(self.site.secrets_dir))
        try:
            if os.path.isdir(run):
                copy_for_owner(secret, os.path.join(run, MEMBER_KEYS))
            found = read_settings(self.directory(gateway))
            if found is None or not (found.settings.api_keys_file
                                     or found.settings.metrics_keys_file):
                return
            files = write_maps(found.settings.api_keys_file,
                               str(self.directory(gateway) / FILES["models"]), run,
                               found.settings.metrics_keys_file)
            files[MEMBER_KEYS] = member_key_lines(secret)
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                push(str(self.admin_socket(gateway)), run, files)
        except (OSError, ValueError) as exc:
            raise UnitgenError(f"{gateway}: its keys were not reloaded ({exc}): it still "
                               "answers by its previous keys and routes") from None

    def socket_states(self, names: list[str]) -> dict[str, SocketState]:
        """Each instance's public program (its fcgi socket) and its state."""
        states = {str(p["name"]): str(p["statename"]) for p in self.rpc.processes()
                  if p["group"] == p["name"]}
        out: dict[str, SocketState] = {}
        for n in names:
            state = states.get(n, "not loaded")
            out[n] = SocketState(f"program {n}", "active" if state in _HOLDING else state.lower(),
                                 f"supervisorctl start {n}")
        return out
