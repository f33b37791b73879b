"""Quoting for systemd unit files, as Jinja filters with their own tests.

systemd expands ``%`` specifiers in almost every setting and ``$VAR`` in
``Exec*=`` command lines, splits command lines on whitespace, unquotes ``"..."``
with C escapes, and treats a trailing backslash as a line continuation. Every
value from a spec passes through one of these functions on its way into a
unit, so no value can add a line, a section or a directive, and each reaches
the server byte for byte.
"""

from __future__ import annotations

import re

from unitgen.plan.instance import CONFIG_DIR, RUNTIME_DIR, STATE_DIR

__all__ = [
    "comment_line",
    "directive_name",
    "env_file_line",
    "env_file_value",
    "environment_assignment",
    "exec_line",
    "exec_word",
    "path_value",
    "setting_value",
    "specifier_path",
    "text_value",
    "word_value",
]

# Words made only of these characters need no quotes (and contain no % or $).
# fullmatch, never match(...$): "$" also matches before a trailing newline, and a
# word "x\n" written raw would end the line (found by tests/live/test_hostile_live.py).
_SAFE_WORD = re.compile(r"[A-Za-z0-9_./:=,+@-]+")
_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _c_escape(text: str, *, dollar: bool) -> str:
    out: list[str] = []
    for ch in text:
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and dollar:
            out.append("$$")
        else:
            out.append(ch)
    return "".join(out)


def exec_word(word: str) -> str:
    """One argv element for ``ExecStart=``: reaches the program exactly as given.

    The plan's directory tokens become the manager's specifiers: :data:`RUNTIME_DIR`
    ``%t`` (its runtime directory), :data:`CONFIG_DIR` ``%E`` (its configuration
    directory), :data:`STATE_DIR` ``%S`` (its state directory).
    """
    bare = word
    for token in _TOKENS:
        bare = bare.replace(token, "")
    if "\x00" in bare:
        raise ValueError("a command-line word cannot contain a NUL character")
    if bare == word and _SAFE_WORD.fullmatch(word):
        return word
    return '"' + _with_specifiers(word, list(_TOKENS.items())) + '"'


_TOKENS = {CONFIG_DIR: "%E", RUNTIME_DIR: "%t", STATE_DIR: "%S"}


def _with_specifiers(word: str, tokens: list[tuple[str, str]]) -> str:
    """``word`` C-escaped, each token replaced by its specifier (never escaped)."""
    if not tokens:
        return _c_escape(word, dollar=True)
    (token, spec), rest = tokens[0], tokens[1:]
    return spec.join(_with_specifiers(p, rest) for p in word.split(token))


def exec_line(argv: tuple[str, ...] | list[str]) -> str:
    """A whole command line for ``Exec*=``."""
    return " ".join(exec_word(w) for w in argv)


def environment_assignment(name: str, value: str) -> str:
    """The value of one ``Environment=`` line: ``"NAME=value"``, quoted and escaped.

    ``Environment=`` expands ``%`` specifiers and C escapes but not ``$``.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{name!r} is not an environment variable name")
    if "\x00" in value:
        raise ValueError("an environment value cannot contain a NUL character")
    return '"' + _c_escape(f"{name}={value}", dollar=False) + '"'


# Characters some readers (Python's str.splitlines among them) take as line
# breaks although systemd does not: flattened too, so free text can never look
# like a line of its own to anything that reads the unit back.
_LINE_BREAKS = frozenset("\x85\u2028\u2029")


def text_value(text: str) -> str:
    """Free text (``Description=``): one line, specifiers escaped, no continuation."""
    flat = "".join(" " if ord(ch) < 0x20 or ord(ch) == 0x7F or ch in _LINE_BREAKS else ch
                   for ch in text)
    # strip() first: it also removes Unicode blanks, which could uncover a
    # trailing backslash (a line continuation) if it ran last
    return flat.replace("%", "%%").strip().rstrip("\\ ")


_WORD = re.compile(r"[A-Za-z0-9_.:@+,=/\[\]-]+")
_DIRECTIVE = re.compile(r"[A-Z][A-Za-z0-9]*")


def word_value(word: str) -> str:
    """A name, address or number written as is (``ListenStream=``, ``User=``,
    the instance name): refused unless it is one plain word, so it needs no
    escaping and cannot add a line, a specifier or a variable."""
    if not _WORD.fullmatch(word):
        raise ValueError(f"{word!r} cannot be written into a unit file as one plain word")
    return word


def directive_name(key: str) -> str:
    """A directive name from a spec's ``[systemd.*]`` tables."""
    if not _DIRECTIVE.fullmatch(key):
        raise ValueError(f"{key!r} is not a directive name")
    return key


def setting_value(value: str) -> str:
    """A value from a spec's ``[systemd.*]`` tables, written as the user wrote it
    (so ``MemoryMax=80%`` keeps its meaning): one line, no continuation."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in _LINE_BREAKS for ch in value) \
            or value.endswith("\\"):
        raise ValueError(f"{value!r} cannot be written into a unit file")
    return value


def specifier_path(path: str) -> str:
    """A path unitgen builds from a specifier and a checked word
    (``%E/unitgen/secrets/NAME.env``): the leading specifier is kept, the rest
    must be plain."""
    spec, sep, rest = path.partition("/")
    if spec not in ("%E", "%t", "%S", "%C") or not sep or not _WORD.fullmatch(rest):
        raise ValueError(f"{path!r} is not a specifier path unitgen writes")
    return path


def path_value(path: str) -> str:
    """An absolute path setting (``WorkingDirectory=``): specifiers escaped."""
    if (any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path) or path.endswith("\\")
            or path != path.strip(" \t")):
        raise ValueError(f"{path!r} cannot be written into a unit file")
    return path.replace("%", "%%")


def env_file_line(name: str, value: str) -> str:
    """One ``NAME="value"`` line for an ``EnvironmentFile=`` (secrets live there)."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("a secret must be one line of printable characters")
    escaped = "".join("\\" + ch if ch in '"\\`$' else ch for ch in value)
    return f'{name}="{escaped}"'


def comment_line(text: str) -> str:
    """A whole comment line (the installed record, :mod:`unitgen.plan.record`):
    systemd reads nothing on it, so nothing is escaped; refused when it is not a
    comment or anything in it could end the line (or continue it onto the next)."""
    if not text.startswith("#") or text.endswith("\\") or any(
            ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029" or ord(ch) < 0x20
            for ch in text):
        raise ValueError(f"{text!r} cannot be written as one comment line")
    return text


def env_file_value(text: str, name: str) -> str | None:
    """The value of ``name`` in a file of :func:`env_file_line` lines (None: not there)."""
    for line in text.split("\n"):
        head = f'{name}="'
        if line.startswith(head) and line.endswith('"'):
            return re.sub(r"\\(.)", r"\1", line[len(head):-1])
    return None
