"""The malformed-spec corpus (tests/corpus): each file says, in ``# expect: KEY:
FRAGMENT`` lines, the problems ``check`` must report for it. It needs no
manager (``systemd-analyze verify`` reads units offline), so it runs offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from unitgen.errors import SpecError, printable
from unitgen.ops.systemd.specs import planner, verify_rendered
from unitgen.ops.verbs import check_specs
from unitgen.targets.systemd.render import RenderContext

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
EXPECT = re.compile(r"^# expect: (?P<key>[^:]*): (?P<fragment>.*)$")


def _corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.toml"))


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.stem)
def test_malformed_spec_corpus(path):
    """Each file in tests/corpus says, in ``# expect: KEY: FRAGMENT`` lines, the
    problems `check` must report for it."""

    expected = [m.groupdict() for line in path.read_text(encoding="utf-8", errors="replace")
                .split("\n") if (m := EXPECT.match(line))]
    assert expected, f"{path.name} has no '# expect:' line"
    target, alloc = planner(RenderContext(python="/usr/bin/python3", proxyd="/bin/true"), None)
    with pytest.raises(SpecError) as info:
        check_specs([path], target, alloc, describe=str, notices=verify_rendered)
    problems = [(printable(p.key), p.message) for p in info.value.problems]
    for want in expected:
        assert any(k == want["key"] and want["fragment"] in msg for k, msg in problems), (
            f"{path.name}: expected {want['key']}: {want['fragment']!r}; got {problems}")
