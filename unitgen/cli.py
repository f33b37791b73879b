"""The ``unitgen`` command: a thin skin that parses options, calls the core and
prints the result. Exceptions become exit codes here, and only here."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from unitgen import __version__
from unitgen.errors import EXIT_FAILURE, EXIT_USAGE, SpecError, UnitgenError, printable
from unitgen.result import Result, to_json, to_text

if TYPE_CHECKING:
    from unitgen.ops.interface import TargetOps
    from unitgen.ops.registry import Option

__all__ = ["cli", "main"]

SPEC = click.Path(path_type=Path, dir_okay=False)


def emit(result: Result, *, as_json: bool) -> int:
    """Print a result as JSON or text; return its exit code."""
    if as_json:
        click.echo(to_json(result))
    else:
        for problem in result.problems:
            click.echo(f"error: {problem}", err=True)
        for warning in result.warnings:
            click.echo(f"notice: {warning}", err=True)
        text = to_text(result)
        if text:
            click.echo(text)
    return result.exit_code


EPILOG = """\b
Examples:
  unitgen check examples/*.toml
  unitgen deploy --user examples/demo.toml
  unitgen status --json

\b
Exit codes (every verb):
  0  done, or nothing to do (e.g. remove of an instance that is not installed)
  1  the operation failed (a unit did not start, the manager refused, I/O error)
  2  bad input: spec problems, busy or overlapping ports, bad options; nothing changed
  3  cannot check here: GPU placement needs NVML (use --gpus-from); nothing changed
"""


def _registry() -> tuple[tuple[str, ...], str]:
    from unitgen.ops.registry import DEFAULT, names  # noqa: PLC0415 - keeps `unitgen probe` light

    return names(), DEFAULT


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 110, "terminal_width": 110}, epilog=EPILOG,
             help=f"Model servers under a process manager ({', '.join(_registry()[0])}) that "
                  "owns their public port.")
@click.version_option(__version__, prog_name="unitgen")
def cli() -> None:
    """The ``unitgen`` command (its help comes from the registry)."""


GPUS_FROM = click.option(
    "--gpus-from", type=click.Path(path_type=Path, dir_okay=False),
    help="Place GPUs as on the host whose `unitgen gpus --json` output is in this file.")
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@dataclass(frozen=True)
class Chosen:
    """The target ``--target`` names and the settings its options gave (the
    fields of :class:`~unitgen.ops.interface.Where`)."""

    target: str
    settings: dict[str, Any]

    def ops(self, *, gpus_from: Path | None = None) -> TargetOps:
        """The one dispatch: the target's operations for the manager the options name."""
        from unitgen.ops.interface import Where  # noqa: PLC0415
        from unitgen.ops.registry import target  # noqa: PLC0415

        return target(self.target, Where(**self.settings, gpus_from=gpus_from))


def _click_option(option: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    from unitgen.ops.registry import OptionKind  # noqa: PLC0415

    kinds: dict[OptionKind, dict[str, Any]] = {
        OptionKind.FLAG: {"is_flag": True},
        OptionKind.TEXT: {},
        OptionKind.DIRECTORY: {"type": click.Path(path_type=Path, file_okay=False)},
    }
    return click.option(option.flag, option.field, envvar=option.envvar, help=option.help,
                        **kinds[option.kind])


def _target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--target (the registry's names) and every target's own options, written
    once here for every verb; the command gets them as one :class:`Chosen`."""
    from unitgen.ops.registry import options  # noqa: PLC0415

    declared = [option for _, option in options()]

    @functools.wraps(func)
    def verb(*args: object, target: str, **kwargs: object) -> object:
        settings: dict[str, Any] = {option.field: kwargs.pop(option.field) for option in declared}
        return func(*args, chosen=Chosen(target, settings), **kwargs)

    command: Callable[..., Any] = verb
    for option in reversed(declared):
        command = _click_option(option)(command)
    names, default = _registry()
    return click.option("--target", "target", type=click.Choice(names), default=default,
                        envvar="UNITGEN_TARGET", show_default=True,
                        help="Service manager (env UNITGEN_TARGET).")(command)


@cli.command(epilog="Example: unitgen check examples/*.toml --gpus-from gpu-host.json")
@click.argument("specs", nargs=-1, required=True, type=SPEC)
@GPUS_FROM
@JSON
@_target_options
@click.option("--no-verify", is_flag=True,
              help="Skip the manager's own verifier of the rendered files, where it has one "
                   "(it costs ~2 ms a file).")
def check(specs: tuple[Path, ...], gpus_from: Path | None, as_json: bool, no_verify: bool,
          chosen: Chosen) -> int:
    """Validate specs and explain every problem of every file; write nothing."""
    ops = chosen.ops(gpus_from=gpus_from)
    return emit(ops.check(list(specs), verify=not no_verify), as_json=as_json)


@cli.command(epilog="Example: unitgen render examples/demo.toml --out /tmp/units\n\n"
                    "On stdout each file follows a line '----- unitgen: NAME -----'.")
@click.argument("spec", type=SPEC)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Write the files into this directory (created if missing) instead of "
                   "printing them.")
@GPUS_FROM
@JSON
@_target_options
def render(spec: Path, out: Path | None, gpus_from: Path | None, as_json: bool,
           chosen: Chosen) -> int:
    """Print (or write with --out) the units of one spec."""
    return emit(chosen.ops(gpus_from=gpus_from).render(spec, out), as_json=as_json)


@cli.command(epilog="Example: unitgen schema > unitgen.schema.json (see docs/spec.md, Editors)")
@click.option("--markdown", is_flag=True, help="The reference table of docs/spec.md instead.")
def schema(markdown: bool) -> int:
    """Print the JSON Schema of spec files, for editors that validate TOML."""
    import json  # noqa: PLC0415

    from unitgen.spec.reference import json_schema, markdown_table  # noqa: PLC0415

    click.echo(markdown_table().rstrip("\n") if markdown else json.dumps(json_schema(), indent=2))
    return 0


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=SPEC)
@click.option("--dry-run", is_flag=True, help="Show what would change; write and start nothing.")
@click.option("--diff", is_flag=True, help="Show unit file diffs.")
@click.option("--no-wait", is_flag=True, help="Queue the starts; do not wait for readiness.")
@click.option("--port-range", envvar="UNITGEN_PORT_RANGE", default="31000-31999", show_default=True,
              help="Where ports for specs without one come from (env UNITGEN_PORT_RANGE).")
@JSON
@_target_options
def deploy(specs: tuple[Path, ...], dry_run: bool, diff: bool, no_wait: bool, port_range: str,
           as_json: bool, chosen: Chosen) -> int:
    """Install or update instances and wait until they answer."""
    from unitgen.ops.interface import DeployOptions  # noqa: PLC0415

    lo, _, hi = port_range.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 65535):
        raise click.BadParameter(f"{port_range!r} is not LOW-HIGH, e.g. 31000-31999",
                                 param_hint="--port-range")
    opts = DeployOptions(dry_run=dry_run, diff=diff, wait=not no_wait,
                         tty=sys.stderr.isatty() and not as_json, port_range=(int(lo), int(hi)),
                         show=None if (as_json or dry_run) else click.echo)
    return emit(chosen.ops().deploy(list(specs), opts), as_json=as_json)


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--keys", is_flag=True,
              help="With each gateway: its counters per API key name (requests, refused, in "
                   "flight, bytes, tokens) since its last reload.")
@JSON
@_target_options
def status(names: tuple[str, ...], keys: bool, as_json: bool, chosen: Chosen) -> int:
    """State, address, PID, uptime and memory of instances (all by default)."""
    detail = frozenset({"keys"}) if keys else frozenset()
    return emit(chosen.ops().status(list(names), detail), as_json=as_json)


@cli.command(name="ls")
@JSON
@_target_options
def ls_(as_json: bool, chosen: Chosen) -> int:
    """List installed instances (from the unit files)."""
    return emit(chosen.ops().ls(), as_json=as_json)


@cli.command()
@click.argument("names", nargs=-1, required=True)
@JSON
@_target_options
def remove(names: tuple[str, ...], as_json: bool, chosen: Chosen) -> int:
    """Stop, disable and delete an instance's generated files (nothing else)."""
    return emit(chosen.ops().remove(list(names)), as_json=as_json)


@cli.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=100, show_default=True, help="How many lines.")
@_target_options
def logs(name: str, follow: bool, lines: int, chosen: Chosen) -> int:
    """An instance's whole story, in time order: what its manager recorded of it.

    Its units' journal with the manager's own messages, or its programs' log files."""
    return chosen.ops().logs(name, lines=lines, follow=follow)


@cli.command()
@click.argument("name", required=False)
@click.option("--unit", help="Diagnose a unit unitgen did not write (with --port).")
@click.option("--port", type=int, help="The port that unit's health check probes.")
@click.option("--path", default="/health", show_default=True, help="Its health path.")
@JSON
@_target_options
def doctor(name: str | None, unit: str | None, port: int | None, path: str, as_json: bool,
           chosen: Chosen) -> int:
    """Find port mismatches (GPUStack #2154) and say how to fix them."""
    ops = chosen.ops()
    if unit:
        if port is None:
            raise click.UsageError("--unit needs --port (the port its health check probes)")
        return emit(ops.doctor_unit(unit, port, path), as_json=as_json)
    if not name:
        raise click.UsageError("give an instance NAME, or --unit UNIT --port PORT")
    return emit(ops.doctor(name), as_json=as_json)


@cli.command()
@JSON
@_target_options
def gpus(as_json: bool, chosen: Chosen) -> int:
    """GPUs, their memory, processes and instances, and each GPU pool's members."""
    return emit(chosen.ops().gpus(), as_json=as_json)


def _add_target_commands() -> None:
    """The commands targets add to ``unitgen`` (their plugins name them)."""
    from unitgen.ops.registry import commands, load  # noqa: PLC0415

    for path in commands():
        command = load(path)
        if not isinstance(command, click.Command):
            raise TypeError(f"{path} is not a click command")
        cli.add_command(command)


_add_target_commands()


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def probe(args: tuple[str, ...]) -> int:
    """Readiness probe (what units run as ExecStartPost=); --help for options."""
    from unitgen.inunit.probe import main as probe_main  # noqa: PLC0415

    return probe_main(list(args))


def _json_failure(problems: list[dict[str, str]]) -> None:
    click.echo(json.dumps({"ok": False, "problems": problems}, indent=2, sort_keys=True))


def _handle_errors(func: Callable[[], Any], *, as_json: bool = False) -> int:
    """The one place where exceptions become exit codes and messages. With
    ``--json``, a failure also prints ``{"ok": false, "problems": [...]}`` on
    stdout, with the same exit code."""
    try:
        rc = func()
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        if as_json:
            _json_failure([{"file": p.file, "key": p.key, "message": p.message, "code": p.code}
                           for p in exc.problems])
        return exc.exit_code
    except UnitgenError as exc:
        text = "\n".join(printable(line) for line in exc.message.split("\n"))
        click.echo(f"error: {text}", err=True)
        if as_json:
            _json_failure([{"file": "", "key": "", "message": exc.message, "code": ""}])
        return exc.exit_code
    except OSError as exc:
        # A last resort: every expected I/O failure is already a UnitgenError.
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        if as_json:
            _json_failure([{"file": str(exc.filename or ""), "key": "",
                            "message": str(exc.strerror or exc), "code": ""}])
        return EXIT_FAILURE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        if as_json:
            _json_failure([{"file": "", "key": "", "message": exc.format_message(), "code": ""}])
        return EXIT_USAGE
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    words = sys.argv[1:] if argv is None else argv
    as_json = "--json" in words[: words.index("--")] if "--" in words else "--json" in words
    sys.exit(_handle_errors(lambda: cli.main(args=argv, standalone_mode=False), as_json=as_json))
