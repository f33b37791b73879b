"""Talking to a systemd manager over D-Bus (dbus-fast). The only module that sees
D-Bus types: everything else gets plain values (:class:`UnitInfo`, job results).

Both managers are supported: ``scope="system"`` (the system bus) and
``scope="user"`` (the session bus of ``DBUS_SESSION_BUS_ADDRESS``, which is also
how a :mod:`unitgen.ops.systemd.sandbox` manager is reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from unitgen.errors import SystemdError

__all__ = ["JobOutcome", "Manager", "UnitInfo", "connect"]

DEST = "org.freedesktop.systemd1"
PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
SOCKET = "org.freedesktop.systemd1.Socket"
PROPS = "org.freedesktop.DBus.Properties"
# One D-Bus call (not a job: jobs have their own deadlines). systemd answers in
# milliseconds; a minute means it is hung, and saying so beats waiting for ever.
CALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class UnitInfo:
    """What status and deploy need to know about one unit."""

    name: str
    load_state: str = "not-found"
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = ""
    main_pid: int = 0
    status_text: str = ""
    n_restarts: int = 0
    active_enter_usec: int = 0  # realtime µs when it last became active
    exec_main_start_usec: int = 0  # realtime µs the main process last started (0: never)
    fragment_path: str = ""
    unit_file_state: str = ""
    listen: tuple[str, ...] = ()  # sockets: "127.0.0.1:8000"


@dataclass(frozen=True)
class JobOutcome:
    """How a start/stop/restart job ended: done, canceled, timeout, failed,
    dependency or skipped."""

    unit: str
    result: str
    seconds: float

    @property
    def ok(self) -> bool:
        """True when the job finished as asked."""
        return self.result == "done"


class Manager:
    """A connected manager. Use ``async with connect(scope) as m``."""

    def __init__(self, bus: MessageBus, scope: str) -> None:
        self._bus = bus
        self.scope = scope
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._finished: dict[str, str] = {}
        # dbus-fast drops the connection when the socket's send buffer fills (EAGAIN
        # in its write callback, python-dbus-next#153): bound the calls in flight.
        self._slots = asyncio.Semaphore(64)
        bus.add_message_handler(self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.member == "JobRemoved":
            _, job_path, _, result = msg.body
            # kept until finish() takes the result: the signal may come while no
            # one is waiting (between two polls of a start with a progress line)
            fut = self._jobs.get(job_path)
            if fut is not None and not fut.done():
                fut.set_result(result)
            else:
                self._finished[job_path] = result

    async def _call(self, interface: str, member: str, signature: str = "",
                    body: list[Any] | None = None, path: str = PATH) -> list[Any]:
        try:
            async with self._slots:
                reply = await asyncio.wait_for(self._bus.call(Message(
                    destination=DEST, path=path, interface=interface, member=member,
                    signature=signature, body=body or [])), CALL_TIMEOUT)
        except TimeoutError:
            raise SystemdError(f"systemd did not answer {member} within {CALL_TIMEOUT:g} s "
                               "(is the manager hung or reloading?)") from None
        if reply is None:
            raise SystemdError(f"systemd did not answer {member}")
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else reply.error_name
            raise SystemdError(f"systemd refused {member}: {detail}")
        return list(reply.body)

    async def subscribe(self) -> None:
        """Ask for JobRemoved signals (needed before starting jobs we wait for)."""
        rule = f"type='signal',sender='{DEST}',interface='{MANAGER}',member='JobRemoved'"
        reply = await self._bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        if reply is None or reply.message_type == MessageType.ERROR:
            raise SystemdError("cannot subscribe to systemd job signals")
        await self._call(MANAGER, "Subscribe")

    async def reload(self) -> None:
        """daemon-reload."""
        await self._call(MANAGER, "Reload")

    async def enable(self, files: list[str]) -> None:
        """Enable unit files (their [Install] sections); the caller reloads."""
        if files:
            await self._call(MANAGER, "EnableUnitFiles", "asbb", [files, False, True])

    async def disable(self, names: list[str]) -> None:
        """Disable units by name (missing ones are fine)."""
        if names:
            try:
                await self._call(MANAGER, "DisableUnitFiles", "asb", [names, False])
            except SystemdError as exc:
                if "not found" not in str(exc).lower() and "does not exist" not in str(exc):
                    raise

    async def reset_failed(self, name: str) -> None:
        """Forget a unit's failed state."""
        # not loaded or not failed: nothing to reset
        with contextlib.suppress(SystemdError):
            await self._call(MANAGER, "ResetFailedUnit", "s", [name])

    async def job(self, verb: str, unit: str, *, timeout: float) -> JobOutcome:
        """Run StartUnit/StopUnit/RestartUnit and wait (up to ``timeout``) for its end."""
        start = time.monotonic()
        job_path = await self.queue(verb, unit)
        result = await self.finish(job_path, timeout)
        if result is None:
            self.forget(job_path)
            result = "timeout"
        return JobOutcome(unit, result, time.monotonic() - start)

    async def queue(self, verb: str, unit: str) -> str:
        """Start a StartUnit/StopUnit/RestartUnit job; its path, for :meth:`finish`.
        (Subscribed before the call: a job that ends at once is not missed.)"""
        (job_path,) = await self._call(MANAGER, verb, "ss", [unit, "replace"])
        if job_path not in self._finished:
            self._jobs[job_path] = asyncio.get_running_loop().create_future()
        return str(job_path)

    async def finish(self, job_path: str, within: float) -> str | None:
        """The job's result (done, failed, ...) if it ends within ``within``
        seconds, else None (ask again)."""
        if job_path in self._finished:
            return self._finished.pop(job_path)
        fut = self._jobs.get(job_path)
        if fut is None:
            return "canceled"  # not ours to wait for any more (forgotten)
        if fut.done():
            self._jobs.pop(job_path, None)
            return fut.result()
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), timeout=within)
        except TimeoutError:
            return None
        self._jobs.pop(job_path, None)
        return result

    def forget(self, job_path: str) -> None:
        """Stop waiting for a job (its deadline passed)."""
        self._jobs.pop(job_path, None)

    async def environment(self) -> dict[str, str]:
        """The manager's own environment (what its units inherit: PATH, ...)."""
        (value,) = await self._call(PROPS, "Get", "ss", [MANAGER, "Environment"])
        pairs = (str(item).partition("=") for item in value.value)
        return {k: v for k, _, v in pairs}

    async def start_nowait(self, unit: str) -> None:
        """Queue a start job and return at once."""
        await self._call(MANAGER, "StartUnit", "ss", [unit, "replace"])

    async def unit_path(self, name: str) -> str:
        """Object path of a unit, loading it if needed."""
        (path,) = await self._call(MANAGER, "LoadUnit", "s", [name])
        return str(path)

    async def _props(self, path: str, interface: str) -> dict[str, Any]:
        try:
            (props,) = await self._call(PROPS, "GetAll", "s", [interface], path=path)
        except SystemdError:
            return {}
        return {k: v.value for k, v in props.items()}

    async def exec_and_environment(self, name: str) -> tuple[list[str], list[str]]:
        """A service's ``ExecStart`` argv and ``Environment`` as systemd parsed
        them (after ``%`` specifiers, before ``$`` expansion)."""
        props = await self._props(await self.unit_path(name), SERVICE)
        exec_start = props.get("ExecStart") or []
        argv = [str(w) for w in exec_start[0][1]] if exec_start else []
        return argv, [str(e) for e in props.get("Environment", [])]

    async def overview(self, names: list[str], detailed: set[str]) -> dict[str, UnitInfo]:
        """States of many units in one ``ListUnitsByNames`` call, and every property
        (one ``GetAll`` each) of those in ``detailed`` and of any that is neither
        active nor inactive: what ``status`` needs in about one call per instance
        (three calls a unit with :meth:`info`)."""
        (rows,) = await self._call(MANAGER, "ListUnitsByNames", "as", [names])
        out: dict[str, UnitInfo] = {}
        paths: dict[str, str] = {}
        for name, _desc, load, active, sub, _follow, path, *_job in rows:
            out[name] = UnitInfo(name=name, load_state=load, active_state=active, sub_state=sub)
            if name in detailed or active not in ("active", "inactive"):
                paths[name] = path
        props = await asyncio.gather(*(self._props(p, "") for p in paths.values()))
        for name, x in zip(paths, props, strict=True):
            out[name] = _unit_info(name, x, x)
        return out

    async def info(self, names: list[str]) -> dict[str, UnitInfo]:
        """Properties of many units, requested all at once (one round trip's wait)."""
        paths = await asyncio.gather(*(self.unit_path(n) for n in names))
        units = await asyncio.gather(*(self._props(p, UNIT) for p in paths))
        kinds = [SERVICE if n.endswith(".service") else SOCKET for n in names]
        extras = await asyncio.gather(*(self._props(p, k) for p, k in zip(paths, kinds, strict=True)))
        return {name: _unit_info(name, u, x)
                for name, u, x in zip(names, units, extras, strict=True)}


def _unit_info(name: str, u: dict[str, Any], x: dict[str, Any]) -> UnitInfo:
    """A UnitInfo from a unit's Unit properties and its Service/Socket ones."""
    return UnitInfo(
        name=name,
        load_state=str(u.get("LoadState", "not-found")),
        active_state=str(u.get("ActiveState", "inactive")),
        sub_state=str(u.get("SubState", "dead")),
        result=str(x.get("Result", "")),
        main_pid=int(x.get("MainPID", 0)),
        status_text=str(x.get("StatusText", "")),
        n_restarts=int(x.get("NRestarts", 0)),
        active_enter_usec=int(u.get("ActiveEnterTimestamp", 0)),
        exec_main_start_usec=int(x.get("ExecMainStartTimestamp", 0)),
        fragment_path=str(u.get("FragmentPath", "")),
        unit_file_state=str(u.get("UnitFileState", "")),
        listen=tuple(str(addr) for _, addr in x.get("Listen", [])),
    )


class connect:  # noqa: N801 - reads as a function at the call site: `async with connect(...)`
    """Connect to the system or user manager; a clear error when there is none."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self._bus: MessageBus | None = None

    async def __aenter__(self) -> Manager:
        bus_type = BusType.SESSION if self.scope == "user" else BusType.SYSTEM
        try:
            self._bus = await asyncio.wait_for(MessageBus(bus_type=bus_type).connect(), 10)
        except Exception as exc:  # dbus-fast raises several kinds for "no bus here"
            if self.scope == "user":
                address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
                where = f"the user manager (session bus {address})" if address else (
                    "the user manager: DBUS_SESSION_BUS_ADDRESS is not set (no login session?)")
            else:
                where = "the system manager (/run/dbus/system_bus_socket)"
            # dbus-fast's own wording mentions X11's DISPLAY, which misleads here
            detail = "" if "DISPLAY" in str(exc) else f": {type(exc).__name__}: {exc}"
            raise SystemdError(
                f"cannot reach {where}{detail}. On a host or container without systemd, run "
                "`unitgen sandbox start` and use --user with the environment it prints"
            ) from None
        return Manager(self._bus, self.scope)

    async def __aexit__(self, *exc: object) -> None:
        if self._bus is not None:
            self._bus.disconnect()
