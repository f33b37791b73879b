"""supervisord's config quoting: every value either comes back byte-exact from
supervisor's own parser or is refused with a reason (never changed)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.supervisor_readback import read_back
from unitgen.targets.supervisor import escape

# Text that stresses each rule: quotes, backslashes, % and %(...)s, ; and # after
# whitespace of every kind, shlex punctuation, non-ASCII.
TRICKY = st.sampled_from([
    "a b", '"', "'", '"q"', "'s'", "\\", "back\\slash\\", "%", "100%", "%%", "%(here)s",
    "%%(here)s", "%(ENV_HOME)s", "%(program_name)s", "x ;y", "x #y", ";", "#", "a\t;b",
    "a\x0b#b", "a\u2028;b", "a\x85#b", "$HOME", "`id`", "a,b", "K=V", "=", "ünï 漢字", "-x",
    "", " ", " lead", "trail ", "\x1c;", "\\;", "\\\"", "()", "(here)s", "%(", "%)",
])
TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
               max_size=20)
VALUE = st.lists(TRICKY | TEXT, min_size=1, max_size=4).map("".join)


def _program(command: str = '"/bin/true"', extra: str = "") -> str:
    return f"[program:p]\ncommand={command}\n{extra}"


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUE, min_size=1, max_size=5))
def test_command_words_round_trip(words):
    argv = ["/bin/true", *words]
    try:
        line = escape.command_line(argv)
    except escape.UnrepresentableError:
        assert any(ch in w for w in words for ch in "\n\r")
        return
    [prog] = read_back(_program(line))
    assert prog.argv == argv


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUE, min_size=1, max_size=4))
def test_environment_round_trips_or_is_refused(values):
    pairs = []
    refused = []
    for i, v in enumerate(values):
        try:
            pairs.append((f"V{i}", v, escape.env_value(v)))
        except escape.UnrepresentableError as exc:
            refused.append((v, str(exc)))
    for v, why in refused:
        # refused only for the documented reasons
        assert ("\n" in v or "\r" in v or v[:1] in "'\"" or v[-1:] in "'\""
                or ('"' in v and "'" in v) or "%(here)s" in v
                or any(c in ";#" and (i == 0 or v[i - 1].isspace()) for i, c in enumerate(v))), why
    if not pairs:
        return
    line = ",".join(f"{k}={q}" for k, _, q in pairs)
    [prog] = read_back(_program(extra=f"environment={line}\n"))
    assert prog.environment == {k: v for k, v, _ in pairs}


@settings(max_examples=200, deadline=None)
@given(VALUE)
def test_plain_values_round_trip(value):
    try:
        text = escape.plain_value(value)
    except escape.UnrepresentableError:
        return
    [prog] = read_back(_program(extra=f"directory={text}\n"))
    assert prog.directory == value


@pytest.mark.parametrize("word", ["%(here)s", "x%(here)sy", "%%(here)s", "a ;b", "a\t#b"])
def test_words_supervisor_would_mangle_come_back(word):
    [prog] = read_back(_program(escape.command_line(["/bin/true", word])))
    assert prog.argv[1] == word


@pytest.mark.parametrize(("value", "reason"), [
    ('"quoted"', "begin or end"), ("it's \"x\" ok", "both kinds"), ("a ;b", "comment"),
    ("%(here)s", "%(here)s"), ("two\nlines", "line break"),
])
def test_env_refusals_say_why(value, reason):
    with pytest.raises(escape.UnrepresentableError, match=re.escape(reason)):
        escape.env_value(value)


def test_percent_is_doubled_and_expansion_does_not_happen():
    assert escape.command_word("%(ENV_HOME)s") == '"%%""(ENV_HOME)s"'
    [prog] = read_back(_program(escape.command_line(["/bin/true", "%(ENV_HOME)s"]),
                                "environment=HOME_X=" + escape.env_value("100%") + "\n"))
    assert prog.argv[1] == "%(ENV_HOME)s"
    assert prog.environment == {"HOME_X": "100%"}
