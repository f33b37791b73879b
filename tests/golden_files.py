"""Golden files: every spec in examples/ rendered with a fixed context, for
each target: systemd units in ``tests/golden/<example>/``, supervisord conf
and env files in ``tests/golden/supervisor/<example>/`` (or, for a spec the
supervisor target refuses, ``refused.txt`` with its problems, one a line).

Regenerate on purpose with ``python -m tests.golden_files``; the tests compare
byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import GOLDEN_CTX
from tests.nvml import FAKE_DIR, eight_gpus, write_scenario
from unitgen.errors import SpecError
from unitgen.ops.pipeline import CheckAllocator, plan_paths
from unitgen.ops.systemd.specs import render_spec
from unitgen.spec.ports import PRIVATE_PORT_RANGE
from unitgen.targets.supervisor.render import SupervisorContext, SupervisorTarget

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
SUPERVISOR_GOLDEN = GOLDEN / "supervisor"
SUPERVISOR_CTX = SupervisorContext(
    python="/usr/bin/python3", proxyd="/usr/lib/systemd/systemd-socket-proxyd",
    run_dir="/run/unitgen", log_dir="/var/log/unitgen", secrets_dir="/etc/unitgen/secrets")
REFUSED = "refused.txt"


def example_specs() -> list[Path]:
    """All example specs."""
    return sorted(EXAMPLES.glob("*.toml"))


@contextlib.contextmanager
def eight_fake_gpus() -> Iterator[None]:
    """Render GPU examples against the fake NVML's 8-GPU host (no GPU here)."""
    saved_env = os.environ.get("FAKE_NVML_SCENARIO")
    saved_mod = sys.modules.pop("pynvml", None)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FAKE_NVML_SCENARIO"] = str(write_scenario(Path(tmp) / "s.json", eight_gpus()))
        sys.path.insert(0, str(FAKE_DIR))
        try:
            yield
        finally:
            sys.path.remove(str(FAKE_DIR))
            sys.modules.pop("pynvml", None)
            if saved_mod is not None:
                sys.modules["pynvml"] = saved_mod
            if saved_env is None:
                os.environ.pop("FAKE_NVML_SCENARIO", None)
            else:
                os.environ["FAKE_NVML_SCENARIO"] = saved_env


def rendered(spec: Path) -> dict[str, str]:
    """File name -> text for one example, rendered with the golden context."""
    with eight_fake_gpus():
        files = render_spec(spec.relative_to(ROOT), GOLDEN_CTX).files
    # {spec_dir} expands to this checkout's path; golden files must not depend on it.
    return {f.name: f.text.replace(str(ROOT), "/src/unitgen") for f in files}


def rendered_supervisor(spec: Path) -> dict[str, str]:
    """File name -> text for one example with the supervisor target (as
    ``unitgen render --target supervisor`` plans it), or {REFUSED: its problems}."""
    alloc = CheckAllocator(None, private_range=PRIVATE_PORT_RANGE)
    with eight_fake_gpus():
        try:
            [planned] = plan_paths([spec.relative_to(ROOT)], SupervisorTarget(SUPERVISOR_CTX),
                                   alloc, unplaceable=alloc.unplaceable)
        except SpecError as exc:
            return {REFUSED: "".join(f"{p}\n" for p in exc.problems)}
    return {f.name: f.text.replace(str(ROOT), "/src/unitgen") for f in planned.files}


def _write(out: Path, files: dict[str, str]) -> None:
    out.mkdir(parents=True)
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8", newline="")
        print(f"wrote {out / name}")


def regenerate() -> None:
    """Rewrite tests/golden from the current renderers."""
    for old in GOLDEN.iterdir() if GOLDEN.is_dir() else ():
        shutil.rmtree(old)
    for spec in example_specs():
        _write(GOLDEN / spec.stem, rendered(spec))
        _write(SUPERVISOR_GOLDEN / spec.stem, rendered_supervisor(spec))


if __name__ == "__main__":
    regenerate()
