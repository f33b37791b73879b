"""Swap groups as a feature: the group drop-ins that deploy and remove rewrite
for every member, the GPU claims mates do not conflict on, and what ``status``
and ``doctor`` say about a group (docs/swap.md). What is systemd's (drop-in
files, unit states, the turn lock's place) comes through :class:`SwapBinding`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from unitgen.features.base import Feature, InstalledLike, Writes
from unitgen.features.swap.plan import SwapGroups, after_change, groups_of
from unitgen.ops.findings import Finding
from unitgen.ops.pipeline import Planned
from unitgen.spec.model import InstanceSpec
from unitgen.targets.capabilities import Capability

__all__ = ["GroupState", "MemberUnits", "SwapBinding", "SwapFeature", "installed_groups"]


@dataclass(frozen=True)
class MemberUnits:
    """A member's proxy and server as the manager sees them."""

    proxy_state: str  # active, activating, deactivating, inactive, failed
    server_state: str
    status_text: str = ""  # what its proxy says (sd_notify STATUS=)
    waiting_since: float = 0.0  # epoch seconds its proxy started waiting (0: unknown)


class SwapBinding(Protocol):
    """What swap groups need from a target."""

    def dropin(self, name: str) -> Path:
        """Where member ``name``'s group drop-in lives."""
        ...

    def render_dropin(self, name: str, group: str, mates: list[str]) -> str:
        """The drop-in's text: the other members' servers in ``Conflicts=``."""
        ...

    def write(self, changes: Writes) -> None:
        """Write (or delete) drop-ins all or nothing, and make the manager read them."""
        ...

    def member_units(self, members: list[str]) -> dict[str, MemberUnits]:
        """Each member's units, in one round trip."""
        ...

    def lock(self, group: str) -> Path:
        """The group's turn lock (its holder's name is written in it)."""
        ...


def installed_groups(installed: Mapping[str, InstalledLike]) -> dict[str, str]:
    """Installed instance -> its swap group, from its record."""
    return {n: i.rec.swap_group for n, i in installed.items() if i.rec.swap_group}


@dataclass
class GroupState:
    """One swap group right now."""

    group: str
    members: list[str]
    loaded: str | None = None  # its server is active
    loading: str | None = None  # its server is starting
    draining: list[str] = field(default_factory=list)  # finishing requests before unloading
    waiting: list[str] = field(default_factory=list)  # requests wait for their turn
    waiting_s: dict[str, float] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)  # proxy status lines


class SwapFeature(Feature):
    """Swap groups bound to a target."""

    name = "swap"
    capabilities = frozenset({Capability.SWAP_GROUP})
    binding: SwapBinding

    def __init__(self, binding: SwapBinding) -> None:
        super().__init__(binding)
        self._files: Writes = []

    def cohabitants(self, installed: Mapping[str, InstalledLike], spec: InstanceSpec,
                    run: Sequence[InstanceSpec]) -> frozenset[str]:
        """Mates never run beside ``spec``: their claims are no conflict."""
        return SwapGroups(after_change(installed_groups(installed), run)).makes_room_for(spec.name)

    def plan(self, installed: Mapping[str, InstalledLike], planned: Sequence[Planned]) -> list[str]:
        """The drop-ins every member needs once this run is deployed."""
        self._files = self.dropins(installed, [p.instance.spec for p in planned])
        return []

    def files(self) -> Writes:
        """The drop-ins that change."""
        return self._files

    def dropins(self, installed: Mapping[str, InstalledLike],
                deployed: Sequence[InstanceSpec] = (), removed: Sequence[str] = ()) -> Writes:
        """The drop-ins to write (text) or delete (None) so that every member's
        ``Conflicts=`` names exactly the other members after this deploy/remove."""
        membership = after_change(installed_groups(installed), deployed, removed)
        policy = SwapGroups(membership)
        names = set(installed) | {s.name for s in deployed} | set(removed)
        changes: Writes = []
        for name in sorted(names):
            path = self.binding.dropin(name)
            want = None
            if name in membership:
                want = self.binding.render_dropin(name, membership[name],
                                                  policy.never_with(name))
            have = path.read_text(encoding="utf-8") if path.exists() else None
            if want != have:
                changes.append((path, want))
        return changes

    def before_remove(self, installed: Mapping[str, InstalledLike],
                      names: Sequence[str]) -> list[str]:
        """The remaining members stop naming the removed ones."""
        self.binding.write(self.dropins(installed, removed=[n for n in names if n in installed]))
        return []

    def states(self, installed: Mapping[str, InstalledLike]) -> list[GroupState]:
        """Every group, with who is loaded and who waits."""
        groups = groups_of(installed_groups(installed))
        if not groups:
            return []
        units = self.binding.member_units([m for ms in groups.values() for m in ms])
        return [_state(g, ms, units) for g, ms in sorted(groups.items())]

    def status(self, installed: Mapping[str, InstalledLike], states: Mapping[str, str],
               detail: frozenset[str] = frozenset()) -> tuple[dict[str, object], tuple[str, ...]]:
        """One line per group (every group: a member's wait depends on the others)."""
        groups = self.states(installed)
        if not groups:
            return {}, ()
        return {"swap_groups": [asdict(g) for g in groups]}, ("", *(_line(g) for g in groups))

    def doctor(self, installed: Mapping[str, InstalledLike], name: str,
               running: bool) -> list[Finding]:
        """Why a member waits (or that it is not waiting)."""
        return [Finding(ok, text) for ok, text in self._waiting(installed, name)]

    def _waiting(self, installed: Mapping[str, InstalledLike],
                 name: str) -> list[tuple[bool, str]]:
        states = [s for s in self.states(installed) if name in s.members]
        if not states:
            return []
        st = states[0]
        if name not in st.waiting:
            what = ("loaded" if st.loaded == name else "loading" if st.loading == name
                    else "draining" if name in st.draining else "not loaded, nobody waiting for it")
            return [(True, f"member of swap group {st.group} ({', '.join(st.members)}): {what}")]
        lock = self.binding.lock(st.group)
        try:
            holder = lock.read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        out = [(True, "; ".join(_why(st, name, holder, lock)))]
        if not (st.draining or st.loading or st.loaded or holder):
            out.append((False, f"{name} waits but no member is loaded, loading or draining: see "
                               f"journalctl for {name}.service"))
        return out


def _state(group: str, members: list[str], units: dict[str, MemberUnits]) -> GroupState:
    st = GroupState(group, members)
    now = time.time()
    for m in members:
        u = units[m]
        if u.status_text:
            st.status[m] = u.status_text
        if u.server_state == "active" and st.loaded is None:
            st.loaded = m
        elif u.server_state == "activating":
            st.loading = m
        if u.proxy_state == "deactivating":
            st.draining.append(m)
        elif u.proxy_state == "activating" and u.server_state in ("inactive", "failed"):
            st.waiting.append(m)
            st.waiting_s[m] = round(now - u.waiting_since, 1) if u.waiting_since else 0.0
    return st


def _line(st: GroupState) -> str:
    parts = [f"swap group {st.group} ({', '.join(st.members)}):"]
    parts.append(f"loaded {st.loaded}" if st.loaded else "nothing loaded")
    if st.loading and st.loading != st.loaded:
        parts.append(f"loading {st.loading}")
    if st.draining:
        parts.append(f"draining {', '.join(st.draining)}")
    if st.waiting:
        parts.append("waiting " + ", ".join(f"{w} ({st.waiting_s.get(w, 0):.0f} s)"
                                            for w in st.waiting))
    return " ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:])


def _why(st: GroupState, name: str, holder: str, lock: Path) -> list[str]:
    waited = st.waiting_s.get(name, 0.0)
    why = [f"{name} has waited {waited:.0f} s for its turn in swap group {st.group}"]
    if st.draining:
        why.append(f"{', '.join(st.draining)} is finishing its requests first (bounded by its "
                   "swap_drain)")
    if st.loading:
        why.append(f"{st.loading} is loading (bounded by its [health] timeout)")
    elif st.loaded:
        why.append(f"{st.loaded} is loaded")
    if holder and holder != name:
        why.append(f"{holder} holds the group's turn ({lock})")
    others = [w for w in st.waiting if w != name]
    if others:
        why.append(f"also waiting: {', '.join(others)} (turns are taken one at a time)")
    if name in st.status:
        why.append(f"its proxy says: {st.status[name]}")
    return why
