"""Quoting for supervisord's configuration format, read from supervisor 4.x's
own parser (``supervisor/options.py``, ``datatypes.py``):

* The file is read by ``RawConfigParser`` with ``inline_comment_prefixes=(';',
  '#')``: a ``;`` or ``#`` after any whitespace character (``str.isspace``)
  ends the value; the value is stripped; a line break ends it.
* Every value then goes through ``expand_here`` (the text ``%(here)s`` is
  replaced, even inside ``%%(here)s``) and Python ``%`` formatting: ``%`` is
  written ``%%``.
* ``command=`` is split with ``shlex.split`` (POSIX rules, no comments):
  double quotes keep everything, ``\\`` escapes ``"`` and ``\\`` inside them,
  and outside them escapes any character.
* ``environment=`` is split with a *non*-POSIX ``shlex.shlex`` (no escapes at
  all) and each value is stripped of quote characters at both ends, so it
  cannot carry ``#hash``, ``a ;b``, ``%(here)s`` or ``"quoted"``. unitgen never
  writes it: an instance's environment goes to its env file
  (:func:`env_file_line`), which the wrapper reads before it starts the server.

Values these rules cannot carry are refused (:class:`UnrepresentableError`), never
changed. Each function here is a filter of the supervisor templates
(:mod:`unitgen.targets.supervisor.render`): nothing reaches a file without one.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["ENV_FILE_FORMAT", "ENV_SECRETS_LINE", "UnrepresentableError", "command_line",
           "command_word", "comment_text", "env_digest", "env_file_line", "plain_value",
           "shown_value", "word_value"]

HERE = "%(here)s"
# The line that tells the wrapper's reader (unitgen.inunit.supwrap.read_env_file,
# which keeps its own copy: in-unit code imports nothing from here) that the
# values of an env file are escaped; a file without it is read as written.
ENV_FILE_FORMAT = "# unitgen-env-format: escaped"
# Separates an env file's plain variables (above, listed in the conf file and
# covered by env_digest) from its secrets (below, never shown).
ENV_SECRETS_LINE = "# unitgen-secrets: below"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r"})
# What ends a line for supervisord's reader (universal newlines: \n, \r) and
# for anything else that reads the file back (str.splitlines: these too).
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
_WORD = re.compile(r"[A-Za-z0-9_.:@+,=/\[\]-]+")


class UnrepresentableError(ValueError):
    """A value supervisord's configuration format cannot carry unchanged."""


def _no_line_breaks(value: str) -> None:
    if "\n" in value or "\r" in value:
        raise UnrepresentableError("a line break cannot be written in a supervisord conf file")
    if "\x00" in value:
        raise UnrepresentableError("a NUL character cannot be passed to a process")


def _comment_cut(value: str) -> bool:
    """True when ConfigParser would cut ``value`` at an inline comment."""
    return any(ch in ";#" and (i == 0 or value[i - 1].isspace()) for i, ch in enumerate(value))


def command_word(word: str) -> str:
    """One argv word for ``command=``: after ConfigParser, ``%`` expansion and
    ``shlex.split`` it is ``word`` again."""
    _no_line_breaks(word)
    out = ['"']
    for i, ch in enumerate(word):
        if ch in ";#":
            # outside the quotes, escaped: never preceded by whitespace, so never a comment
            out.append(f'"\\{ch}"')
        elif ch in '"\\':
            out.append("\\" + ch)
        elif ch == "%":
            out.append("%%")
            if word.startswith("(", i + 1):
                out.append('""')  # so "%%(here)s" never contains the text %(here)s
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def command_line(argv: tuple[str, ...] | list[str]) -> str:
    """The value of ``command=`` for ``argv``."""
    return " ".join(command_word(w) for w in argv)


def plain_value(value: str) -> str:
    """A value taken as written (``directory=``, ``user=``): only ``%`` is escaped."""
    _no_line_breaks(value)
    if value != value.strip():
        raise UnrepresentableError("supervisord strips spaces at both ends of a value")
    if _comment_cut(value):
        raise UnrepresentableError("';' or '#' after a space would start a comment")
    if HERE in value:
        raise UnrepresentableError(f"supervisord replaces {HERE} in every value")
    return value.replace("%", "%%")


def word_value(word: str | int) -> str:
    """A name, address or number written as is (section names, ``socket=tcp://``,
    ``autorestart=``, numbers): refused unless it is one plain word, which no
    rule of the format can change (no space, ``;``, ``#``, ``%`` or quote)."""
    text = str(word)
    if isinstance(word, bool) or not _WORD.fullmatch(text):
        raise UnrepresentableError(f"{text!r} cannot be written as one plain word")
    return text


def comment_text(text: str) -> str:
    """Text on a comment line (the header ``# unitgen-KEY: value`` lines, which
    :mod:`unitgen.targets.supervisor.installed` reads back as written): refused
    when anything in it could end the line."""
    if any(ch in _LINE_BREAKS or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise UnrepresentableError(f"{text!r} cannot be written on one comment line")
    return text


def shown_value(value: str) -> str:
    """A value for people to read on a comment line (an env file's plain
    variables, listed in the conf file): Python's quoted form, which shows
    every character that is not printable as an escape, so no value can end
    the line or hide in it."""
    return comment_text(repr(value))


def env_file_line(name: str, value: str) -> str:
    """One ``NAME=VALUE`` line of an env file: the value byte for byte once
    ``\\``, line feed and carriage return are read back from ``\\\\``, ``\\n``
    and ``\\r`` (the reader needs :data:`ENV_FILE_FORMAT` in the file)."""
    if not _ENV_NAME.fullmatch(name):
        raise UnrepresentableError(f"{name!r} is not an environment variable name")
    if "\x00" in value:
        raise UnrepresentableError("a NUL character cannot be passed to a process")
    return f"{name}={value.translate(_ENV_ESCAPES)}"


def env_digest(pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """The digest of an env file's plain variables, for the wrapper's
    ``--env-digest``: written into ``command=``, it makes a change of the
    environment a change of the program that supervisord sees (a reload then
    replaces it, also when a failed deploy puts the previous files back), and
    the wrapper refuses an env file that does not hold them. Secrets are not
    covered: a digest of a short key in a readable file could be searched."""
    h = hashlib.sha256()
    for name, value in pairs:
        h.update(f"{name}={value}\x00".encode())  # NUL is in no name or value
    return h.hexdigest()[:16]
