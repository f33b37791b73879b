"""Finding options in argv, spelling by spelling (the port rules build on it)."""

from __future__ import annotations

import pytest

from unitgen.spec.argscan import EXACT, Found, OptionSyntax, find_options, remove_found

PREFIXES = OptionSyntax(abbrev=True)

FLAGS = ("--port", "-p")


@pytest.mark.parametrize(("argv", "abbrev", "found"), [
    (("--port", "9000"), False, [Found("--port", "--port", "9000", 0, 2)]),
    (("x", "--port=9000"), False, [Found("--port", "--port=9000", "9000", 1, 1)]),
    (("--port=",), False, [Found("--port", "--port=", "", 0, 1)]),
    (("a", "--port"), False, [Found("--port", "--port", None, 1, 1)]),
    (("--port", "--dtype", "x"), False, [Found("--port", "--port", None, 0, 1)]),
    (("--port", "-x"), False, [Found("--port", "--port", None, 0, 1)]),
    # a negative number is a value, not an option
    (("--port", "-1"), False, [Found("--port", "--port", "-1", 0, 2)]),
    (("--port", "-1.5e3"), False, [Found("--port", "--port", "-1.5e3", 0, 2)]),
    (("-p", "7", "--port", "8"), False,
     [Found("-p", "-p", "7", 0, 2), Found("--port", "--port", "8", 2, 2)]),
    # nothing after a -- terminator is an option
    (("--", "--port", "1"), False, []),
    (("a", "--", "--port", "1"), True, []),
    # argparse prefixes, only where the parser allows them; any length, since
    # argparse refuses an ambiguous one (vox-box's only option starting --p is --port)
    (("--por", "1"), True, [Found("--port", "--por", "1", 0, 2)]),
    (("--po=1",), True, [Found("--port", "--po=1", "1", 0, 1)]),
    (("--por", "1"), False, []),
    (("--p", "1"), True, [Found("--port", "--p", "1", 0, 2)]),
    (("--portx", "1"), True, []),
    (("-", "1"), True, []),
    # the option's value is never read as an option itself
    (("--port", "--port"), False, [Found("--port", "--port", None, 0, 1),
                                   Found("--port", "--port", None, 1, 1)]),
])
def test_find_options(argv, abbrev, found):
    assert find_options(argv, FLAGS, PREFIXES if abbrev else EXACT) == found


def test_the_first_matching_flag_is_named():
    assert find_options(("--host", "h"), ("--host", "--ho"), PREFIXES)[0].flag == "--host"
    assert find_options(("--hos", "h"), ("--host", "--hostname"), PREFIXES)[0].flag == "--host"


@pytest.mark.parametrize(("found", "shown"), [
    (Found("--port", "--por", "9", 0, 2), "--por 9"),
    (Found("--port", "--port=9", "9", 0, 1), "--port=9"),
    (Found("--port", "--port", None, 0, 1), "--port (without a value)"),
])
def test_shown_as_written(found, shown):
    assert found.shown() == shown


def test_remove_found_drops_exactly_those_words():
    argv = ("a", "--port", "1", "b", "--port=2", "c", "--port")
    found = find_options(argv, FLAGS, EXACT)
    assert remove_found(argv, found) == ("a", "b", "c")
    assert remove_found(argv, found[1:2]) == ("a", "--port", "1", "b", "c", "--port")
    assert remove_found(argv, []) == argv
