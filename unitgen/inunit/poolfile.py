"""What a GPU pool member's proxy knows of its pool (issue 27): a small JSON
file deploy writes for each member, ``%E/unitgen/pool/<name>.json``, and
rewrites for every member whenever the members change (the drop-ins of a swap
group, in a file of its own: the proxy reads it at each turn).

It names the member itself and every member that shares one of its GPUs, each
with its GPUs and its terms (:class:`PoolTerms`: its memory need and where it
came from, whether its server sleeps, its turn's bounds), and how the member's
own server is put to sleep and woken (:func:`request_bytes`: the call on the
wire, sent by its proxy over its connection to the private endpoint). The same terms are a field of each
member's installed record, so a deploy can write the files of members it does
not plan.

Standard library only: the proxy reads it inside the unit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unitgen.inunit.gpuneed import Need

__all__ = ["POOL_FILE_FORMAT", "Call", "PoolFile", "PoolMember", "PoolTerms", "request_bytes", "status_of"]

POOL_FILE_FORMAT = 1


@dataclass(frozen=True)
class PoolTerms:
    """A pool member's terms, as deploy planned them from its spec."""

    need: str  # Need.to_arg(): declared, backend-args or estimate (measured is read at run time)
    detail: str = ""  # how the need was found
    fingerprint: str = ""  # what a measured figure depends on (plan.memneed.fingerprint)
    fixed: bool = True  # the spec says it (declared, backend-args): never replaced by a measurement
    sleep: bool = False  # its server can release its GPU memory and keep its process
    min_turn: float = 5.0  # loaded, it keeps its GPUs this long before it may be asked to yield
    drain: float = 180.0  # how long it may finish its requests when it yields
    load_timeout: float = 1800.0  # its [health] timeout: a load takes at most this long
    idle_stop: float | None = None

    def need_value(self) -> Need:
        """The need as the policy weighs it."""
        need = Need.from_arg(self.need)
        return Need(need.source, need.bytes, need.fraction, self.detail)


@dataclass(frozen=True)
class PoolMember:
    """One member as another member's proxy sees it."""

    name: str
    gpus: tuple[str, ...]
    terms: PoolTerms


Call = tuple[str, str, str]  # (method, path with its query, JSON body or "")


def request_bytes(c: Call) -> bytes:
    """A call on the wire, to the server's private endpoint (never its public
    port): HTTP/1.1, the path with its query, a JSON body if any."""
    method, path, body = c
    data = body.encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Length: {len(data)}\r\n")
    if data:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + data


def status_of(answer: bytes) -> int:
    """The status code of an answer's first line (0: not an HTTP answer)."""
    parts = answer.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return 0


@dataclass(frozen=True)
class PoolFile:
    """One member's view of its pool: itself first, then the members that share
    a GPU with it, and how its own server sleeps and wakes."""

    name: str
    members: tuple[PoolMember, ...]
    sleep: Call | None = None
    wake: Call | None = None
    # paths its public proxy refuses: the sleep endpoints are unitgen's, not a client's
    refused: tuple[str, ...] = field(default_factory=tuple)

    @property
    def me(self) -> PoolMember:
        """The member whose file this is."""
        return next(m for m in self.members if m.name == self.name)

    def text(self) -> str:
        """The file's text (stable: the same pool gives the same bytes)."""
        data: dict[str, Any] = {
            "format": POOL_FILE_FORMAT, "name": self.name,
            "members": [{"name": m.name, "gpus": list(m.gpus), "terms": asdict(m.terms)}
                        for m in self.members],
            "sleep": list(self.sleep) if self.sleep else None,
            "wake": list(self.wake) if self.wake else None,
            "refused": list(self.refused),
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str) -> PoolFile:
        """The inverse of :meth:`text`; ValueError for anything else."""
        try:
            data = json.loads(text)
            if data["format"] != POOL_FILE_FORMAT:
                raise ValueError(f"not a pool file: format {data['format']!r}, not {POOL_FILE_FORMAT}")
            members = tuple(PoolMember(str(m["name"]), tuple(str(g) for g in m["gpus"]),
                                       PoolTerms(**m["terms"])) for m in data["members"])
            out = cls(str(data["name"]), members,
                      _call(data.get("sleep")), _call(data.get("wake")),
                      tuple(str(p) for p in data.get("refused") or ()))
            out.me.terms.need_value()  # a need that does not parse is no pool file
        except (KeyError, TypeError, StopIteration, json.JSONDecodeError) as exc:
            raise ValueError(f"not a pool file: {exc!r}") from None
        return out

    @classmethod
    def read(cls, path: Path) -> PoolFile:
        """Read and parse a pool file (OSError, ValueError)."""
        return cls.parse(path.read_text(encoding="utf-8"))


def _call(value: object) -> Call | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 3:
        raise TypeError(f"a call is [method, path, body], not {value!r}")
    return (str(value[0]), str(value[1]), str(value[2]))
