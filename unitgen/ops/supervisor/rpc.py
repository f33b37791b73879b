"""Talking to supervisord: its XML-RPC API (stdlib ``xmlrpc.client``) over a
Unix socket or HTTP, and where ``supervisorctl`` would look for it.

``supervisorctl`` reads the first config file found among
``$CWD/supervisord.conf``, ``$CWD/etc/supervisord.conf``,
``/etc/supervisord.conf`` and ``/etc/supervisor/supervisord.conf`` (plus two
paths relative to its own executable); ``[supervisorctl] serverurl`` there is
the URL (default ``http://localhost:9001``) and ``[include] files`` names the
directory conf files go in.
"""

from __future__ import annotations

import base64
import configparser
import http.client
import os
import socket
import sys
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from unitgen.errors import UnitgenError

__all__ = [
    "Endpoint",
    "SupervisorError",
    "SupervisorRPC",
    "connect",
    "default_conf_dir",
    "default_url",
    "find_config",
]

DEFAULT_URL = "http://localhost:9001"
# XML-RPC fault codes (supervisor/xmlrpc.py Faults)
BAD_NAME = 10
NOT_RUNNING = 70
ALREADY_STARTED = 60
ALREADY_ADDED = 90
STILL_RUNNING = 91


class SupervisorError(UnitgenError):
    """supervisord is unreachable or refused an operation."""


def _candidates() -> list[Path]:
    here = Path(sys.executable).resolve().parent
    return [
        here.parent / "etc" / "supervisord.conf", here.parent / "supervisord.conf",
        Path.cwd() / "supervisord.conf", Path.cwd() / "etc" / "supervisord.conf",
        Path("/etc/supervisord.conf"), Path("/etc/supervisor/supervisord.conf"),
    ]


def find_config(explicit: str | None = None) -> Path | None:
    """The main supervisord config file supervisorctl would read, if any."""
    if explicit:
        return Path(explicit)
    for path in _candidates():
        if path.is_file():
            return path
    return None


def _read(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error) as exc:
        raise SupervisorError(f"cannot read {path}: {exc}") from None
    return parser


def default_url(config: Path | None) -> str:
    """``[supervisorctl] serverurl`` of the config (``%(here)s`` expanded)."""
    if config is None:
        return DEFAULT_URL
    parser = _read(config)
    url = parser.get("supervisorctl", "serverurl", fallback=DEFAULT_URL)
    return url.replace("%(here)s", str(config.resolve().parent))


def default_conf_dir(config: Path | None) -> Path | None:
    """The directory of the first ``[include] files`` pattern of the config."""
    if config is None:
        return None
    parser = _read(config)
    files = parser.get("include", "files", fallback="").split()
    if not files:
        return None
    here = config.resolve().parent
    first = files[0].replace("%(here)s", str(here))
    return (here / first).parent if not os.path.isabs(first) else Path(first).parent


def credentials(config: Path | None) -> tuple[str, str] | None:
    """``[supervisorctl] username/password``, when the config sets them."""
    if config is None:
        return None
    parser = _read(config)
    user = parser.get("supervisorctl", "username", fallback="")
    return (user, parser.get("supervisorctl", "password", fallback="")) if user else None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _Transport(xmlrpc.client.Transport):
    """HTTP or a Unix socket, with optional basic auth and a timeout."""

    def __init__(self, unix_path: str | None, auth: tuple[str, str] | None,
                 timeout: float | None) -> None:
        super().__init__()
        self._unix = unix_path
        self._auth = auth
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:  # noqa: ANN401 - typeshed types it so
        if self._unix is not None:
            return _UnixConnection(self._unix, self._timeout)
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn

    def send_headers(self, connection: http.client.HTTPConnection,
                     headers: list[tuple[str, str]]) -> None:
        if self._auth:
            token = base64.b64encode(f"{self._auth[0]}:{self._auth[1]}".encode()).decode()
            headers = [*headers, ("Authorization", f"Basic {token}")]
        super().send_headers(connection, headers)


@dataclass(frozen=True)
class Endpoint:
    """Where supervisord answers: ``unix:///path`` or ``http://host:port``."""

    url: str
    auth: tuple[str, str] | None = None


class SupervisorRPC:
    """The calls unitgen makes, with faults turned into SupervisorError."""

    def __init__(self, endpoint: Endpoint, timeout: float | None = 30.0) -> None:
        self.endpoint = endpoint
        parts = urlsplit(endpoint.url)
        if parts.scheme == "unix":
            path = endpoint.url[len("unix://"):]
            transport = _Transport(path, endpoint.auth, timeout)
            uri = "http://localhost/RPC2"
        elif parts.scheme in ("http", "https"):
            transport = _Transport(None, endpoint.auth, timeout)
            uri = endpoint.url.rstrip("/") + "/RPC2"
        else:
            raise SupervisorError(f"supervisor URL {endpoint.url!r}: expected unix:///path or "
                                  "http://host:port")
        self._proxy = xmlrpc.client.ServerProxy(uri, transport=transport, allow_none=True)

    def call(self, method: str, *args: object) -> Any:  # noqa: ANN401 - XML-RPC values
        """``supervisor.<method>(*args)``."""
        try:
            return getattr(self._proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as exc:
            raise SupervisorError(f"supervisord: {method}: {exc.faultString}") from exc
        except xmlrpc.client.ProtocolError as exc:
            hint = " (check [supervisorctl] username/password)" if exc.errcode == 401 else ""
            raise SupervisorError(f"supervisord at {self.endpoint.url}: HTTP {exc.errcode} "
                                  f"{exc.errmsg}{hint}") from None
        except OSError as exc:
            raise SupervisorError(f"cannot reach supervisord at {self.endpoint.url}: "
                                  f"{exc.strerror or exc}; is it running? (set --supervisor-url "
                                  "or UNITGEN_SUPERVISOR_URL)") from None

    def fault_code(self, method: str, *args: object) -> int:
        """Call and return 0, or the fault code (for calls whose failure is expected)."""
        try:
            self._proxy_call(method, *args)
        except xmlrpc.client.Fault as exc:
            return int(exc.faultCode)
        return 0

    def _proxy_call(self, method: str, *args: object) -> Any:  # noqa: ANN401 - XML-RPC values
        try:
            return getattr(self._proxy.supervisor, method)(*args)
        except OSError as exc:
            raise SupervisorError(f"cannot reach supervisord at {self.endpoint.url}: "
                                  f"{exc.strerror or exc}") from None

    def processes(self) -> list[dict[str, Any]]:
        """getAllProcessInfo."""
        return cast(list[dict[str, Any]], self.call("getAllProcessInfo"))

    def reload_config(self) -> tuple[list[str], list[str], list[str]]:
        """reloadConfig: (added, changed, removed) group names."""
        result = self.call("reloadConfig")
        added, changed, removed = result[0]
        return list(added), list(changed), list(removed)

    def add_group(self, name: str) -> None:
        """addProcessGroup, tolerating 'already added'."""
        code = self.fault_code("addProcessGroup", name)
        if code not in (0, ALREADY_ADDED):
            raise SupervisorError(f"supervisord: addProcessGroup {name}: fault {code}")

    def remove_group(self, name: str) -> None:
        """Stop then removeProcessGroup, tolerating an unknown group."""
        code = self.fault_code("stopProcessGroup", name, True)
        if code == BAD_NAME:
            return
        code = self.fault_code("removeProcessGroup", name)
        if code not in (0, BAD_NAME):
            raise SupervisorError(f"supervisord: removeProcessGroup {name}: fault {code}")

    def tail(self, name: str, offset: int, length: int) -> tuple[str, int, bool]:
        """tailProcessStdoutLog (stderr is redirected into it)."""
        text, new_offset, overflow = self.call("tailProcessStdoutLog", name, offset, length)
        return str(text), int(new_offset), bool(overflow)


def connect(url: str | None = None, *, config: str | None = None,
            timeout: float | None = 30.0) -> SupervisorRPC:
    """An RPC client for ``url`` (default: what supervisorctl would use)."""
    cfg = find_config(config)
    return SupervisorRPC(Endpoint(url or default_url(cfg), credentials(cfg)), timeout=timeout)
