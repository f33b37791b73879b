"""Swap groups on disk and at run time: the group drop-ins that deploy and
remove rewrite for every member, and what ``status`` and ``doctor`` say about
a group (issue 12; docs/swap.md)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unitgen.ops.files import apply_changes
from unitgen.ops.systemd.manager import UnitInfo, connect
from unitgen.plan.swap import SwapGroups, after_change, groups_of
from unitgen.spec.model import InstanceSpec
from unitgen.targets.systemd.installed import Installed, scan, unit_dir
from unitgen.targets.systemd.render import render_swap_dropin

__all__ = [
    "GroupState",
    "dropin_changes",
    "group_states",
    "installed_groups",
    "status_section",
    "waiting_findings",
    "write_dropins",
]

GROUP_HEADER = "# unitgen-swap-group: "
DROPIN = "unitgen-swap.conf"


def installed_groups(installed: dict[str, Installed]) -> dict[str, str]:
    """Installed instance -> its swap group, from the header of its unit files."""
    out: dict[str, str] = {}
    for name, inst in installed.items():
        path = inst.files.get(f"{name}.socket")
        if path is None:
            continue
        try:
            head = path.read_text(encoding="utf-8", errors="replace").splitlines()[:10]
        except OSError:
            continue
        for line in head:
            if line.startswith(GROUP_HEADER):
                out[name] = line[len(GROUP_HEADER):].strip()
    return out


def dropin_path(scope: str, name: str) -> Path:
    """Where a member's group drop-in lives."""
    return unit_dir(scope) / f"{name}-backend.service.d" / DROPIN


def dropin_changes(scope: str, installed: dict[str, Installed],
                   deployed: list[InstanceSpec] | tuple[InstanceSpec, ...] = (),
                   removed: list[str] | tuple[str, ...] = ()) -> list[tuple[Path, str | None]]:
    """The drop-ins to write (text) or delete (None) so that every member's
    ``Conflicts=`` names exactly the other members after this deploy/remove."""
    membership = after_change(installed_groups(installed), deployed, removed)
    names = set(installed) | {s.name for s in deployed} | set(removed)
    changes: list[tuple[Path, str | None]] = []
    for name in sorted(names):
        path = dropin_path(scope, name)
        want = None
        if name in membership:
            policy = SwapGroups(membership)
            want = render_swap_dropin(name, membership[name], policy.never_with(name)).text
        have = path.read_text(encoding="utf-8") if path.exists() else None
        if want != have:
            changes.append((path, want))
    return changes


def write_dropins(changes: list[tuple[Path, str | None]]) -> list[tuple[Path, str | None]]:
    """Apply drop-in changes all or nothing; returns the undo list."""
    done = apply_changes(changes)
    for path, text in changes:
        if text is None and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()
    return done


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


def _state(group: str, members: list[str], infos: dict[str, UnitInfo]) -> GroupState:
    st = GroupState(group, members)
    now = time.time()
    for m in members:
        proxy, server = infos[f"{m}.service"], infos[f"{m}-backend.service"]
        if proxy.status_text:
            st.status[m] = proxy.status_text
        if server.active_state == "active" and st.loaded is None:
            st.loaded = m
        elif server.active_state == "activating":
            st.loading = m
        if proxy.active_state == "deactivating":
            st.draining.append(m)
        elif proxy.active_state == "activating" and server.active_state in ("inactive", "failed"):
            st.waiting.append(m)
            since = proxy.exec_main_start_usec  # the proxy started waiting then
            st.waiting_s[m] = round(now - since / 1e6, 1) if since else 0.0
    return st


async def _group_states(scope: str) -> list[GroupState]:
    membership = installed_groups(scan(unit_dir(scope)))
    if not membership:
        return []
    groups = groups_of(membership)
    units = [u for ms in groups.values() for m in ms for u in (f"{m}.service", f"{m}-backend.service")]
    async with connect(scope) as m:
        infos = await m.info(units)
    return [_state(g, ms, infos) for g, ms in sorted(groups.items())]


def group_states(scope: str) -> list[GroupState]:
    """Every swap group of the installed instances, with who is loaded and who waits."""
    return asyncio.run(_group_states(scope))


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


def status_section(scope: str) -> tuple[dict[str, object], tuple[str, ...]]:
    """The swap-group part of ``status``: JSON data and one line per group."""
    states = group_states(scope)
    if not states:
        return {}, ()
    return {"swap_groups": [asdict(s) for s in states]}, ("", *(_line(s) for s in states))


def _runtime_dir(scope: str) -> str:
    return os.environ.get("XDG_RUNTIME_DIR", "/run") if scope == "user" else "/run"


def waiting_findings(name: str, scope: str) -> list[tuple[bool, str]]:
    """For ``doctor``: why a member waits (or that it is not waiting)."""
    states = [s for s in group_states(scope) if name in s.members]
    if not states:
        return []
    st = states[0]
    out: list[tuple[bool, str]] = []
    if name not in st.waiting:
        what = ("loaded" if st.loaded == name else "loading" if st.loading == name
                else "draining" if name in st.draining else "not loaded, nobody waiting for it")
        out.append((True, f"member of swap group {st.group} ({', '.join(st.members)}): {what}"))
        return out
    lock = Path(_runtime_dir(scope)) / "unitgen-swap" / f"{st.group}.lock"
    try:
        holder = lock.read_text(encoding="utf-8").strip()
    except OSError:
        holder = ""
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
    out.append((True, "; ".join(why)))
    if not (st.draining or st.loading or st.loaded or holder):
        out.append((False, f"{name} waits but no member is loaded, loading or draining: see "
                           f"journalctl for {name}.service"))
    return out
