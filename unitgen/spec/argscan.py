"""Finding options in an argv in every spelling a server's own parser accepts.

Each backend declares its parser's rules once, as an :class:`OptionSyntax` in
the backend table; every scan (port, host, endpoint, API key, TLS, GPU
defaults) takes that syntax, so no scan can miss a spelling another one sees.

Always found: ``--port 9000``, ``--port=9000`` and a bare trailing ``--port``.
``--port=9000`` is found even for llama.cpp and llama-box, whose parsers reject
it (the server would not start): the word would still carry its value, an API
key say, into a world-readable unit file. The rest depends on the parser:

* ``abbrev`` (Python argparse): an unambiguous prefix of a long option is that
  option (``--por 9000``, vox-box's ``--p 9000``). Any prefix is taken: only the
  server's whole option list could tell an ambiguous one, and argparse refuses
  an ambiguous prefix, so reading it as the option can never misread a word the
  server would run with.
* ``underscores`` (vLLM, llama.cpp): ``_`` reads as ``-`` in a long option's
  name (``--api_key``).
* ``dotted`` (vLLM): ``--NAME.FIELD VALUE`` is JSON-dict syntax for ``--NAME``.
* ``attached_short`` (argparse): ``-p9000`` is ``-p 9000``.
* ``value_always_next`` (llama.cpp, llama-box): the word after an option is its
  value even when it starts with ``-``; argparse instead reads such a word as
  the next option (a negative number excepted).

:func:`find_options` returns what the server reads as the option.
:func:`find_misspelled` returns words that are the option only under a rule the
server does not follow (``--api_key`` for SGLang, which would refuse to start
with the key in its unit) or that it reads in a way unitgen does not take
(vLLM's dotted form): callers refuse those.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXACT", "Found", "OptionSyntax", "find_misspelled", "find_options", "remove_found"]


@dataclass(frozen=True)
class OptionSyntax:
    """How one server's parser reads option words (see the module docstring)."""

    abbrev: bool = False
    underscores: bool = False
    dotted: bool = False
    attached_short: bool = False
    value_always_next: bool = False


# Names compared exactly, the value never starting with '-' (unless a number):
# what unitgen assumes of a program it does not know (custom commands).
EXACT = OptionSyntax()


@dataclass(frozen=True)
class Found:
    """One occurrence of an option: how it was spelled and its value (None: missing)."""

    flag: str  # the canonical option, e.g. --port
    spelled: str  # as written, e.g. --por or --port=9000
    value: str | None
    start: int  # index of the option word in argv
    length: int  # 1 for --port=9000 and a bare trailing flag, 2 for --port 9000, more for many values
    more: tuple[str, ...] = ()  # further values of an option that takes several (vLLM --api-key)
    why: str = ""  # find_misspelled: how the server would read the word instead

    def shown(self) -> str:
        """The occurrence as a user wrote it, for messages."""
        if self.length >= 2:
            return " ".join((self.spelled, *(v for v in (self.value, *self.more) if v is not None)))
        if self.value is not None:
            return self.spelled
        return f"{self.spelled} (without a value)"


def _name_match(name: str, flag: str, syntax: OptionSyntax) -> bool:
    if name == flag:
        return True
    # "--" alone is the terminator; "--x" is the shortest prefix argparse takes
    return syntax.abbrev and flag.startswith("--") and len(name) > 2 and flag.startswith(name)


def _scan(argv: tuple[str, ...], flags: tuple[str, ...], syntax: OptionSyntax,
          many: bool) -> list[Found]:
    """Every occurrence, the misspelled ones with ``why`` set; before a ``--``."""
    found: list[Found] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            break
        name, eq, inline = word.partition("=")
        why = ""
        dotted = False
        if name.startswith("--"):
            if "." in name and syntax.dotted:
                dotted = True
                name = name.split(".", 1)[0]
                why = (f"vLLM reads {word.partition('=')[0]} as a JSON field of {{flag}}; "
                       "unitgen does not take {flag} that way")
            if "_" in name:
                if not syntax.underscores and not why:
                    why = ("this server does not read '_' as '-' in option names, so it would "
                           "refuse to start with this word in its unit file")
                name = name.replace("_", "-")
        match = next((f for f in flags if _name_match(name, f, syntax)), None)
        if match is None and syntax.attached_short and not eq:
            # argparse: -p9000 is -p 9000 for a one-letter option
            match = next((f for f in flags if len(f) == 2 and f[0] == "-" != f[1]
                          and word.startswith(f) and len(word) > 2), None)
            if match is not None:
                found.append(Found(match, word, word[2:], i, 1))
                i += 1
                continue
        if match is None:
            i += 1
            continue
        why = why.format(flag=match)
        if eq:
            found.append(Found(match, word, inline, i, 1, why=why))
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        # vLLM takes the word after a dotted option as its value, whatever it is
        takes_any = syntax.value_always_next or dotted
        if nxt is None or (not takes_any and _looks_like_option(nxt)):
            found.append(Found(match, word, None, i, 1, why=why))
            i += 1
            continue
        more: list[str] = []
        if many:
            while i + 2 + len(more) < len(argv) and not _looks_like_option(argv[i + 2 + len(more)]):
                more.append(argv[i + 2 + len(more)])
        found.append(Found(match, word, nxt, i, 2 + len(more), tuple(more), why))
        i += 2 + len(more)
    return found


def _looks_like_option(word: str) -> bool:
    """argparse: a word starting with '-' is the next option, unless a number."""
    return word.startswith("-") and not _is_number(word)


def find_options(argv: tuple[str, ...], flags: tuple[str, ...], syntax: OptionSyntax, *,
                 many: bool = False) -> list[Found]:
    """Every occurrence of any of ``flags`` in ``argv`` that the server reads as
    that option, before a ``--`` terminator. ``many``: the option takes every
    following word that is not an option (argparse ``nargs="+"``)."""
    return [f for f in _scan(argv, flags, syntax, many) if not f.why]


def find_misspelled(argv: tuple[str, ...], flags: tuple[str, ...],
                    syntax: OptionSyntax) -> list[Found]:
    """Words that name one of ``flags`` only under a rule this server does not
    follow, or in a form unitgen does not take; ``why`` says which."""
    return [f for f in _scan(argv, flags, syntax, False) if f.why]


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def remove_found(argv: tuple[str, ...], found: list[Found]) -> tuple[str, ...]:
    """argv without the words of the given occurrences."""
    drop: set[int] = set()
    for f in found:
        drop.update(range(f.start, f.start + f.length))
    return tuple(w for i, w in enumerate(argv) if i not in drop)
