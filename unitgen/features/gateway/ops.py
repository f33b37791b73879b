"""The gateway as a feature: what a deploy, a remove, ``status`` and ``doctor``
do for gateways and their members, on every target that binds it
(:class:`~unitgen.features.gateway.config.GatewayBinding`).

- deploy: gateways whose members change are rendered again (checked by
  ``haproxy -c``), written with the run's files, and reloaded once the members
  answer; a gateway whose routes alone changed is reloaded, not restarted;
  either way the deploy returns once the new routes answer on the gateway's
  port (:mod:`unitgen.features.gateway.live`);
- remove: gateways stop routing to the removed instances before they stop,
  and a removed gateway's HAProxy files go with it;
- both rewrite the host's Prometheus discovery file (the engines of eager
  instances, the gateways' exporters: :mod:`unitgen.features.gateway.discovery`);
- status: each gateway's routes and the state of what they lead to;
- doctor: where each route leads, or the gateway an instance joins.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

from unitgen.errors import Problem, SpecError
from unitgen.features.base import Feature, InstalledLike, Writes
from unitgen.features.gateway.config import (
    GatewayBinding,
    affected,
    key_file_problems,
    remote_members,
    remove_gateway_files,
    rerender,
    validate,
)
from unitgen.features.gateway.discovery import discovery_json, targets
from unitgen.features.gateway.doctor import gateway_findings, member_findings, members_of
from unitgen.features.gateway.files import read_settings
from unitgen.features.gateway.live import wait_served
from unitgen.features.gateway.plan import Member
from unitgen.features.gateway.usage import key_usage, usage_lines
from unitgen.ops.files import apply_changes, read_exact
from unitgen.ops.findings import Finding
from unitgen.ops.interface import Say
from unitgen.ops.pipeline import Planned
from unitgen.plan.record import Record, record_of
from unitgen.targets.capabilities import Capability

__all__ = ["GatewayFeature", "gateway_section"]


class GatewayFeature(Feature):
    """Gateways bound to a target."""

    name = "gateway"
    capabilities = frozenset({Capability.GATEWAY, Capability.GATEWAY_MEMBER})
    binding: GatewayBinding

    def __init__(self, binding: GatewayBinding) -> None:
        super().__init__(binding)
        self._files: list[tuple[str, Path, str]] = []  # (gateway, where, text)
        self._reload: list[str] = []
        self._where: dict[str, str] = {}  # gateway -> host:port its clients use
        self._reloaded: set[str] = set()  # by the target (reload_only): to be waited for
        self._discovery = ""  # the discovery file as the run leaves the host

    def plan(self, installed: Mapping[str, InstalledLike], planned: Sequence[Planned]) -> list[str]:
        """Gateways routing to the run's instances are rendered again; every
        gateway configuration of the run is checked by HAProxy."""
        if found := self.problems(planned):
            raise SpecError(problems=found)
        gateways = sorted(affected(installed, planned))
        self._files = [(g, self.binding.path(f), f.text) for g in gateways
                       for f in rerender(self.binding, g, installed, planned)]
        self._discovery = self._targets(installed, planned)
        self._where = {g: installed[g].rec.probe for g in gateways}
        self._where.update({p.instance.name: p.instance.public.probe_target() for p in planned
                            if p.instance.gateway is not None})
        notices: list[str] = []
        for p in planned:
            spec = p.instance.spec
            if p.instance.gateway is not None:
                validate(str(p.path), p.instance.gateway)
            elif spec.gateway and not (spec.gateway in installed or any(
                    q.instance.name == spec.gateway for q in planned)):
                notices.append(f"{spec.name}: gateway {spec.gateway!r} is not deployed here "
                               "yet: its routes come with it")
        return notices

    def problems(self, planned: Sequence[Planned]) -> list[Problem]:
        """Keys files that are not root's alone where root runs the gateway."""
        return key_file_problems(planned, self.binding.root_only)

    def files(self) -> Writes:
        """The re-rendered files that differ from what is installed; their
        gateways are reloaded after the run."""
        changed = [(g, p, t) for g, p, t in self._files if not p.exists() or read_exact(p) != t]
        self._reload = sorted({g for g, _, _ in changed})
        found = self.binding.discovery_file()
        if self._discovery and (not found.exists() or read_exact(found) != self._discovery):
            changed.append(("", found, self._discovery))
        return [(p, t) for _, p, t in changed]

    def _targets(self, installed: Mapping[str, InstalledLike], planned: Sequence[Planned],
                 removed: Sequence[str] = ()) -> str:
        """The discovery file once the run is done (:func:`targets`)."""
        records: dict[str, Record] = {n: i.rec for n, i in installed.items() if n not in removed}
        exporters: dict[str, tuple[str, int]] = {}
        keyed: set[str] = set()
        counted: set[str] = set()  # with api_keys_file: /metrics/keys
        for name, rec in records.items():
            found = read_settings(self.binding.directory(name)) if rec.is_gateway else None
            if found is not None and found.metrics is not None:
                exporters[name] = found.metrics
                if found.settings.metrics_keys_file:
                    keyed.add(name)
                if found.settings.api_keys_file:
                    counted.add(name)
        for p in planned:
            records[p.instance.name] = record_of(p.instance)
            plan = p.instance.gateway
            exporters.pop(p.instance.name, None)
            keyed.discard(p.instance.name)
            counted.discard(p.instance.name)
            if plan is not None and plan.metrics is not None:
                exporters[p.instance.name] = plan.metrics
                if plan.settings.metrics_keys_file:
                    keyed.add(p.instance.name)
                if plan.settings.api_keys_file:
                    counted.add(p.instance.name)
        return discovery_json(targets(records.values(), exporters, socket.gethostname(), keyed,
                                      counted))

    def reload_only(self, planned: Planned, changed: Sequence[str]) -> bool:
        """A gateway whose routes or member keys alone changed: new workers on
        the same socket, the old ones finish what they serve (the keys are
        copied again before the signal, on every target)."""
        if planned.instance.gateway is None:
            return False
        config = {f.name for f in planned.files if f.config or f.secret}
        if not all(name in config for name in changed):
            return False
        self._reloaded.add(planned.instance.name)
        return True

    def before_signal(self, name: str) -> None:
        """A gateway told to reload by a signal reads its keys again: their maps
        first (the binding's)."""
        self.binding.before_signal(name)

    def after_signal(self, name: str) -> None:
        """Until the gateway's new worker serves (the binding's)."""
        self.binding.after_signal(name)

    def after(self, say: Say) -> None:
        """Reload the gateways whose routes changed (their members are up now);
        return once every reloaded gateway answers with its new routes."""
        reloaded = set(self._reloaded)
        for g in self._reload:
            done = self.binding.reload(g)
            if done is not None:
                reloaded.add(g)
                say(f"{g}: gateway reloaded ({done}): its routes follow")
        for g in sorted(reloaded):
            self._settle(g, self._where[g], say)

    def _settle(self, gateway: str, where: str, say: Say) -> None:
        t0 = time.monotonic()
        note = wait_served(gateway, self.binding.directory(gateway), where)
        say(note or f"{gateway}: its new routes answer ({time.monotonic() - t0:.2f} s)")

    def before_remove(self, installed: Mapping[str, InstalledLike],
                      names: Sequence[str]) -> list[str]:
        """Gateways stop routing to the removed instances before they stop."""
        lines: list[str] = []
        gone = [n for n in names if n in installed]
        apply_changes([(self.binding.discovery_file(), self._targets(installed, [], names))])
        for g in sorted(affected(installed, [], removed=names) - set(names)):
            apply_changes([(self.binding.path(f), f.text)
                           for f in rerender(self.binding, g, installed, [], removed=names)])
            if self.binding.reload(g) is not None:
                lines.append(f"{g}: gateway reloaded: no route to {', '.join(gone)} any more")
                self._settle(g, installed[g].rec.probe, lines.append)
        return lines

    def removed(self, inst: InstalledLike) -> tuple[list[Path], list[str]]:
        """A removed gateway's HAProxy files go with it."""
        if not inst.rec.is_gateway:
            return [], []
        return remove_gateway_files(self.binding, inst.name), []

    def status(self, installed: Mapping[str, InstalledLike], states: Mapping[str, str],
               detail: frozenset[str] = frozenset()) -> tuple[dict[str, object], tuple[str, ...]]:
        """Each gateway, its routes and their instances' states; with ``keys``,
        its counters per key name (from the running HAProxy)."""
        gateways = sorted(g for g, i in installed.items() if i.rec.is_gateway)
        remote = {g: remote_members(self.binding, g) for g in gateways}
        data, lines = gateway_section(installed, states, remote)
        if "keys" not in detail:
            return data, lines
        # the gateways asked for (status NAME --keys), or every one
        usage = {g: key_usage(self.binding.admin_socket(g)) for g in gateways if g in states}
        for entry in cast("list[dict[str, object]]", data.get("gateways", [])):
            if str(entry["name"]) in usage:
                entry["keys"] = usage[str(entry["name"])]
        return data, (*lines, *(line for g, keys in usage.items() for line in usage_lines(g, keys)))

    def doctor(self, installed: Mapping[str, InstalledLike], name: str,
               running: bool) -> list[Finding]:
        """A gateway's routes, or the gateway an instance joins."""
        inst = installed[name]
        if not inst.rec.is_gateway:
            return member_findings(inst, installed)
        members = sorted(members_of(installed, name))
        sockets = self.binding.socket_states(members) if members else {}
        return gateway_findings(self.binding.directory(name), name, installed, sockets)


def gateway_section(installed: Mapping[str, InstalledLike], states: Mapping[str, str],
                    remote: Mapping[str, list[tuple[Member, str]]] | None = None,
                    ) -> tuple[dict[str, object], tuple[str, ...]]:
    """Each gateway and its routes: route -> instances -> their state (a member
    on another host, ``<node>_<name>``, with its state in HAProxy)."""
    gateways = sorted(n for n, i in installed.items() if i.rec.is_gateway)
    if not gateways:
        return {}, ()
    data: list[dict[str, object]] = []
    lines = [""]
    for g in gateways:
        members = [(m, states.get(m.instance, "not shown"))
                   for m in members_of(installed, g).values()]
        members += (remote or {}).get(g, [])
        routes = {r: [(m.instance, st) for m, st in members if r in m.names]
                  for r in sorted({n for m, _ in members for n in m.names})}
        address = installed[g].rec.public
        data.append({"name": g, "address": address, "state": states.get(g, "not shown"),
                     "routes": [{"route": r, "instances": [{"name": n, "state": st}
                                                           for n, st in ms]}
                                for r, ms in routes.items()]})
        lines.append(f"gateway {g} ({address}, {states.get(g, 'not shown')}): "
                     f"{len(routes)} route(s)")
        lines += [f"  {r} -> " + ", ".join(f"{n} ({st})" for n, st in ms)
                  for r, ms in routes.items()]
    return {"gateways": data}, tuple(lines)
