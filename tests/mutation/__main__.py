"""Mutation testing of the core modules with mutmut: ``tests/mutation/run.sh``.

Each mutant (one small change to one function: ``<`` for ``<=``, a string
changed, a call argument dropped...) is run against the fast offline tests; a
mutant no test notices "survives" and points at a behaviour nothing checks.
The run happens in a copy of the checkout so the work tree never holds mutated
code or mutmut's files. See docs/testing.md for the scores and the survivors
that are left on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The modules the issue names as the core: port rules, argv scanning, escaping,
# the probe, rendering, deploy, port allocation and GPU placement.
CORE = (
    "unitgen/spec/ports.py",
    "unitgen/spec/argscan.py",
    "unitgen/targets/systemd/escape.py",
    "unitgen/inunit/probe.py",
    "unitgen/targets/systemd/render.py",
    "unitgen/ops/deploy.py",
    "unitgen/ops/allocate.py",
    "unitgen/plan/gpus.py",
    "unitgen/inunit/nvml.py",
)

# Fast tests that need no systemd manager, no network beyond loopback and no
# build: each mutant runs only those of them that call the mutated function.
FAST_TESTS = (
    "tests/offline/test_escape.py",
    "tests/offline/test_ports.py",
    "tests/offline/test_probe.py",
    "tests/offline/test_spec.py",
    "tests/offline/test_golden.py",
    "tests/offline/test_gpus.py",
    "tests/offline/test_cli.py",
    "tests/offline/test_allocate.py",
    "tests/offline/test_port_messages.py",
    "tests/offline/test_argscan.py",
    "tests/offline/test_gpus_report.py",
)

# What the code needs next to the package at run time (templates, the stand-in
# server, docs that tests compare with the code).
ALSO_COPY = ("templates", "examples", "docs")

KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout",
          152: "timeout", 255: "timeout", 37: "caught by type check"}
STATUS = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}


def copy_checkout(dest: Path) -> None:
    """Tracked files plus uncommitted edits (what ``git ls-files`` sees)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".hypothesis", ".mypy_cache", ".ruff_cache"}
        listed = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def write_config(dest: Path, modules: list[str]) -> None:
    """mutmut reads ``[mutmut]`` from setup.cfg when pyproject.toml has no
    ``[tool.mutmut]``; the copy gets one, the checkout does not."""
    def block(items: tuple[str, ...] | list[str]) -> str:
        return "".join(f"\n    {i}" for i in items)

    tests = [t for t in FAST_TESTS if (dest / t).is_file()]

    (dest / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths = unitgen\n"
        f"only_mutate ={block(modules)}\n"
        f"also_copy ={block(ALSO_COPY)}\n"
        f"pytest_add_cli_args_test_selection ={block(tests)}\n"
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -m\n    not systemd\n",
        encoding="utf-8")


def tally(work: Path, modules: list[str]) -> dict[str, Counter[str]]:
    """Outcome counts per module, from mutmut's .meta files."""
    out: dict[str, Counter[str]] = {}
    for module in modules:
        meta = work / "mutants" / (module + ".meta")
        counts: Counter[str] = Counter()
        if meta.exists():
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            for code in codes.values():
                counts["killed" if code in KILLED else STATUS.get(code, "suspicious")] += 1
        out[module] = counts
    return out


def survivors(work: Path, modules: list[str]) -> list[str]:
    """Names of mutants that no test noticed (show one with ``mutmut show NAME``)."""
    names = []
    for module in modules:
        meta = work / "mutants" / (module + ".meta")
        if meta.exists():
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            names += [k for k, v in codes.items() if v in (0, 5, 33)]
    return names


def main(argv: list[str] | None = None) -> int:
    """Run mutmut over the chosen modules in a throwaway copy and report."""
    parser = argparse.ArgumentParser(prog="tests/mutation/run.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"paths to mutate (default: {' '.join(CORE)})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="mutants run at once (default: one per core)")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get(
        "UNITGEN_MUTATION_DIR", Path(tempfile.gettempdir()) / "unitgen-mutation")),
        help="work directory, emptied first (default: $UNITGEN_MUTATION_DIR or "
             "/tmp/unitgen-mutation)")
    parser.add_argument("--show", action="store_true", help="print the diff of every survivor")
    args = parser.parse_args(argv)
    modules = args.modules or list(CORE)
    for module in modules:
        if not (REPO / module).is_file():
            parser.error(f"{module}: no such file in {REPO}")
    work: Path = args.dir.resolve()
    if work == REPO or REPO.is_relative_to(work):
        parser.error(f"--dir {work} would empty the checkout")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy_checkout(work)
    write_config(work, modules)
    log = work / "mutmut.log"
    print(f"mutation: {len(modules)} module(s) in {work} (progress in {log})", file=sys.stderr)
    with log.open("wb") as fh:
        done = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                               str(args.jobs)], cwd=work, stdout=fh, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode != 0:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        print(f"mutation: mutmut exited {done.returncode}", file=sys.stderr)
        return 1
    print(f"{'module':42} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} "
          f"{'score':>6}")
    total: Counter[str] = Counter()
    for module, counts in tally(work, modules).items():
        total += counts
        print(_row(module, counts))
    print(_row("all", total))
    left = survivors(work, modules)
    for name in left:
        print(f"survived: {name}")
        if args.show:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work,
                                   capture_output=True, text=True, check=False)
            print(shown.stdout)
    print(f"mutation: see one with: cd {work} && {sys.executable} -m mutmut show NAME",
          file=sys.stderr)
    return 0


def _row(module: str, counts: Counter[str]) -> str:
    n = sum(counts.values())
    judged = counts["killed"] + counts["survived"] + counts["no tests"]
    score = f"{100 * counts['killed'] / judged:.0f}%" if judged else "-"
    return (f"{module:42} {n:>7} {counts['killed']:>6} {counts['survived']:>8} "
            f"{counts['no tests']:>8} {score:>6}")


if __name__ == "__main__":
    sys.exit(main())
