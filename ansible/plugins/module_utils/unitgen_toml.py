# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""A small TOML writer for unitgen specs: the unitgen_instance module receives a
spec as a mapping and writes it to the host as a TOML file.

Standard library only, and no Python newer than the oldest interpreter
ansible-core runs modules with (3.8): this file travels to the managed host.
It writes what a spec holds (strings, integers, floats, booleans, lists, and
tables such as ``health`` and ``systemd.service``) and refuses anything TOML
cannot say (``None`` inside a list, dates, unpaired surrogates) with the key
that holds it, instead of writing something that reads back differently.

``loads`` reads a spec file back (the module redacts the secrets of the
previous file in its diff): with ``tomllib`` where the interpreter has it
(3.11+), else with a reader of exactly what ``dumps`` writes.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["TomlWriteError", "dumps", "loads"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_INT64 = (-(2**63), 2**63 - 1)


class TomlWriteError(ValueError):
    """A value that TOML cannot represent; ``key`` says where it is."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _string(text: str, where: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise TomlWriteError(where, "contains an unpaired surrogate, which TOML cannot hold")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _key(key: object, where: str) -> str:
    if not isinstance(key, str):
        raise TomlWriteError(where, f"keys must be strings, not {type(key).__name__}")
    return key if _BARE_KEY.fullmatch(key) else _string(key, where)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _value(value: object, where: str) -> str:
    """One value written inline (used for table entries and list items)."""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise TomlWriteError(where, f"{value} does not fit TOML's 64-bit integers")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has '.', 'e' or both, so it reads back as a float
    if isinstance(value, str):
        return _string(value, where)
    if isinstance(value, (list, tuple)):
        items = []
        for i, item in enumerate(value):
            if item is None:
                raise TomlWriteError(f"{where}[{i}]", "TOML has no null")
            items.append(_value(item, f"{where}[{i}]"))
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        pairs = [
            f"{_key(k, where)} = {_value(v, _join(where, str(k)))}"
            for k, v in value.items()
            if v is not None
        ]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    raise TomlWriteError(where, f"cannot write a {type(value).__name__} as TOML")


def _table(table: dict[Any, Any], path: list[str], where: str, out: list[str]) -> None:
    """Plain entries first, then sub-tables under ``[a.b]`` headers: an entry
    written after a header would belong to that header's table."""
    subtables = []
    for key, value in table.items():
        here = _join(where, str(key))
        if value is None:  # an absent key (TOML has no null)
            continue
        if isinstance(value, dict):
            subtables.append((key, value, here))
            continue
        out.append(f"{_key(key, here)} = {_value(value, here)}")
    for key, value, here in subtables:
        sub_path = [*path, _key(key, here)]
        plain = [v for v in value.values() if v is not None and not isinstance(v, dict)]
        has_sub = any(isinstance(v, dict) for v in value.values())
        if plain or not has_sub:  # a header for its entries, or to create an empty table
            if out:
                out.append("")
            out.append("[" + ".".join(sub_path) + "]")
        _table(value, sub_path, here, out)


def dumps(data: dict[Any, Any]) -> str:
    """The mapping ``data`` as a TOML document (keys in the order given)."""
    if not isinstance(data, dict):
        raise TomlWriteError("", f"a TOML document is a mapping, not {type(data).__name__}")
    out: list[str] = []
    _table(data, [], "", out)
    return "\n".join(out) + "\n" if out else ""


def loads(text: str) -> dict[str, Any] | None:
    """A TOML document as a mapping, or None when it cannot be read here: not
    TOML, or, on an interpreter without ``tomllib``, not as ``dumps`` writes it
    (after leading comment lines such as the module's header)."""
    try:
        import tomllib  # noqa: PLC0415 - Python 3.11+; the fallback covers older hosts
    except ImportError:
        return _loads_own(text)
    try:
        return tomllib.loads(text)
    except (ValueError, TypeError):
        return None


_SCALAR = re.compile(r"true|false|nan|[+-]?inf|-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_STRING = re.compile(r'"((?:[^"\\]|\\["\\btnfr]|\\u[0-9a-fA-F]{4})*)"')
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}


class _UnreadableError(ValueError):
    pass


class _Line:
    """One line of ``dumps`` output, read left to right."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def eat(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise _UnreadableError(token)
        self.pos += len(token)

    def eat_end(self) -> None:
        if self.pos != len(self.text):
            raise _UnreadableError("trailing text")

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def string(self) -> str:
        match = _STRING.match(self.text, self.pos)
        if not match:
            raise _UnreadableError("string")
        self.pos = match.end()
        return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", _unescape, match.group(1))

    def key(self) -> str:
        if self.peek('"'):
            return self.string()
        match = _BARE_KEY.match(self.text, self.pos)
        if not match:
            raise _UnreadableError("key")
        self.pos = match.end()
        return match.group(0)

    def value(self) -> Any:  # noqa: ANN401 - any TOML value
        if self.peek('"'):
            return self.string()
        if self.peek("["):
            self.eat("[")
            items: list[Any] = []
            while not self.peek("]"):
                if items:
                    self.eat(", ")
                items.append(self.value())
            self.eat("]")
            return items
        if self.peek("{}"):
            self.eat("{}")
            return {}
        if self.peek("{ "):
            self.eat("{ ")
            table: dict[str, Any] = {}
            while not self.peek(" }"):
                if table:
                    self.eat(", ")
                key = self.key()
                self.eat(" = ")
                table[key] = self.value()
            self.eat(" }")
            return table
        match = _SCALAR.match(self.text, self.pos)
        if not match:
            raise _UnreadableError("value")
        self.pos = match.end()
        word = match.group(0)
        if word in ("true", "false"):
            return word == "true"
        if word.lstrip("+-") in ("inf", "nan") or match.group(1) or match.group(2):
            return float(word)
        return int(word)


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    return chr(int(code[1:], 16)) if code.startswith("u") else _UNESCAPES[code]


def _loads_own(text: str) -> dict[str, Any] | None:
    lines = text.split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    try:
        doc = _read_lines(lines)
    except (_UnreadableError, KeyError, ValueError):
        return None
    # Only what dumps would write back identically was read correctly.
    try:
        return doc if dumps(doc) == "\n".join(lines) else None
    except TomlWriteError:
        return None


def _read_lines(lines: list[str]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    table = doc
    for raw in lines:
        if not raw:
            continue
        line = _Line(raw)
        if line.peek("["):
            table = _header(line, doc)
        else:
            key = line.key()
            line.eat(" = ")
            table[key] = line.value()
        line.eat_end()
    return doc


def _header(line: _Line, doc: dict[str, Any]) -> dict[str, Any]:
    """The table a ``[a."b c"]`` line opens (created in ``doc``)."""
    line.eat("[")
    path = [line.key()]
    while line.peek("."):
        line.eat(".")
        path.append(line.key())
    line.eat("]")
    table = doc
    for part in path:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise _UnreadableError(part)
    return table
