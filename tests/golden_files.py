"""Golden files: every spec in examples/ rendered with a fixed context.

Regenerate on purpose with ``python -m tests.golden_files``; the test compares
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
from unitgen.ops.systemd.specs import render_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"


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


def regenerate() -> None:
    """Rewrite tests/golden from the current renderer."""
    shutil.rmtree(GOLDEN, ignore_errors=True)
    for spec in example_specs():
        out = GOLDEN / spec.stem
        out.mkdir(parents=True)
        for name, text in rendered(spec).items():
            (out / name).write_text(text, encoding="utf-8")
            print(f"wrote {out / name}")


if __name__ == "__main__":
    regenerate()
