"""Quoting filters: round trips through a model of systemd's unquoting, and no
value can ever produce a second line. The live proof (bytes recorded by a
stand-in server under a real manager) is in test_quoting_live.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unitgen.plan.instance import RUNTIME_DIR
from unitgen.targets.systemd.escape import (
    env_file_line,
    environment_assignment,
    exec_line,
    exec_word,
    path_value,
    text_value,
)

# Any character, with the ones systemd treats specially drawn often enough that
# every run meets them.
TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")
               | st.sampled_from("%$\\\" \n\t;'"))

_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


def systemd_words(line: str, *, dollar: bool) -> list[str]:
    """A model of how systemd reads our output: %% -> %, quoted words with C
    escapes, $$ -> $ (Exec lines). Only the forms exec_word emits; a lone % (or
    $ on Exec lines) fails, as systemd would expand it. What systemd itself
    parses is checked in test_escape_systemd.py."""
    words, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        if line[i] == '"':
            i += 1
            buf = []
            while line[i] != '"':
                if line[i] == "\\":
                    nxt = line[i + 1]
                    if nxt == "x":
                        buf.append(chr(int(line[i + 2:i + 4], 16)))
                        i += 4
                        continue
                    buf.append(_UNESCAPE[nxt])
                    i += 2
                    continue
                if line[i] == "%" or (dollar and line[i] == "$"):
                    # systemd reads a lone %x as a specifier and a lone $x as a
                    # variable: only the doubled form is the character itself
                    assert line[i + 1:i + 2] == line[i], f"unescaped {line[i]!r} in {line!r}"
                    i += 1
                buf.append(line[i])
                i += 1
            i += 1
            word = "".join(buf)
        else:
            j = line.find(" ", i)
            j = len(line) if j < 0 else j
            word, i = line[i:j], j
            assert "%" not in word and "$" not in word and "\\" not in word
        words.append(word)
    return words


@given(st.lists(TEXT, min_size=1, max_size=5))
def test_exec_line_round_trips(words):
    line = exec_line(words)
    assert "\n" not in line and "\r" not in line
    assert systemd_words(line, dollar=True) == words


@given(TEXT)
def test_environment_round_trips(value):
    out = environment_assignment("NAME", value)
    assert "\n" not in out
    assert systemd_words(out, dollar=False) == [f"NAME={value}"]


@given(TEXT)
def test_text_value_is_one_line_without_continuation(value):
    out = text_value(value)
    assert "\n" not in out and "\r" not in out and not out.endswith("\\")
    assert out.replace("%%", "").count("%") == 0


def test_examples():
    assert exec_word("plain-word_1.2/x:y=z,+@") == "plain-word_1.2/x:y=z,+@"
    assert exec_word("") == '""'
    assert exec_word("a b") == '"a b"'
    assert exec_word("100%") == '"100%%"'
    assert exec_word("$HOME") == '"$$HOME"'
    assert exec_word('say "hi"\n') == '"say \\"hi\\"\\n"'
    assert exec_word(";") == '";"'
    assert exec_word(f"{RUNTIME_DIR}/x.sock") == '"%t/x.sock"'
    assert environment_assignment("A", "1$ %") == '"A=1$ %%"'
    assert env_file_line("K", 'a"b$c\\d`') == 'K="a\\"b\\$c\\\\d\\`"'


def test_refusals():
    with pytest.raises(ValueError, match="NUL"):
        exec_word("a\x00b")
    with pytest.raises(ValueError, match="environment variable name"):
        environment_assignment("A B", "x")
    with pytest.raises(ValueError, match="cannot be written"):
        path_value("/a\nb")
    with pytest.raises(ValueError, match="one line"):
        env_file_line("K", "a\nb")


def test_examples_at_the_edges():
    # DEL is a control character, U+0080 and above are not; a space is text
    assert exec_word("a\x7fb") == '"a\\x7fb"'
    assert exec_word("a\x80b") == '"a\x80b"'
    assert exec_word("\x1f") == '"\\x1f"'
    assert environment_assignment("lower_case9", "\x7f") == '"lower_case9=\\x7f"'
    assert text_value("a\x01b\x7fc\x80d e") == "a b c\x80d e"
    assert text_value("  50% \\ \\") == "50%%"
    assert text_value("a\\b") == "a\\b"
    assert text_value("x\\\xa0") == "x"  # no backslash left at the end once blanks go
    assert text_value("aX\\") == "aX"
    assert path_value("/srv/a b/50%/\x80") == "/srv/a b/50%%/\x80"
    assert path_value("/a\\b") == "/a\\b"
    assert env_file_line("K", "a b\x80") == 'K="a b\x80"'
    assert env_file_line("K", "X\"\\`$Y") == 'K="X\\"\\\\\\`\\$Y"'


@pytest.mark.parametrize(("call", "message"), [
    (lambda: exec_word("a\x00b"), "a command-line word cannot contain a NUL character"),
    (lambda: environment_assignment("A", "a\x00b"),
     "an environment value cannot contain a NUL character"),
    (lambda: environment_assignment("1A", "x"), "'1A' is not an environment variable name"),
    (lambda: path_value("/a\x7f"), "'/a\\x7f' cannot be written into a unit file"),
    (lambda: path_value("/a\\"), "'/a\\\\' cannot be written into a unit file"),
    (lambda: env_file_line("K", "a\x7f"), "a secret must be one line of printable characters"),
])
def test_refusals_say_exactly_why(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_a_trailing_newline_never_leaves_a_word_unquoted():
    # found by test_escape_systemd.py: re.match(...$) let "x\n" pass as a plain
    # word, so the next argv word started a new line of the unit: a directive
    line = exec_line(["/bin/srv", "x\n", "ExecStartPre=/bin/evil"])
    assert line == '/bin/srv "x\\n" ExecStartPre=/bin/evil'
    assert systemd_words(line, dollar=True) == ["/bin/srv", "x\n", "ExecStartPre=/bin/evil"]
    with pytest.raises(ValueError, match="is not an environment variable name"):
        environment_assignment("A\n", "x")
