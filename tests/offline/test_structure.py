"""The layers stay layers (issue 7): imports point one way and never in a
circle, modules and functions stay small enough to read, the programs that run
inside units stay light, and every module's ``__all__`` is true."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from unitgen.ops.registry import DEFAULT, names

PKG = Path(__file__).resolve().parents[2] / "unitgen"

# A layer may import itself, the base modules and the layers listed after it.
# inunit/ imports only itself (and the standard library, checked below), so any
# layer may use it without closing a circle: plan/ and ops/ read GPUs through
# inunit.nvml.
BASE = {"unitgen", "unitgen.errors", "unitgen.result", "unitgen.timespan"}
ALLOWED = {
    "spec": {"spec"},
    "plan": {"plan", "spec", "inunit"},
    "targets": {"targets", "plan", "spec", "inunit"},
    "inunit": {"inunit"},  # the programs units run; the GPU inventory is here (inunit.nvml)
    "ops": {"ops", "targets", "plan", "spec", "inunit"},
}


def _modules(pkg: Path = PKG) -> list[Path]:
    return sorted(p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Names a module imports from unitgen (modules and the names taken from them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unitgen"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("unitgen"))
    return found


# A feature (unitgen/features/NAME/) is a column across the layers: each of its
# modules is in the layer its file name says; the feature registry and the
# hooks' base are operations.
FEATURE_LAYERS = {"spec": "spec", "plan": "plan", "patterns": "plan", "render": "targets",
                  "files": "targets"}


def layer_of(name: str) -> str | None:
    """The layer of module ``name`` (None: the CLI skin, a base module)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] == "features":
        if len(parts) == 4:  # unitgen.features.NAME.module
            return FEATURE_LAYERS.get(parts[3], "ops")
        return "ops" if len(parts) == 3 else None  # base, registry; the package itself
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED):
        return parts[1] if parts[1] in ALLOWED else None
    return None


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_imports_point_down_the_layers(path):
    name = _name(path)
    layer = layer_of(name)
    if layer not in ALLOWED:
        return  # the CLI skin and the base modules may use any layer
    for target in _imports(path):
        if target in BASE:
            continue
        tlayer = layer_of(target) or layer_of(target.rpartition(".")[0])
        if tlayer is None:
            continue
        assert tlayer in ALLOWED[layer], f"{name} (layer {layer}) imports {target}"


def test_a_feature_module_is_in_the_layer_its_name_says():
    assert layer_of("unitgen.features.gateway.spec") == "spec"
    assert layer_of("unitgen.features.gateway.plan") == "plan"
    assert layer_of("unitgen.features.gateway.render") == "targets"
    assert layer_of("unitgen.features.gateway.ops") == "ops"
    assert layer_of("unitgen.features.registry") == "ops"
    assert layer_of("unitgen.plan.instance") == "plan"
    assert layer_of("unitgen.cli") is None


@pytest.mark.parametrize("path", [p for p in _modules() if p.name != "__main__.py"], ids=_name)
def test_all_is_true(path):
    module = importlib.import_module(_name(path))
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"{_name(path)}.__all__ lists {name}, which is not there"


@pytest.mark.parametrize("program", ["unitgen.inunit.probe", "unitgen.inunit.gpuwait",
                                     "unitgen.inunit.confine", "unitgen.inunit.peer",
                                     "unitgen.inunit.watch", "unitgen.inunit.supwrap",
                                     "unitgen.inunit.supproxy", "unitgen.inunit.envfile",
                                     "unitgen.inunit.swapproxy", "unitgen.inunit.swapforward",
                                     "unitgen.inunit.podrun", "unitgen.inunit.hareload",
                                     "unitgen.inunit.relay", "unitgen.inunit.passed",
                                     "unitgen.inunit.keycopy"])
def test_programs_inside_units_import_no_heavy_library(program):
    code = (f"import sys, {program}; "
            "print(sorted(m for m in ('click', 'jinja2', 'dbus_fast', 'psutil', 'pynvml') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def _import_statements(node: ast.AST, where: str = "") -> Iterator[
        tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement under ``node``, with the function it is in ("" at
    module level)."""
    for child in ast.iter_child_nodes(node):
        inner = where
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = f"{where}.{child.name}" if where else child.name
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, inner
        yield from _import_statements(child, inner)


def _import_edges(pkg: Path) -> dict[str, dict[str, str]]:
    """The import graph of the package at ``pkg``: module -> module it imports ->
    where (``file:line``, and the function for an import inside one). Every
    import statement counts, wherever it is: at module level, inside a function
    (a lazy import closes a circle all the same, only later), under ``if
    TYPE_CHECKING:``. ``from unitgen.a import b`` names the module ``unitgen.a.b``
    when there is one, else ``unitgen.a``."""
    names = {_name(p, pkg): p for p in _modules(pkg)}
    graph: dict[str, dict[str, str]] = {}
    for name, path in names.items():
        edges = graph[name] = {}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for stmt, where in _import_statements(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                base = stmt.module or ""
                if stmt.level:  # relative: from the module's own package up
                    up = package.split(".")[: len(package.split(".")) - stmt.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base
                           for a in stmt.names]
            at = f"{path.relative_to(pkg.parent).as_posix()}:{stmt.lineno}"
            at += f" in {where}()" if where else ""
            for target in targets:
                if target in names and target != name:
                    edges.setdefault(target, at)
    return graph


def _cycles(graph: dict[str, dict[str, str]]) -> list[str]:
    """One line per import circle found (each circle once, from its smallest
    module), naming the import statement behind every step."""
    found: dict[tuple[str, ...], str] = {}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                ring = path[path.index(target):]
                start = ring.index(min(ring))
                ring = ring[start:] + ring[:start]
                steps = [f"{a} ({graph[a][b]}) -> " for a, b in zip(ring, [*ring[1:], ring[0]],
                                                                     strict=True)]
                found.setdefault(tuple(ring), "".join(steps) + ring[0])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return sorted(found.values())


def test_no_import_cycle():
    assert _cycles(_import_edges(PKG)) == []


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    pkg = tmp_path / "unitgen"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from unitgen.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def late():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import os\n\n\ndef later():\n    import unitgen.a\n")
    (pkg / "d.py").write_text("from unitgen.a import something\n")
    assert _cycles(_import_edges(pkg)) == [
        "unitgen.a (unitgen/a.py:1) -> unitgen.sub.b (unitgen/sub/b.py:2 in late()) -> "
        "unitgen.sub.c (unitgen/sub/c.py:5 in later()) -> unitgen.a"]


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # from its def line to its last line, docstring included
# Over those limits today and being shrunk: remove an entry once it fits (the
# next test says when). Nothing is added here.
KNOWN_OVERSIZE: set[str] = set()  # none left: keep it that way


def _function_sizes(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function under ``node``, methods and
    nested functions included (``Class.method``, ``outer.inner``)."""
    for child in ast.iter_child_nodes(node):
        name = prefix
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}."
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield name[:-1], (child.end_lineno or child.lineno) - child.lineno + 1
        yield from _function_sizes(child, name)


def _oversize(pkg: Path) -> dict[str, str]:
    """Modules over MAX_MODULE_LINES (``file``) and functions over
    MAX_FUNCTION_LINES (``file:qualified.name``) -> their size."""
    out: dict[str, str] = {}
    for path in _modules(pkg):
        rel = path.relative_to(pkg.parent).as_posix()
        text = path.read_text(encoding="utf-8")
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            out[rel] = f"{lines} lines (at most {MAX_MODULE_LINES})"
        for name, size in _function_sizes(ast.parse(text)):
            if size > MAX_FUNCTION_LINES:
                out[f"{rel}:{name}"] = f"{size} lines (at most {MAX_FUNCTION_LINES})"
    return out


def test_modules_and_functions_stay_small():
    new = {k: v for k, v in _oversize(PKG).items() if k not in KNOWN_OVERSIZE}
    assert new == {}, "split these along their jobs"


def test_known_oversize_entries_are_still_needed():
    fits = sorted(KNOWN_OVERSIZE - _oversize(PKG).keys())
    assert fits == [], "these fit now: remove them from KNOWN_OVERSIZE"


def test_the_size_check_sees_a_long_method(tmp_path):
    pkg = tmp_path / "unitgen"
    pkg.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    (pkg / "m.py").write_text(f"class C:\n    def fits(self):\n{body}\n"
                              f"    def long(self):\n{body}        return 0\n")
    assert _oversize(pkg) == {"unitgen/m.py:C.long": "81 lines (at most 80)"}
    (pkg / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert _oversize(pkg)["unitgen/big.py"] == "401 lines (at most 400)"


TARGETS = names()
TARGET_FOLDERS = tuple(f"unitgen/{layer}/{t}" for t in TARGETS for layer in ("ops", "targets"))


@pytest.mark.parametrize("path", [p for p in _modules()
                                  if str(p.relative_to(PKG.parent)).startswith(TARGET_FOLDERS)],
                         ids=_name)
def test_no_target_imports_another(path):
    # issue 18: the supervisor target imported the systemd renderer and doctor;
    # what both need lives in ops/ or targets/base.py
    mine = next(t for t in TARGETS if f"/{t}" in str(path.parent))
    for target in _imports(path):
        for other in set(TARGETS) - {mine}:
            assert f".{other}" not in target.replace("unitgen.", "."), \
                f"{_name(path)} imports {target}"


# Optional parts of an interface have defaults where they are declared
# (ops.interface.TargetOps, ops.pipeline.RunAllocator, targets.base.Target), so
# nothing in ops/ or the CLI asks an object whether it has one. The rule: every
# getattr/hasattr call there is listed here, by file and function, with its
# reason; a hook is never a reason.
REFLECTION = {
    # a registry imports by name: "module:attr" strings are its own data
    ("unitgen/ops/registry.py", "load"): "import by name",
    # XML-RPC: supervisord's method names are data, the proxy makes them attributes
    ("unitgen/ops/supervisor/rpc.py", "SupervisorRPC.call"): "XML-RPC dispatch",
    ("unitgen/ops/supervisor/rpc.py", "SupervisorRPC._proxy_call"): "XML-RPC dispatch",
}


def _reflection(paths: list[Path], pkg: Path = PKG) -> dict[tuple[str, str], str]:
    """(file, qualified function) -> the first getattr/hasattr call in it."""
    found: dict[tuple[str, str], str] = {}

    def visit(node: ast.AST, rel: str, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{where}.{child.name}" if where else child.name
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Name)
                    and child.func.id in ("getattr", "hasattr")):
                found.setdefault((rel, where), f"{rel}:{child.lineno} {ast.unparse(child)}")
            visit(child, rel, inner)

    for path in paths:
        visit(ast.parse(path.read_text(encoding="utf-8")), path.relative_to(pkg.parent).as_posix(),
              "")
    return found


def _ops_and_cli(pkg: Path = PKG) -> list[Path]:
    return [p for p in _modules(pkg) if p.is_relative_to(pkg / "ops")] + [pkg / "cli.py"]


def test_no_hook_is_found_by_getattr():
    calls = _reflection(_ops_and_cli())
    unlisted = {where: call for where, call in calls.items() if where not in REFLECTION}
    assert unlisted == {}, "declare the hook with a default (see REFLECTION)"


def test_reflection_entries_are_still_needed():
    assert sorted(REFLECTION.keys() - _reflection(_ops_and_cli()).keys()) == []


def test_the_reflection_check_sees_a_hook_probe(tmp_path):
    pkg = tmp_path / "unitgen"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "ops" / "p.py").write_text("class A:\n    def f(self, x):\n"
                                      "        return hasattr(x, 'reserve')\n")
    (pkg / "cli.py").write_text("def g(x):\n    return getattr(x, 'doctor_unit', None)\n")
    assert set(_reflection(_ops_and_cli(pkg), pkg)) == {("unitgen/ops/p.py", "A.f"),
                                                        ("unitgen/cli.py", "g")}


def test_the_cli_names_no_target():
    # the CLI reaches targets through the registry: it imports none of their
    # modules and spells no target's name (help texts and defaults included)
    path = PKG / "cli.py"
    for target in _imports(path):
        for name in TARGETS:
            assert not target.startswith((f"unitgen.ops.{name}", f"unitgen.targets.{name}")), \
                target
    words = re.compile(r"\b(" + "|".join(map(re.escape, TARGETS)) + r")\b")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert not words.search(node.value), f"cli.py:{node.lineno}: {node.value!r}"


ANSIBLE = PKG.parent / "ansible"
# Between two names of one list, on one line: quotes, brackets, commas, spaces,
# a Markdown table's escaped bar, "or" (a bare bar ends a table cell).
_SEP = r"""(?:[ \t"'`,\[\]()]|\\\|)*"""
_BETWEEN = re.compile(rf"{_SEP}(?:or\b)?{_SEP}")


def _target_lists(text: str, targets: tuple[str, ...]) -> list[list[str]]:
    """Every list of target names in ``text``: names one after the other with
    nothing but list punctuation (or "or") between them."""
    found = list(re.finditer(r"\b(" + "|".join(map(re.escape, targets)) + r")\b", text))
    lists: list[list[str]] = []
    for prev, match in zip([None, *found], found, strict=False):
        if prev is not None and _BETWEEN.fullmatch(text[prev.end():match.start()]):
            lists[-1].append(match.group(1))
        else:
            lists.append([match.group(1)])
    return [names for names in lists if len(names) > 1]


def _ansible_files() -> list[Path]:
    # the collection's files; not caches tools leave there (.ruff_cache, __pycache__)
    return sorted(p for p in ANSIBLE.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__pycache__" for part in p.relative_to(ANSIBLE).parts[:-1]))


def test_every_target_list_in_ansible_is_the_registrys():
    # the collection travels to hosts without unitgen, so it spells the list
    # (argument specs must be literals): every copy must be the registry's,
    # in its order; adding a target to the registry fails here until each is
    lists = {p.relative_to(ANSIBLE).as_posix(): _target_lists(p.read_text(encoding="utf-8"),
                                                              TARGETS)
             for p in _ansible_files()}
    wrong = {f: found for f, found in lists.items() for names in found
             if tuple(names) != TARGETS}
    assert wrong == {}, f"each list must be {list(TARGETS)}"
    # the check sees the copies it is for (it is not vacuous)
    assert {f for f, found in lists.items() if found} >= {
        "plugins/module_utils/unitgen_cli.py", "plugins/modules/unitgen_instance.py",
        "plugins/modules/unitgen_status.py", "roles/unitgen/meta/argument_specs.yml",
        "roles/unitgen/defaults/main.yml", "roles/unitgen/README.md"}


def test_the_ansible_default_target_is_the_registrys():
    utils = (ANSIBLE / "plugins" / "module_utils" / "unitgen_cli.py").read_text(encoding="utf-8")
    consts = {t.id: ast.literal_eval(node.value) for node in ast.parse(utils).body
              if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert consts["TARGETS"] == TARGETS and consts["DEFAULT_TARGET"] == DEFAULT
    role = ANSIBLE / "roles" / "unitgen"
    assert re.search(rf"^unitgen_target: {DEFAULT}$",
                     (role / "defaults" / "main.yml").read_text(encoding="utf-8"), re.M)
    specs = (role / "meta" / "argument_specs.yml").read_text(encoding="utf-8")
    assert re.search(rf"unitgen_target:\n(?: +\w+: .*\n)*? +default: {DEFAULT}\n", specs)
    for module in ("unitgen_instance", "unitgen_status"):
        text = (ANSIBLE / "plugins" / "modules" / f"{module}.py").read_text(encoding="utf-8")
        assert f'"target": {{"type": "str", "choices": {list(TARGETS)!r}, "default": ' \
               f'"{DEFAULT}"}}'.replace("'", '"') in text, module
        assert re.search(rf"  target:\n(?:    .*\n)*?    default: {DEFAULT}\n", text), module


def test_the_list_finder_sees_every_spelling():
    text = ('choices: [a, b]\n"choices": ["a", "b"]\nTARGETS = ("a", "b")\n'
            "| `a` \\| `b` |\n`a` or `b`\nonly a here, and b there\n")
    assert _target_lists(text, ("a", "b")) == [["a", "b"]] * 5


# Words that name a feature or what only a feature knows (issue 26): a target's
# deploy adapter and the transaction sequence no feature's steps by name.
FEATURE_WORDS = ("gateway", "swap", "pool", "container", "podman", "haproxy", "image")
ADAPTERS = sorted([*PKG.glob("ops/*/deploy.py"), PKG / "ops" / "transaction.py"])


def _code_words(path: Path) -> list[str]:
    """Identifiers and string literals of a module, docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant)}
    words: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.alias):
            words.append(node.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            words.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            words.append(node.value)
    return words


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda p: str(p.relative_to(PKG)))
def test_no_feature_is_named_in_a_target_adapter(path):
    found = sorted({w for w in _code_words(path) for f in FEATURE_WORDS if f in w.lower()})
    assert found == [], f"{path.name} names features: {found}; use a feature's hooks"


def test_the_feature_word_check_sees_code_not_comments(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""About a gateway."""\n# a container\nx = 1\n')
    assert not any("gateway" in w or "container" in w for w in _code_words(module))
    module.write_text("from unitgen.ops.podman import pull\nself._gateways = []\n")
    assert {"unitgen.ops.podman", "_gateways"} <= set(_code_words(module))


def test_every_feature_is_a_folder_in_the_registry():
    from unitgen.features.registry import FEATURES  # noqa: PLC0415

    folders = {p.name for p in (PKG / "features").iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FEATURES)
    for where in FEATURES.values():
        module, _, attr = where.partition(":")
        assert getattr(importlib.import_module(module), attr).name in FEATURES


# --- inunit/: the standard library and itself (issue 26) ----------------------

INUNIT = PKG / "inunit"
# Base modules inunit/ may use besides itself: standard library only (checked below).
INUNIT_BASE = {"unitgen.timespan"}
# The one library outside the standard library, imported when GPUs are read and
# never at import: the NVML boundary of the GPU inventory.
LAZY_THIRD_PARTY = {("unitgen/inunit/nvml.py", "pynvml")}


def _stdlib(name: str) -> bool:
    return name.split(".", maxsplit=1)[0] in sys.stdlib_module_names or name == "__future__"


def _imported_names(path: Path) -> Iterator[tuple[str, str, int]]:
    """(module, function it is imported in or "", line) for every import in a file:
    statements anywhere (lazy ones too) and ``importlib.import_module("...")`` /
    ``__import__("...")`` calls with a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for stmt, where in _import_statements(tree):
        if isinstance(stmt, ast.Import):
            yield from ((a.name, where, stmt.lineno) for a in stmt.names)
        elif stmt.level:
            yield "unitgen.inunit", where, stmt.lineno  # relative: inside inunit/
        else:
            yield stmt.module or "", where, stmt.lineno
    functions = {n: f.name for f in ast.walk(tree)
                 if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                               "__import__")):
            yield node.args[0].value, functions.get(node, ""), node.lineno


def _inunit_import_problems(pkg: Path = PKG) -> list[str]:
    out = []
    for path in _modules(pkg / "inunit"):
        rel = path.relative_to(pkg.parent).as_posix()
        for name, where, line in _imported_names(path):
            if _stdlib(name) or name == "unitgen.inunit" or name.startswith("unitgen.inunit."):
                continue
            if name in INUNIT_BASE:
                continue
            if (rel, name) in LAZY_THIRD_PARTY and where:
                continue
            out.append(f"{rel}:{line} imports {name}" + (f" in {where}()" if where else ""))
    return out


def test_inunit_imports_only_the_standard_library_and_inunit():
    assert _inunit_import_problems() == []


def test_the_base_modules_inunit_uses_import_only_the_standard_library():
    for name in INUNIT_BASE:
        path = PKG.parent / (name.replace(".", "/") + ".py")
        assert [n for n, _, _ in _imported_names(path) if not _stdlib(n)] == [], name


def test_the_inunit_import_check_sees_every_way_in(tmp_path):
    pkg = tmp_path / "unitgen"
    (pkg / "inunit").mkdir(parents=True)
    (pkg / "inunit" / "nvml.py").write_text(
        "import importlib\n\n\ndef read():\n    return importlib.import_module('pynvml')\n")
    (pkg / "inunit" / "bad.py").write_text(
        "import os\nfrom unitgen.inunit import nvml\nfrom . import nvml as again\n"
        "import pynvml\nfrom unitgen.plan import gpus\n\n\n"
        "def later():\n    import click\n    return __import__('jinja2')\n")
    (pkg / "inunit" / "eager.py").write_text(
        "import importlib\nNV = importlib.import_module('pynvml')\n")
    assert sorted(_inunit_import_problems(pkg)) == [
        "unitgen/inunit/bad.py:10 imports jinja2 in later()",
        "unitgen/inunit/bad.py:4 imports pynvml",
        "unitgen/inunit/bad.py:5 imports unitgen.plan",
        "unitgen/inunit/bad.py:9 imports click in later()",
        "unitgen/inunit/eager.py:2 imports pynvml",
    ]


def test_the_gpu_inventory_loads_nothing_of_unitgen_outside_inunit():
    code = ("import sys, unitgen.inunit.nvml, unitgen.inunit.gpuwait; "
            "print(sorted(m for m in sys.modules if m.startswith('unitgen') "
            "and not m.startswith('unitgen.inunit') and m != 'unitgen'))")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == str(sorted(INUNIT_BASE))


# --- plan/ knows no unit names (issue 26) -------------------------------------

# A systemd unit name: a unit type after a dot ("x-backend.service", ".socket"),
# or a user's manager ("user@1000"): the naming of targets/systemd, not of a plan.
UNIT_NAME = re.compile(r"\.(service|socket|slice|scope|timer|target|mount|path)\b|\buser@")


def _unit_names_in(pkg: Path) -> list[str]:
    """``file:line: text`` of every string in ``plan/`` (code and docstrings alike)
    that names a unit, less the spec's own table names (``[systemd.service]``,
    the key a message may point a user to)."""
    from unitgen.spec.keys import TABLES  # noqa: PLC0415 - only this test needs the spec

    out = []
    for path in _modules(pkg / "plan"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            for table in TABLES.values():
                text = text.replace(table, "")
            if UNIT_NAME.search(text):
                out.append(f"{path.relative_to(pkg.parent).as_posix()}:{node.lineno}: "
                           f"{node.value.strip()[:60]}")
    return sorted(out)


def test_plan_names_no_systemd_unit():
    assert _unit_names_in(PKG) == []


def test_the_unit_name_check_sees_fstrings_and_docstrings(tmp_path):
    plan = tmp_path / "unitgen" / "plan"
    plan.mkdir(parents=True)
    (plan / "m.py").write_text(
        '"""Runs in ``NAME-backend.service``."""\n'
        "def unit(name):\n    return f'{name}-backend.service'\n"
        "OWNER = 'user@'\nTABLE = 'set it in [systemd.service]'\nPATH = 'spec.paths'\n")
    assert _unit_names_in(tmp_path / "unitgen") == [
        "unitgen/plan/m.py:1: Runs in ``NAME-backend.service``.",
        "unitgen/plan/m.py:3: -backend.service",
        "unitgen/plan/m.py:4: user@",
    ]


def _numbers(pkg: Path = PKG) -> dict[str, list[str]]:
    """Public numeric constants (``NAME = 4``) -> the modules that assign them."""
    found: dict[str, list[str]] = {}
    for path in _modules(pkg):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, int | float)):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id[:1].isupper() \
                            and target.id.isupper():
                        found.setdefault(target.id, []).append(_name(path, pkg))
    return found


def test_a_rule_s_number_is_written_once():
    """Two copies of a number (SWAP_TURNS once was) can change apart with every
    test green. Exit codes are the exception: each program run inside a unit
    states its own, so that it imports nothing it does not need."""
    twice = {k: v for k, v in _numbers().items() if len(v) > 1 and not k.startswith("EXIT_")}
    assert not twice, f"written more than once (import one copy): {twice}"
