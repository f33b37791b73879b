"""Finding options in an argv in every spelling a server's parser accepts.

``--port 9000``, ``--port=9000``, a bare trailing ``--port``, and for Python
argparse servers an unambiguous prefix such as ``--por 9000``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Found", "find_options", "remove_found"]


@dataclass(frozen=True)
class Found:
    """One occurrence of an option: how it was spelled and its value (None: missing)."""

    flag: str  # the canonical option, e.g. --port
    spelled: str  # as written, e.g. --por or --port=9000
    value: str | None
    start: int  # index of the option word in argv
    length: int  # 1 for --port=9000 and a bare trailing flag, 2 for --port 9000

    def shown(self) -> str:
        """The occurrence as a user wrote it, for messages."""
        if self.length == 2:
            return f"{self.spelled} {self.value}"
        if self.value is not None:
            return self.spelled
        return f"{self.spelled} (without a value)"


def _matches(word: str, flag: str, abbrev: bool) -> bool:
    if word == flag:
        return True
    # argparse accepts any unambiguous prefix of a long option; from four
    # characters (--po) it can only mean the one option or be an error anyway.
    return abbrev and flag.startswith("--") and len(word) >= 4 and flag.startswith(word)


def find_options(argv: tuple[str, ...], flags: tuple[str, ...], *, abbrev: bool) -> list[Found]:
    """Every occurrence of any of ``flags`` in ``argv``, before a ``--`` terminator."""
    found: list[Found] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            break
        name, eq, inline = word.partition("=")
        match = next((f for f in flags if _matches(name, f, abbrev)), None)
        if match is None:
            i += 1
            continue
        if eq:
            found.append(Found(match, word, inline, i, 1))
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if nxt is None or (nxt.startswith("-") and not _is_number(nxt)):
            found.append(Found(match, word, None, i, 1))
            i += 1
            continue
        found.append(Found(match, word, nxt, i, 2))
        i += 2
    return found


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
