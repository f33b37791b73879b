"""Swap groups under systemd (:class:`unitgen.features.swap.ops.SwapBinding`):
each member's ``<name>-backend.service.d/unitgen-swap.conf`` drop-in, its units'
states over D-Bus, and the group's turn lock in the manager's runtime directory."""

from __future__ import annotations

import os
from pathlib import Path

from unitgen.features.base import Writes
from unitgen.features.swap.ops import MemberUnits
from unitgen.ops.files import apply_changes
from unitgen.ops.systemd.session import Session
from unitgen.targets.systemd.installed import unit_dir
from unitgen.targets.systemd.render import render_swap_dropin

__all__ = ["DROPIN", "SystemdSwap"]

DROPIN = "unitgen-swap.conf"


class SystemdSwap:
    """The swap-group binding of one systemd manager."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.scope = session.scope

    def dropin(self, name: str) -> Path:
        """Where a member's group drop-in lives."""
        return unit_dir(self.scope) / f"{name}-backend.service.d" / DROPIN

    def render_dropin(self, name: str, group: str, mates: list[str]) -> str:
        """The group's ``Conflicts=`` for one member."""
        return render_swap_dropin(name, group, mates).text

    def write(self, changes: Writes) -> None:
        """Apply drop-in changes all or nothing; an emptied drop-in directory goes too."""
        apply_changes(changes)
        for path, text in changes:
            if text is None and path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()

    def member_units(self, members: list[str]) -> dict[str, MemberUnits]:
        """Each member's proxy and server unit, in one D-Bus round trip."""
        infos = self.session.info([u for m in members
                                   for u in (f"{m}.service", f"{m}-backend.service")])
        out: dict[str, MemberUnits] = {}
        for name in members:
            proxy, server = infos[f"{name}.service"], infos[f"{name}-backend.service"]
            since = proxy.exec_main_start_usec  # the proxy started waiting then
            out[name] = MemberUnits(proxy.active_state, server.active_state, proxy.status_text,
                                    since / 1e6 if since else 0.0)
        return out

    def lock(self, group: str) -> Path:
        """``%t/unitgen-swap/<group>.lock``."""
        runtime = os.environ.get("XDG_RUNTIME_DIR", "/run") if self.scope == "user" else "/run"
        return Path(runtime) / "unitgen-swap" / f"{group}.lock"
