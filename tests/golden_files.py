"""Golden files: every spec in examples/ rendered with a fixed context.

Regenerate on purpose with ``python -m tests.golden_files``; the test compares
byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers import GOLDEN_CTX
from unitgen.core import render_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"


def example_specs() -> list[Path]:
    """All example specs."""
    return sorted(EXAMPLES.glob("*.toml"))


def rendered(spec: Path) -> dict[str, str]:
    """File name -> text for one example, rendered with the golden context."""
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
