"""Gateways under systemd (:class:`unitgen.features.gateway.config.GatewayBinding`):
their files below ``%E/unitgen/gateways/<name>``, the runtime API in
``%t/unitgen-<name>/admin.sock``, ``ReloadUnit`` of ``<name>.service``, and
members' ``.socket`` units holding their public ports."""

from __future__ import annotations

from pathlib import Path

from unitgen.errors import UnitgenError
from unitgen.features.gateway.discovery import DISCOVERY
from unitgen.features.gateway.doctor import SocketState
from unitgen.features.gateway.files import gateway_files
from unitgen.features.gateway.plan import GatewayPlan
from unitgen.ops.systemd.session import Session
from unitgen.targets.base import RenderedFile
from unitgen.targets.systemd.gateway import gateway_dir, gateway_paths, runtime_root
from unitgen.targets.systemd.installed import config_dir, installed_secret, secrets_dir

__all__ = ["SystemdGateway"]


class SystemdGateway:
    """The gateway binding of one systemd manager."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.scope = session.scope

    def directory(self, gateway: str) -> Path:
        """``%E/unitgen/gateways/<gateway>``."""
        return gateway_dir(self.scope, gateway)

    def discovery_file(self) -> Path:
        """``%E/unitgen/prometheus/unitgen.json``."""
        return config_dir(self.scope) / "unitgen" / "prometheus" / DISCOVERY

    def admin_socket(self, gateway: str) -> Path:
        """``%t/unitgen-<gateway>/admin.sock``."""
        return runtime_root(self.scope) / f"unitgen-{gateway}" / "admin.sock"

    def files(self, gateway: str, plan: GatewayPlan,
              where: tuple[str, str]) -> list[RenderedFile]:
        """The gateway's HAProxy files as the systemd target writes them."""
        return gateway_files(gateway, plan, gateway_paths(gateway, self.scope),
                             f"unitgen/gateways/{gateway}", where)

    def path(self, f: RenderedFile) -> Path:
        """Below the manager's configuration directory; the member keys with
        the instances' secrets."""
        return (secrets_dir(self.scope) if f.secret else config_dir(self.scope)) / f.name

    @property
    def root_only(self) -> bool:
        """The system manager runs the gateway's set-up as root."""
        return self.scope == "system"

    def secret(self, instance: str, variable: str) -> str | None:
        """From the instance's secret file (``%E/unitgen/secrets``)."""
        return installed_secret(self.scope, instance, variable)

    def reload(self, gateway: str) -> str | None:
        """``ReloadUnit`` of a running ``<gateway>.service``: its job ends once the
        new routes serve (``ExecReload=`` is :mod:`unitgen.inunit.hareload`); an
        error when they do not, HAProxy still routing by the previous ones."""
        unit = f"{gateway}.service"
        if not self.session.active(unit):
            return None
        done = self.session.run(self.session.m.job("ReloadUnit", unit, timeout=120))
        if not done.ok:
            raise UnitgenError(f"{gateway}: the gateway's reload failed ({done.result}): it "
                               "still routes by its previous configuration; journalctl -u "
                               f"{unit} says why")
        return done.result

    def before_signal(self, gateway: str) -> None:
        """Nothing: the unit's ``ExecReload=+`` makes the keys maps."""

    def after_signal(self, gateway: str) -> None:
        """Nothing: the unit's ``ExecReload=`` waits for the new worker."""

    def socket_states(self, names: list[str]) -> dict[str, SocketState]:
        """Each instance's ``.socket`` unit and its state."""
        infos = self.session.info([f"{n}.socket" for n in names])
        return {n: SocketState(f"{n}.socket", infos[f"{n}.socket"].active_state,
                               f"systemctl start {n}.socket") for n in names}
