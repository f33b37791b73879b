"""The layers stay layers (issue 7): imports point one way, the programs that
run inside units stay light, and every module's ``__all__`` is true."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "unitgen"

# A layer may import itself, the base modules and the layers listed after it.
BASE = {"unitgen", "unitgen.errors", "unitgen.result", "unitgen.timespan"}
ALLOWED = {
    "spec": {"spec"},
    "plan": {"plan", "spec"},
    "targets": {"targets", "plan", "spec"},
    "inunit": {"inunit", "plan"},  # gpuwait reads GPUs through plan.gpus (NVML only)
    "ops": {"ops", "targets", "plan", "spec", "inunit"},
}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unitgen"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("unitgen"))
    return found


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_imports_point_down_the_layers(path):
    name = _name(path)
    parts = name.split(".")
    layer = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None
    if layer not in ALLOWED:
        return  # the CLI skin and the base modules may use any layer
    for target in _imports(path):
        if target in BASE:
            continue
        tparts = target.split(".")
        if len(tparts) < 2 or tparts[1] not in ALLOWED:
            continue
        assert tparts[1] in ALLOWED[layer], f"{name} (layer {layer}) imports {target}"


@pytest.mark.parametrize("path", [p for p in _modules() if p.name != "__main__.py"], ids=_name)
def test_all_is_true(path):
    module = importlib.import_module(_name(path))
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"{_name(path)}.__all__ lists {name}, which is not there"


@pytest.mark.parametrize("program", ["unitgen.inunit.probe", "unitgen.inunit.gpuwait",
                                     "unitgen.inunit.confine", "unitgen.inunit.peer",
                                     "unitgen.inunit.watch", "unitgen.inunit.supwrap"])
def test_programs_inside_units_import_no_heavy_library(program):
    code = (f"import sys, {program}; "
            "print(sorted(m for m in ('click', 'jinja2', 'dbus_fast', 'psutil', 'pynvml') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
