"""The quoting filters against systemd itself, not a model of it.

Generated values are written with the filters into real units, loaded by a real
user manager (the sandbox), and read back two ways:

* over D-Bus (``busctl --json``): ``ExecStart`` as systemd parsed it (after
  ``%`` specifiers, before ``$`` expansion, so a literal ``$`` still reads
  ``$$`` there), ``Environment`` and ``Description``;
* by running the units: a recorder writes the bytes of its argv, environment
  and working directory, after everything systemd does.

A missing ``%%`` turns into an expanded specifier (or a refused line), a missing
``$$`` into an expanded variable: both change what comes back. Examples are
batched, several units per daemon-reload, so the whole property stays a few
seconds long.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from unitgen.ops.systemd.sandbox import Sandbox
from unitgen.plan.instance import RUNTIME_DIR
from unitgen.spec.readers import unicode_problem
from unitgen.targets.systemd.escape import (
    environment_assignment,
    exec_line,
    path_value,
    text_value,
)

pytestmark = pytest.mark.systemd

# Any character a spec takes (not NUL, lone surrogates or noncharacters: readers.py),
# with systemd's special characters drawn often; the runtime-directory token is
# unitgen's own and never user text.
CHAR = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00").filter(
    lambda c: unicode_problem(c) is None) | st.sampled_from("%$\\\"' \n\t;{}")
TEXT = st.text(CHAR, max_size=16).filter(lambda t: RUNTIME_DIR not in t)
# Short words made mostly of those characters: every batch meets %x, $x, %% and $$.
SPECIAL = st.text(st.sampled_from("%$\\\" \nantx{}"), min_size=1, max_size=8)
# A directory name: no slash, no control character (path_value refuses those),
# no blank at either end (systemd strips those: see the test at the end).
DIRNAME = st.text(st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="/")
                  .filter(lambda c: unicode_problem(c) is None)
                  | st.sampled_from("%$ \\'\""), min_size=1, max_size=12).filter(
    lambda t: t not in (".", "..") and not t.endswith("\\") and t == t.strip()
    and len(t.encode()) < 200)

CASE = st.fixed_dictionaries({
    "argv": st.lists(TEXT | SPECIAL, max_size=4),
    "env": TEXT | SPECIAL,
    "description": TEXT | SPECIAL,
    "dir": DIRNAME,
})
UNITS_PER_RELOAD = 8

RECORDER = """\
import json, os, sys
out = {"argv": [os.fsencode(a).hex() for a in sys.argv[2:]],
       "env": os.environb.get(b"ESC_VALUE", b"").hex(),
       "cwd": os.fsencode(os.getcwd()).hex()}
with open(sys.argv[1], "w") as fh:
    json.dump(out, fh)
"""


@pytest.fixture(scope="module")
def stage(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("escape")
    (directory / "recorder.py").write_text(RECORDER)
    yield directory
    _clear(sandbox)


def _clear(box: Sandbox) -> None:
    for path in box.unit_dir.glob("esc-*.service"):
        path.unlink()
    box.systemctl("reset-failed")
    box.systemctl("daemon-reload")


def _unit(stage: Path, index: int, case: dict[str, object]) -> str:
    workdir = stage / "dirs" / str(index) / str(case["dir"])
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-I", "-S", str(stage / "recorder.py"),
            str(stage / f"record-{index}.json"), *case["argv"]]  # type: ignore[misc]
    return (
        "[Unit]\n"
        f"Description={text_value(str(case['description']))}\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={exec_line(argv)}\n"
        f"Environment={environment_assignment('ESC_VALUE', str(case['env']))}\n"
        f"WorkingDirectory={path_value(str(workdir))}\n"
    )


def _busctl(box: Sandbox, *args: str) -> object:
    done = box.run("busctl", "--user", "--json=short", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _read_back(box: Sandbox, unit: str) -> dict[str, object]:
    """What systemd parsed, over D-Bus."""
    loaded = _busctl(box, "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                     "org.freedesktop.systemd1.Manager", "LoadUnit", "s", unit)
    path = loaded["data"][0]  # type: ignore[index]
    out: dict[str, object] = {}
    for interface, prop in (("Unit", "LoadState"), ("Unit", "Description"),
                            ("Service", "ExecStart"), ("Service", "Environment"),
                            ("Service", "WorkingDirectory")):
        got = _busctl(box, "get-property", "org.freedesktop.systemd1", path,
                      f"org.freedesktop.systemd1.{interface}", prop)
        out[prop] = got["data"]  # type: ignore[index]
    return out


def _described(text: str) -> str:
    """What a one-line Description= of ``text`` should read: control characters
    become spaces; no leading or trailing blanks, no trailing backslash."""
    # NEL and the Unicode line/paragraph separators too: other readers (Python's
    # splitlines) take them as line breaks
    flat = "".join(" " if ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\x85\u2028\u2029" else ch
                   for ch in text)
    return flat.strip().rstrip("\\ ")


# No shrinking: one example is a batch of units, and a failing batch names its case.
@settings(max_examples=6, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(cases=st.lists(CASE, min_size=UNITS_PER_RELOAD, max_size=UNITS_PER_RELOAD))
def test_systemd_reads_back_exactly_what_was_escaped(sandbox, stage, cases):
    _clear(sandbox)
    shutil.rmtree(stage / "dirs", ignore_errors=True)
    for old in stage.glob("record-*.json"):
        old.unlink()
    units = [f"esc-{i}.service" for i in range(len(cases))]
    for i, case in enumerate(cases):
        (sandbox.unit_dir / units[i]).write_text(_unit(stage, i, case))
    sandbox.systemctl("daemon-reload", check=True)

    for i, case in enumerate(cases):
        got = _read_back(sandbox, units[i])
        assert got["LoadState"] == "loaded", (case, got, sandbox.journal(lines=5))
        exec_start: list[list[Any]] = got["ExecStart"]  # type: ignore[assignment]
        assert len(exec_start) == 1, got
        # the D-Bus argv is before $ expansion: a literal $ is still written $$ there
        assert exec_start[0][1][5:] == [w.replace("$", "$$") for w in case["argv"]], case
        assert got["Environment"] == [f"ESC_VALUE={case['env']}"], case
        # (systemd shows the unit's name for an empty description)
        assert got["Description"] == (_described(case["description"]) or units[i]), case
        assert got["WorkingDirectory"] == str(stage / "dirs" / str(i) / case["dir"]), case

    done = sandbox.systemctl("start", *units, timeout=60)
    assert done.returncode == 0, done.stderr + sandbox.journal(lines=20)
    for i, case in enumerate(cases):
        record = json.loads((stage / f"record-{i}.json").read_text())
        # what the process received, after everything systemd does
        assert [bytes.fromhex(a) for a in record["argv"]] == [w.encode() for w in case["argv"]]
        assert bytes.fromhex(record["env"]) == case["env"].encode()
        assert bytes.fromhex(record["cwd"]) == os.fsencode(stage / "dirs" / str(i) / case["dir"])


def test_a_path_systemd_would_change_is_refused(sandbox, stage):
    workdir = stage / "trailing "
    workdir.mkdir(exist_ok=True)
    try:
        value = path_value(str(workdir))
    except ValueError:
        return  # refused before it reaches a unit: what should happen
    _clear(sandbox)
    unit = sandbox.unit_dir / "esc-path.service"
    unit.write_text(f"[Service]\nExecStart=/bin/true\nWorkingDirectory={value}\n")
    sandbox.systemctl("daemon-reload", check=True)
    got = _read_back(sandbox, "esc-path.service")
    unit.unlink()
    sandbox.systemctl("daemon-reload")
    assert got["WorkingDirectory"] == str(workdir)
