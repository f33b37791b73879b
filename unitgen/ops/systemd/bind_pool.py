"""GPU pools under systemd (:class:`unitgen.features.pool.ops.PoolBinding`):
each member's pool file in the manager's configuration directory
(``%E/unitgen/pool/<name>.json``), its units' states over D-Bus, the pool's
runtime directory (``%t/unitgen-pool``) and the measured needs under ``%S``."""

from __future__ import annotations

import os
from pathlib import Path

from unitgen.features.base import Writes
from unitgen.inunit.cgroupowner import manager_of_scope
from unitgen.inunit.poolread import Units
from unitgen.ops.files import apply_changes
from unitgen.ops.systemd.session import Session
from unitgen.targets.systemd.installed import config_dir

__all__ = ["SystemdPool"]


class SystemdPool:
    """The GPU pool binding of one systemd manager."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.scope = session.scope

    @property
    def manager(self) -> str:
        """``system`` or ``user@UID``."""
        return manager_of_scope(self.scope)

    def pool_file(self, name: str) -> Path:
        """``%E/unitgen/pool/<name>.json``."""
        return config_dir(self.scope) / "unitgen" / "pool" / f"{name}.json"

    def write(self, changes: Writes) -> None:
        """Apply pool file changes all or nothing."""
        apply_changes(changes)

    def units(self, names: list[str]) -> dict[str, Units]:
        """Each member's proxy and server unit, in one D-Bus round trip."""
        infos = self.session.info([u for n in names
                                   for u in (f"{n}.service", f"{n}-backend.service")])
        out = {}
        for n in names:
            proxy, server = infos[f"{n}.service"], infos[f"{n}-backend.service"]
            out[n] = Units(proxy.active_state, server.active_state, server.main_pid,
                           server.active_enter_usec / 1e6 if server.active_enter_usec else 0.0)
        return out

    def runtime_dir(self) -> Path:
        """``%t/unitgen-pool``."""
        runtime = os.environ.get("XDG_RUNTIME_DIR", "/run") if self.scope == "user" else "/run"
        return Path(runtime) / "unitgen-pool"

    def measured_dir(self) -> Path:
        """``%S``: /var/lib, or the user's state directory."""
        if self.scope == "user":
            return Path(os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state"))
        return Path("/var/lib")

    def manager_environment(self) -> dict[str, str]:
        """The manager's environment (``systemctl show-environment``)."""
        return self.session.run(self.session.m.environment())
