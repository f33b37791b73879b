"""A gateway's API keys and what each may do, as HAProxy reads them: what the
gateway's unit runs as root before HAProxy starts and before each reload
(``ExecStartPre=+``, ``ExecReload=+``; under supervisord the wrapper at start
and the binding at reload), so a changed keys file holds from the reload on.

The keys file: one key a line, alone (every route, no limit: the format
before policies) or followed by its policy (docs/gateway.md)::

    sk-alice-7f3c  name=alice models=qwen,llama rpm=60 in_flight=4
    sk-ci-19ab     name=ci models=qwen rpm=10
    sk-plain-4d1e

``name`` is what logs, counters and ``status`` show (never the key; a key
without one is ``key-`` and 8 hex digits of an HMAC of it with :data:`SALT`); ``models`` the route
names it may use (others answer 404, ``/v1/models`` lists only these);
``rpm`` the requests it may send a minute; ``in_flight`` how many it may have
in flight at once (over either: 429). Keys that share a name share its
counters and bounds (an old and a new key while clients move over), so they
must give it the same policy.

The file becomes HAProxy map files in the gateway's runtime directory (the
HAProxy user's, mode 0400; :data:`MAPS`), each written under a fresh name and
renamed over the old one. With ``--admin`` the maps are also handed to the
running worker over its runtime API (``prepare map``, ``add map``, ``commit
map``) *before* the reload's signal: the worker that finishes the requests in
flight answers the last request of each kept-alive connection by the new
keys, so a revoked key fails from the reload on, while a stream it started
before goes on to its end. The keys the gateway sends its members
(``--member-keys``) are handed over the same way, so a member whose key
changed is sent its new one from the reload on. Standard library only.

    python -I -m unitgen.inunit.gwkeys --keys FILE --models MODELS_JSON --out DIR \\
        [--metrics-keys FILE] [--admin SOCKET] [--member-keys SECRET_FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass

from unitgen.inunit.hareload import runtime_api
from unitgen.inunit.keycopy import read_root_only, write_for_owner

__all__ = ["MAPS", "MEMBER_KEYS", "METRICS_KEYS", "KeyPolicy", "listing", "main", "maps_of",
           "member_key_lines", "parse_keys", "push", "write_maps"]

# the files, in the runtime directory; what each maps
MAPS = {
    "key": "keys.map",  # key -> its name (a secret: the keys themselves)
    "listing": "key-models.map",  # name -> its /v1/models answer (restricted names only)
    "names": "key-names.map",  # name -> its route names, for its 404
    "allowed": "key-routes.map",  # "name|route" -> 1, each route a restricted name may use
    "rpm": "key-rpm.map",  # name -> requests a minute
    "in_flight": "key-in-flight.map",  # name -> requests in flight at once
}
METRICS_KEYS = "metrics-keys.lst"  # the exporter's keys, one a line (an ACL's patterns)
# the API keys a gateway sends its members ("backend Bearer key" lines), in its
# runtime directory: copied there from a root-only file at each start and reload
MEMBER_KEYS = "member-keys.map"
SALT = "key-names.secret"  # in the gateway's configuration directory: default_name's secret

_KEY_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750's b64token: what Bearer carries
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # the stick-table's string key: 64
_ROUTE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")  # a route name (plan.py)
_FIELDS = ("name", "models", "rpm", "in_flight")
_MAX = 1_000_000_000  # HAProxy counts in 32 bits


@dataclass(frozen=True)
class KeyPolicy:
    """One key and what it may do (None: no restriction)."""

    key: str
    name: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    in_flight: int | None = None
    line: int = 0

    def same_policy(self, other: KeyPolicy) -> bool:
        """Both give their name the same rules."""
        return (self.models, self.rpm, self.in_flight) == (other.models, other.rpm,
                                                            other.in_flight)


def default_name(key: str, salt: bytes = b"") -> str:
    """The name of a key given without one: stable, and no use for finding the
    key: an HMAC with the gateway's own secret (:data:`SALT`), so that 8 hex
    digits shown on the page and in the log cannot be matched against guesses
    of a short key offline."""
    return "key-" + hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:8]


def read_salt(directory: str) -> bytes:
    """The gateway's secret for key names (:data:`SALT` in its configuration
    directory, root's 0600; made on first use, never through a link)."""
    path = os.path.join(directory, SALT)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
        finally:
            os.close(fd)
    return read_root_only(path).strip()


def _number(field: str, value: str) -> int | str:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= _MAX:
        return f"{field}= is not a whole number from 1 to {_MAX}"
    return int(value)


def _line(words: list[str], n: int, salt: bytes) -> KeyPolicy | list[str]:
    """One line's key and policy, or what is wrong with it (quoting no word of the
    line: any of them may be a key, one written in the wrong place)."""
    key = words[0]
    fields: dict[str, str] = {}
    problems: list[str] = []
    if not _KEY_RE.fullmatch(key) or len(key) > 1024:
        problems.append("the key (its first word) holds characters a Bearer token cannot "
                        "(letters, digits and -._~+/ then = at the end), or is over 1024 long")
    for i, word in enumerate(words[1:], start=2):
        field, eq, value = word.partition("=")
        if not eq or field not in _FIELDS:  # not quoted: a word out of place may be a key
            problems.append(f"word {i} is not one of {', '.join(f + '=' for f in _FIELDS)}")
        elif field in fields:
            problems.append(f"{field}= is given twice")
        else:
            fields[field] = value
    models: tuple[str, ...] | None = None
    numbers: dict[str, int] = {}
    if "name" in fields and not _NAME_RE.fullmatch(fields["name"]):
        problems.append("name= must be 1-63 letters, digits or ._- "
                        "(starting with a letter or digit)")
    if "models" in fields:
        models = tuple(fields["models"].split(","))
        if not all(_ROUTE_RE.fullmatch(m) for m in models) or len(set(models)) != len(models):
            problems.append("models= must be route names separated "
                            "by commas, each once")
    for field in ("rpm", "in_flight"):
        if field in fields:
            got = _number(field, fields[field])
            if isinstance(got, str):
                problems.append(got)
            else:
                numbers[field] = got
    if problems:
        return [f"line {n}: {p}" for p in problems]
    return KeyPolicy(key=key, name=fields.get("name") or default_name(key, salt), models=models,
                     rpm=numbers.get("rpm"), in_flight=numbers.get("in_flight"), line=n)


def parse_keys(text: str, salt: bytes = b"") -> tuple[list[KeyPolicy], list[str]]:
    """The keys of a keys file, and every problem (by line; never a key)."""
    found: list[KeyPolicy] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    names: dict[str, KeyPolicy] = {}
    for n, raw in enumerate(text.split("\n"), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        got = _line(words, n, salt)
        if isinstance(got, list):
            problems += got
            continue
        if got.key in seen:
            problems.append(f"line {n}: the same key as line {seen[got.key]}")
            continue
        first = names.setdefault(got.name, got)
        if not first.same_policy(got):
            problems.append(f"line {n}: name={got.name} is on line {first.line} with other "
                            "models, rpm or in_flight: keys that share a name share its rules")
            continue
        seen[got.key] = n
        found.append(got)
    return found, problems


def listing(models: dict[str, object], allowed: tuple[str, ...]) -> str:
    """``/v1/models`` as it answers a key that may use ``allowed`` only: the
    gateway's own list (``models``, its models.json) without the others, on one line."""
    found = models.get("data")
    data = [m for m in (found if isinstance(found, list) else [])
            if isinstance(m, dict) and m.get("id") in allowed]
    return json.dumps({**models, "data": data}, separators=(",", ":"))


def maps_of(policies: list[KeyPolicy], models: dict[str, object]) -> dict[str, list[str]]:
    """The map files' lines (``key value``), by :data:`MAPS` entry."""
    out: dict[str, list[str]] = {k: [] for k in MAPS}
    by_name: dict[str, KeyPolicy] = {}
    for p in policies:
        out["key"].append(f"{p.key} {p.name}")
        by_name.setdefault(p.name, p)
    for name, p in sorted(by_name.items()):
        if p.models is not None:
            out["listing"].append(f"{name} {listing(models, p.models)}")
            out["names"].append(f"{name} {', '.join(p.models)}")
            out["allowed"] += [f"{name}|{m} 1" for m in p.models]
        if p.rpm is not None:
            out["rpm"].append(f"{name} {p.rpm}")
        if p.in_flight is not None:
            out["in_flight"].append(f"{name} {p.in_flight}")
    return out


def _keys_only(text: str, source: str) -> list[str]:
    """The exporter's keys file: a key a line (its first word)."""
    keys, problems = parse_keys(text)
    if problems:
        raise ValueError(f"{source}: {problems[0]}")
    return [p.key for p in keys]


def write_maps(keys_file: str | None, models_file: str, out: str,
               metrics_keys_file: str | None = None) -> dict[str, list[str]]:
    """Read the keys file (and the exporter's), check all of it, then write every
    map into ``out``; the lines written, by file name. ValueError (naming the
    file and line) when a file is wrong: nothing is written then."""
    files: dict[str, list[str]] = {}
    if keys_file is not None:
        try:
            with open(models_file, encoding="utf-8") as fh:
                models = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the gateway's models file {models_file}: "
                             f"{exc}") from None
        keys, problems = parse_keys(read_root_only(keys_file).decode("utf-8", "replace"),
                                    read_salt(os.path.dirname(models_file) or "."))
        if problems:
            raise ValueError(f"{keys_file}: " + "; ".join(problems[:5]))
        files = {MAPS[k]: lines for k, lines in maps_of(keys, models).items()}
    if metrics_keys_file is not None:
        text = read_root_only(metrics_keys_file).decode("utf-8", "replace")
        files[METRICS_KEYS] = _keys_only(text, metrics_keys_file)
    for name, lines in files.items():
        write_for_owner("".join(f"{line}\n" for line in lines).encode(), os.path.join(out, name))
    return files


def member_key_lines(secret_file: str) -> list[str]:
    """The ``backend Bearer key`` lines of the keys a gateway sends its members
    (its root-only secret file, as ``unitgen.inunit.keycopy`` copies it for
    HAProxy); none when it is missing."""
    try:
        text = read_root_only(secret_file).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _chunks(lines: list[str], size: int) -> list[list[str]]:
    """``lines`` in runs of at most ``size`` bytes (a runtime API command must fit
    HAProxy's buffer, ``tune.bufsize``: 33 KiB at the gateway's least)."""
    out: list[list[str]] = [[]]
    used = 0
    for line in lines:
        if out[-1] and used + len(line) + 1 > size:
            out.append([])
            used = 0
        out[-1].append(line)
        used += len(line) + 1
    return out


def _fill(sock: str, kind: str, path: str, at: str, lines: list[str], size: int) -> None:
    for run in _chunks(lines, size):
        if not run:
            continue
        if kind == "map":  # HAProxy 2.6 takes a payload for maps only
            said = runtime_api(sock, f"add map {at} {path} <<\n" + "\n".join(run) + "\n", 5.0)
        else:  # one command a pattern, several to a line (keys hold no ';')
            said = runtime_api(sock, "; ".join(f"add acl {at} {path} {ln}" for ln in run), 5.0)
        if said.strip():
            raise OSError(f"HAProxy refused a line of {os.path.basename(path)}: "
                          f"{said.strip()[:200]}")


def push(sock: str, out: str, files: dict[str, list[str]], size: int = 8192) -> list[str]:
    """Hand the maps to the worker answering on the runtime API ``sock``: a new
    version of each filled, then committed, the key map last (a new key is known
    to the worker only once its policy is); the files it took. A map that worker
    does not read (its configuration is older) is left out; OSError when the
    socket does not answer or HAProxy refuses a step (nothing committed then,
    when it is not the commit itself)."""
    key_map = MAPS["key"]
    order = sorted(files, key=lambda name: name == key_map)  # the key map last
    versions: dict[str, str] = {}
    for name in order:
        path = os.path.join(out, name)
        kind = "acl" if name == METRICS_KEYS else "map"
        said = runtime_api(sock, f"prepare {kind} {path}", 5.0)
        version = re.search(r"New version created: (\d+)", said)
        if version is None:
            if "Unknown" in said:  # the running configuration has no such file
                continue
            raise OSError(f"HAProxy did not prepare {name}: {said.strip()[:200]}")
        versions[name] = f"@{version.group(1)}"
        _fill(sock, kind, path, versions[name], files[name], size)
    for name, at in versions.items():
        kind = "acl" if name == METRICS_KEYS else "map"
        said = runtime_api(sock, f"commit {kind} {at} {os.path.join(out, name)}", 5.0)
        if said.strip():
            raise OSError(f"HAProxy did not take the new {name}: {said.strip()[:200]}")
    return list(versions)


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); a message and exit 1 on failure."""
    ap = argparse.ArgumentParser(prog="unitgen gwkeys", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", help="the gateway's api_keys_file")
    ap.add_argument("--models", required=True, help="its models.json (every route)")
    ap.add_argument("--out", required=True, help="its runtime directory")
    ap.add_argument("--metrics-keys", help="its metrics_keys_file")
    ap.add_argument("--admin", help="the running worker's runtime API, if it runs")
    ap.add_argument("--member-keys", help="the keys it sends its members (root's secret file): "
                    "handed to the running worker too (the copy HAProxy reads at start is "
                    "unitgen.inunit.keycopy's)")
    ns = ap.parse_args(argv)
    try:
        files = write_maps(ns.keys, ns.models, ns.out, ns.metrics_keys)
        if ns.member_keys:
            files[MEMBER_KEYS] = member_key_lines(ns.member_keys)
        # no HAProxy runs yet (no socket, or nobody at it): it reads the files at start
        with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
            if ns.admin:
                push(ns.admin, ns.out, files)
    except (OSError, ValueError) as exc:
        print(f"unitgen gwkeys: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
