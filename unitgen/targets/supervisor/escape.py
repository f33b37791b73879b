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
  all) and each value is stripped of quote characters at both ends:
  ``KEY="value"`` can hold anything but ``"``, ``KEY='value'`` anything but
  ``'``, and no value can begin or end with a quote character.

Values these rules cannot carry are refused (:class:`UnrepresentableError`), never
changed.
"""

from __future__ import annotations

__all__ = ["UnrepresentableError", "command_line", "command_word", "env_pairs", "env_value",
           "plain_value"]

HERE = "%(here)s"


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


def env_value(value: str) -> str:
    """One quoted value for ``environment=KEY=<here>``."""
    _no_line_breaks(value)
    if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
        raise UnrepresentableError("supervisord strips quote characters from both ends of an "
                              "environment value, so a value cannot begin or end with one")
    if '"' in value and "'" in value:
        raise UnrepresentableError("an environment value cannot hold both kinds of quote "
                              "(supervisord's environment= has no escapes)")
    if _comment_cut(value):
        raise UnrepresentableError("';' or '#' after a space would start a comment in "
                              "supervisord's environment= (it has no escapes)")
    if HERE in value:
        raise UnrepresentableError(f"supervisord replaces {HERE} in every value, even escaped")
    quote = "'" if '"' in value else '"'
    return quote + value.replace("%", "%%") + quote


def env_pairs(pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """The value of ``environment=``: ``KEY="value",KEY2="value2"``."""
    return ",".join(f"{k}={env_value(v)}" for k, v in pairs)


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
