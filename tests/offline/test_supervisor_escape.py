"""supervisord's config quoting: every value either comes back byte-exact from
supervisor's own parser or is refused with a reason (never changed); the env
file carries every value a spec accepts, read back by the wrapper's own reader."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.supervisor_readback import read_back
from unitgen.inunit import envfile as supwrap
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
# What a spec accepts in env: any text but NUL (and lone surrogates), line breaks included
ENV_VALUE = st.lists(TRICKY | TEXT | st.sampled_from(["\n", "\r", "\r\n", "\\n", "\\\\r", "\\"]),
                     max_size=5).map("".join)


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


def _env_file(tmp: Path, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Write an env file as the renderer does and read it the way the wrapper does."""
    path = tmp / "x.env"
    lines = ["# a comment", escape.ENV_FILE_FORMAT, *(escape.env_file_line(k, v) for k, v in pairs)]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    os.chmod(path, 0o600)
    return supwrap.read_env_file(str(path))


@settings(max_examples=300, deadline=None)
@given(st.lists(ENV_VALUE, min_size=1, max_size=4))
def test_env_file_values_round_trip_byte_exact(tmp_path_factory, values):
    pairs = [(f"V{i}", v) for i, v in enumerate(values)]
    assert _env_file(tmp_path_factory.mktemp("env"), pairs) == dict(pairs)


def test_env_file_carries_what_environment_cannot(tmp_path):
    values = {"A": "#hash", "B": "a ;b", "C": "%(here)s", "D": 'p"q', "E": '"q"', "F": "x=y",
              "G": "l1\nl2\r", "H": "\\n is not a newline\\", "I": "  ", "J": "ünï 漢字"}
    assert _env_file(tmp_path, list(values.items())) == values
    # ... some of which supervisord's own environment= cuts, expands or unquotes
    for key in "BCE":
        line = f'environment={key}="{values[key]}"\n'
        try:
            [prog] = read_back(_program(extra=line))
        except ValueError:
            continue  # or refuses
        assert prog.environment.get(key) != values[key]


def test_the_two_copies_of_the_format_agree():
    # the writer (targets) and the reader (in-unit code, which imports nothing heavy)
    assert escape.ENV_FILE_FORMAT == supwrap.ENV_FILE_FORMAT
    assert escape.ENV_SECRETS_LINE == supwrap.ENV_SECRETS_LINE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "AB", "A_1"]), ENV_VALUE), max_size=4))
def test_the_two_digests_agree_and_tell_values_apart(pairs):
    assert escape.env_digest(pairs) == supwrap.env_digest(pairs)
    if pairs:
        moved = [(pairs[0][0], pairs[0][1] + "x"), *pairs[1:]]
        assert escape.env_digest(moved) != escape.env_digest(pairs)


def test_an_older_secret_file_is_read_as_written():
    # before the format line: raw one-line values, a backslash is a backslash
    assert supwrap.parse_env_text("K=a\\nb\n") == {"K": "a\\nb"}
    assert supwrap.parse_env_text(f"{escape.ENV_FILE_FORMAT}\nK=a\\nb\n") == {"K": "a\nb"}


@pytest.mark.parametrize(("name", "value"), [("1X", "v"), ("A=B", "v"), ("A\nB", "v"), ("", "v"),
                                             ("A", "nul\x00")])
def test_env_file_refuses_what_no_line_can_be(name, value):
    with pytest.raises(escape.UnrepresentableError):
        escape.env_file_line(name, value)


@settings(max_examples=300, deadline=None)
@given(ENV_VALUE)
def test_shown_values_stay_on_their_comment_line(value):
    shown = escape.shown_value(value)
    assert len(shown.splitlines()) == 1 and "\r" not in shown
    assert ast.literal_eval(shown) == value  # and say exactly what the value is
    [prog] = read_back(f"# {shown}\n" + _program())
    assert prog.argv == ["/bin/true"]


@pytest.mark.parametrize("text", ["a\nb", "a\rb", "a\x85b", "a\u2028b", "a\x0bb", "tab\t"])
def test_comment_text_refuses_what_could_end_its_line(text):
    with pytest.raises(escape.UnrepresentableError):
        escape.comment_text(text)


@pytest.mark.parametrize("word", ["a b", "x;y", "#", "%(here)s", "", "a\nb", '"q"', True])
def test_plain_words_refuse_anything_but_a_word(word):
    with pytest.raises(escape.UnrepresentableError):
        escape.word_value(word)


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


def test_percent_is_doubled_and_expansion_does_not_happen():
    assert escape.command_word("%(ENV_HOME)s") == '"%%""(ENV_HOME)s"'
    [prog] = read_back(_program(escape.command_line(["/bin/true", "%(ENV_HOME)s", "100%"]),
                                "directory=" + escape.plain_value("/srv/100%") + "\n"))
    assert prog.argv[1:] == ["%(ENV_HOME)s", "100%"]
    assert prog.directory == "/srv/100%"
