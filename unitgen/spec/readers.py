"""Readers of spec values: one per kind of key, each turning a TOML value into the
value an :class:`~unitgen.spec.model.InstanceSpec` holds, or a problem naming the
key. :data:`READERS` maps each :class:`~unitgen.spec.keys.Kind` to its reader.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from unitgen.errors import Problem
from unitgen.spec.keys import (
    DIRECTIVE_RE,
    ENV_NAME_RE,
    GPU_UUID_RE,
    MAX_GPUS,
    Key,
    Kind,
    check_bounds,
    fullmatch,
)
from unitgen.timespan import parse_timespan

__all__ = ["OFF", "READERS", "SIZE_RE", "Checker", "check_executable", "kind_of", "parse_size",
           "unicode_problem"]

# What a duration key that can be turned off reads as when it is ("off", false).
OFF = -1.0

# A size: a number and a unit of _SIZE_UNITS.
SIZE_RE = r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*"

# Lone surrogates: only a spec given as a mapping (JSON, YAML via Ansible) can hold
# them; TOML files are UTF-8 and cannot. Noncharacters (U+FDD0-U+FDEF, and the last
# two of every plane, U+FFFE, U+FFFF ...): TOML can hold them, and systemd takes a
# line with one as not UTF-8 clean and ignores the whole assignment (an ExecStart=
# gone: the unit does not load; an Environment= gone: the server runs without it).
_NOT_TEXT = re.compile("[\ud800-\udfff\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17)) + "]")


def unicode_problem(value: str) -> str | None:
    """Why ``value`` cannot be written into a unit, a conf or an env file (None: it can)."""
    found = _NOT_TEXT.search(value)
    if found is None:
        return None
    code = ord(found.group())
    if 0xD800 <= code <= 0xDFFF:
        return "must be valid Unicode (a lone surrogate cannot be written to a file)"
    return (f"must not hold U+{code:04X}, a Unicode noncharacter: systemd takes a line "
            "with one as not UTF-8 clean and ignores it")


class Checker:
    """Collects problems while reading one spec."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        """Record a problem with ``key``."""
        self.problems.append(Problem(self.source, key, message))

    def unknown_keys(self, table: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        """A problem, with a "did you mean", for each key of ``table`` not in ``allowed``."""
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed_list = ", ".join(allowed)
            self.add(f"{prefix}{key}", f"unknown key{hint}; known keys: {allowed_list}")

    def word(self, value: object, key: str) -> str | None:
        """A string for argv or environment; numbers are accepted and written as text."""
        if isinstance(value, bool):
            self.add(key, f"must be a string, not a boolean ({_toml(value)}); quote it")
            return None
        if isinstance(value, int | float):
            return str(value)
        if not isinstance(value, str):
            self.add(key, f"must be a string, not {kind_of(value)}")
            return None
        if "\x00" in value:
            self.add(key, "must not contain a NUL character (no argv or environment can hold one)")
            return None
        if (why := unicode_problem(value)) is not None:
            self.add(key, why)
            return None
        return value


def kind_of(value: object) -> str:
    """What a wrong value is, as a message says it ("a list", "a table")."""
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)


def _toml(value: object) -> str:
    """A value as TOML writes it (``true``, not Python's ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


# --- one reader per kind of key ---------------------------------------------


def _read_text(c: Checker, key: Key, value: object) -> str | None:
    if not isinstance(value, str):
        c.add(key.name, f"must be a string, not {kind_of(value)}")
        return None
    if "\x00" in value:
        c.add(key.name, "must not contain a NUL character")
        return None
    if (why := unicode_problem(value)) is not None:
        c.add(key.name, why)
        return None
    if key.pattern and not fullmatch(key.pattern, value):
        c.add(key.name, f"{value!r} {key.pattern_doc}")
        return None
    return value


def _read_choice(c: Checker, key: Key, value: object) -> StrEnum | None:
    text = _read_text(c, key, value)
    if text is None:
        return None
    values = key.choice_values
    if key.choices is None or text not in values:
        close = difflib.get_close_matches(text, values, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        c.add(key.name, f"{text!r} is not one of {', '.join(values)}{hint}")
        return None
    return key.choices(text)


def _read_integer(c: Checker, key: Key, value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        hint = ""
        if isinstance(value, str) and value.strip().isdigit():
            hint = f" (write {key.name} = {value.strip()}, without quotes)"
        c.add(key.name, f"must be an integer, not {kind_of(value)}{hint}")
        return None
    if key.lo is not None and key.hi is not None and not key.lo <= value <= key.hi:
        c.add(key.name, f"{value} is out of range {key.lo:g}..{key.hi:g}")
        return None
    return value


def _read_boolean(c: Checker, key: Key, value: object) -> bool | None:
    if not isinstance(value, bool):
        hint = ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            hint = f" (write {key.name} = {value.strip().lower()}, without quotes)"
        c.add(key.name, f"must be true or false, not {kind_of(value)}{hint}")
        return None
    return value


def _read_duration(c: Checker, key: Key, value: object) -> float | None:
    if key.can_be_off and (value is False or value == "off"):
        return OFF
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        c.add(key.name, f"must be a time span like \"15min\", not {kind_of(value)}")
        return None
    try:
        seconds = float(value) if not isinstance(value, str) else parse_timespan(value)
    except ValueError as exc:
        c.add(key.name, str(exc))
        return None
    if seconds < 0 or (seconds == 0 and key.lo != 0):  # lo = 0: zero is a value of its own
        c.add(key.name, "must be longer than zero")
        return None
    why = check_bounds(key, seconds)
    if why:
        c.add(key.name, why)
        return None
    return seconds


def _read_words(c: Checker, key: Key, value: object) -> tuple[str, ...] | None:
    if isinstance(value, str):
        c.add(key.name, f"must be a list of strings, e.g. {key.name} = [\"--dtype\", "
                        "\"bfloat16\"], not one string")
        return None
    if not isinstance(value, list):
        c.add(key.name, f"must be a list of strings, not {kind_of(value)}")
        return None
    words = [c.word(item, f"{key.name}[{i}]") for i, item in enumerate(value)]
    if any(w is None for w in words):
        return None
    bad = [i for i, w in enumerate(words) if key.pattern and not fullmatch(key.pattern, w or "")]
    for i in bad:
        c.add(f"{key.name}[{i}]", f"{words[i]!r} {key.pattern_doc}")
    if bad:
        return None
    return tuple(w for w in words if w is not None)


def _read_env(c: Checker, key: Key, value: object) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict):
        c.add(key.name, f"must be a table of NAME = \"value\", not {kind_of(value)}")
        return None
    out: list[tuple[str, str]] = []
    for name, item in value.items():
        if not fullmatch(ENV_NAME_RE, name):
            c.add(f"{key.name}.{name}", "is not a valid environment variable name "
                                        "(letters, digits, '_', not starting with a digit)")
            continue
        word = c.word(item, f"{key.name}.{name}")
        if word is not None:
            out.append((name, word))
    return tuple(out)


def _read_directives(c: Checker, key: Key, value: object) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict):
        c.add(key.name, f"must be a table, not {kind_of(value)}")
        return None
    entries: list[tuple[str, str]] = []
    for name, item in value.items():
        where = f"{key.name}.{name}"
        if not fullmatch(DIRECTIVE_RE, name):
            c.add(where, "is not a systemd directive name (like Nice or MemoryMax)")
            continue
        word = c.word(item, where)
        if word is None:
            continue
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\x85\u2028\u2029" for ch in word):
            c.add(where, "must be one line without control characters")
            continue
        entries.append((name, word))
    return tuple(entries)


def _read_program(c: Checker, key: Key, value: object) -> str | None:
    text = _read_text(c, key, value)
    if text is not None and not check_executable(c, key.name, text):
        return None
    return text


def _read_path(c: Checker, key: Key, value: object) -> str | None:
    text = _read_text(c, key, value)
    if text is None:
        return None
    if not text.startswith("/"):
        c.add(key.name, f"{text!r} must be an absolute path")
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text) or text.endswith("\\"):
        c.add(key.name, f"{text!r} must be one line without control characters or a "
                        "trailing backslash")
        return None
    if text != text.strip(" \t"):
        # systemd strips them, so the unit would name another directory
        c.add(key.name, f"{text!r} must not start or end with a blank")
        return None
    parts = text.split("/")
    if any(p in (".", "..") for p in parts):
        # systemd refuses such paths at load time ("not normalized"); say so here.
        c.add(key.name, f"{text!r} must be a normalized path (no '.' or '..' parts)")
        return None
    return text


def _read_gpus(c: Checker, key: Key, value: object) -> int | tuple[int, ...] | tuple[str, ...] | None:
    if isinstance(value, bool):
        c.add(key.name, "must be a count, a list of indexes or a list of GPU UUIDs")
        return None
    if isinstance(value, int):
        if not 0 <= value <= MAX_GPUS:
            c.add(key.name, f"{value} is out of range 0..{MAX_GPUS}")
            return None
        return value
    if isinstance(value, list) and value and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_GPUS for v in value
    ):
        if len(set(value)) != len(value):
            c.add(key.name, "lists a GPU twice")
            return None
        return tuple(int(v) for v in value)
    if isinstance(value, list) and value and all(
        isinstance(v, str) and fullmatch(GPU_UUID_RE, v) for v in value
    ):
        if len(set(value)) != len(value):
            c.add(key.name, "lists a GPU twice")
            return None
        return tuple(str(v) for v in value)
    c.add(key.name, "must be a count (gpus = 2), a list of indexes (gpus = [0, 1]) or a "
                    "list of UUIDs (gpus = [\"GPU-...\"])")
    return None


def _read_size(c: Checker, key: Key, value: object) -> int | None:
    if not isinstance(value, str):
        c.add(key.name, f"must be a size like \"40GiB\", not {kind_of(value)}")
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        c.add(key.name, str(exc))
        return None


READERS: dict[Kind, Callable[[Checker, Key, object], object]] = {
    Kind.TEXT: _read_text,
    Kind.CHOICE: _read_choice,
    Kind.INTEGER: _read_integer,
    Kind.BOOLEAN: _read_boolean,
    Kind.DURATION: _read_duration,
    Kind.WORDS: _read_words,
    Kind.ENV: _read_env,
    Kind.DIRECTIVES: _read_directives,
    Kind.PROGRAM: _read_program,
    Kind.PATH: _read_path,
    Kind.GPUS: _read_gpus,
    Kind.SIZE: _read_size,
}


def check_executable(c: Checker, key: str, value: str) -> bool:
    """Whether ``value`` can start an ``ExecStart=`` line; a problem with ``key`` if not."""
    # systemd reads leading -@:+! on ExecStart= as flags, even inside quotes.
    if not value or value[0] in "-@:+!" or any(ord(ch) < 0x20 for ch in value):
        c.add(key, f"{value!r} must be an absolute path or a program name, without leading "
                   "'-@:+!' or control characters")
        return False
    if "/" in value and not value.startswith("/"):
        c.add(key, f"{value!r} must be an absolute path (or a bare program name found on PATH)")
        return False
    return True


_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
    "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
    "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Parse ``40GiB`` / ``500MB`` / ``1024`` into bytes."""
    match = re.fullmatch(SIZE_RE, text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 40GiB, 500MiB, 24GB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r} must be larger than zero")
    return size
