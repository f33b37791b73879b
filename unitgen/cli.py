"""The ``unitgen`` command: a thin skin that parses options, calls the core and
prints the result. Exceptions become exit codes here, and only here."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from unitgen import __version__

# Everything else is imported where it is used: `unitgen --help` pays for click
# and nothing more (bench/: the --help and render rows).
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from unitgen.result import Result
    from unitgen.targets.systemd.render import RenderContext

__all__ = ["cli", "main"]


class _LazyPath(click.Path):
    """click.Path converting to pathlib.Path, without importing pathlib until used."""

    def convert(self, value: Any, param: click.Parameter | None,  # noqa: ANN401 - click's signature
                ctx: click.Context | None) -> Any:  # noqa: ANN401
        import pathlib  # noqa: PLC0415

        path = super().convert(value, param, ctx)
        return pathlib.Path(path.decode() if isinstance(path, bytes) else path)


SPEC = _LazyPath(dir_okay=False)


def emit(result: Result, *, as_json: bool) -> int:
    """Print a result as JSON or text; return its exit code."""
    from unitgen.result import to_json, to_text  # noqa: PLC0415

    if as_json:
        click.echo(to_json(result))
    else:
        for warning in result.warnings:
            click.echo(f"notice: {warning}", err=True)
        text = to_text(result)
        if text:
            click.echo(text)
    return result.exit_code


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unitgen")
def cli() -> None:
    """Model servers as systemd units whose socket owns the port."""


def _ctx(user: bool) -> RenderContext:
    from unitgen.targets.systemd.render import RenderContext as Ctx  # noqa: PLC0415 - keeps `unitgen probe` light

    return Ctx.detect(scope="user" if user else "system")


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=SPEC)
@click.option("--user", is_flag=True, help="Units for the per-user manager.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(specs: tuple[Path, ...], user: bool, as_json: bool) -> int:
    """Validate specs and explain every problem; write nothing."""
    from unitgen.ops import core  # noqa: PLC0415

    return emit(core.check(list(specs), _ctx(user)), as_json=as_json)


@cli.command()
@click.argument("spec", type=SPEC)
@click.option("--out", type=_LazyPath(file_okay=False),
              help="Write the files into this directory instead of printing them.")
@click.option("--user", is_flag=True, help="Units for the per-user manager (WantedBy=default.target).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def render(spec: Path, out: Path | None, user: bool, as_json: bool) -> int:
    """Print (or write with --out) the units of one spec."""
    from unitgen.ops import core  # noqa: PLC0415

    return emit(core.render(spec, _ctx(user), out), as_json=as_json)


USER = click.option("--user", is_flag=True,
                    help="The per-user manager (~/.config/systemd/user) instead of the system one.")
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _scope(user: bool) -> str:
    return "user" if user else "system"


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=SPEC)
@USER
@click.option("--dry-run", is_flag=True, help="Show what would change; write and start nothing.")
@click.option("--diff", is_flag=True, help="Show unit file diffs.")
@click.option("--no-wait", is_flag=True, help="Queue the starts; do not wait for readiness.")
@click.option("--port-range", envvar="UNITGEN_PORT_RANGE", default="31000-31999", show_default=True,
              help="Where ports for specs without one come from (env UNITGEN_PORT_RANGE).")
@JSON
def deploy(specs: tuple[Path, ...], user: bool, dry_run: bool, diff: bool, no_wait: bool,
           port_range: str, as_json: bool) -> int:
    """Install or update instances and wait until they answer."""
    from unitgen.ops.deploy import DeployOptions  # noqa: PLC0415
    from unitgen.ops.deploy import deploy as run  # noqa: PLC0415

    lo, _, hi = port_range.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 65535):
        raise click.BadParameter(f"{port_range!r} is not LOW-HIGH, e.g. 31000-31999",
                                 param_hint="--port-range")
    opts = DeployOptions(scope=_scope(user), ctx=_ctx(user), dry_run=dry_run, diff=diff,
                         wait=not no_wait, tty=sys.stderr.isatty() and not as_json,
                         port_range=(int(lo), int(hi)))
    return emit(run(list(specs), opts), as_json=as_json)


@cli.command()
@click.argument("names", nargs=-1)
@USER
@JSON
def status(names: tuple[str, ...], user: bool, as_json: bool) -> int:
    """State, address, PID, uptime and memory of instances (all by default)."""
    from unitgen.ops.status import status as run  # noqa: PLC0415

    return emit(run(list(names), _scope(user)), as_json=as_json)


@cli.command(name="ls")
@USER
@JSON
def ls_(user: bool, as_json: bool) -> int:
    """List installed instances (from the unit files)."""
    from unitgen.ops.status import list_instances  # noqa: PLC0415

    return emit(list_instances(_scope(user)), as_json=as_json)


@cli.command()
@click.argument("names", nargs=-1, required=True)
@USER
@JSON
def remove(names: tuple[str, ...], user: bool, as_json: bool) -> int:
    """Stop, disable and delete an instance's generated files (nothing else)."""
    from unitgen.ops.deploy import remove as run  # noqa: PLC0415

    return emit(run(list(names), _scope(user)), as_json=as_json)


@cli.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=100, show_default=True, help="How many lines.")
@USER
def logs(name: str, follow: bool, lines: int, user: bool) -> int:
    """The server's journal (journalctl)."""
    import subprocess  # noqa: PLC0415

    from unitgen.errors import UnitgenError  # noqa: PLC0415
    from unitgen.ops.journal import journal_argv  # noqa: PLC0415
    from unitgen.targets.systemd.installed import require  # noqa: PLC0415

    unit = require(_scope(user), [name])[name].server_unit
    argv = journal_argv(unit, _scope(user), lines=lines, follow=follow)
    try:
        return subprocess.run(argv, check=False).returncode
    except FileNotFoundError:
        raise UnitgenError("journalctl is not installed") from None


@cli.command()
@click.argument("name", required=False)
@click.option("--unit", help="Diagnose a unit unitgen did not write (with --port).")
@click.option("--port", type=int, help="The port that unit's health check probes.")
@click.option("--path", default="/health", show_default=True, help="Its health path.")
@USER
@JSON
def doctor(name: str | None, unit: str | None, port: int | None, path: str, user: bool,
           as_json: bool) -> int:
    """Find port mismatches (GPUStack #2154) and say how to fix them."""
    from unitgen.ops import doctor as doc  # noqa: PLC0415

    if unit:
        if port is None:
            raise click.UsageError("--unit needs --port (the port its health check probes)")
        return emit(doc.doctor_unit(unit, port, _scope(user), path=path), as_json=as_json)
    if not name:
        raise click.UsageError("give an instance NAME, or --unit UNIT --port PORT")
    return emit(doc.doctor(name, _scope(user)), as_json=as_json)


@cli.command()
@JSON
def gpus(as_json: bool) -> int:
    """GPUs, their memory and processes, and which instance each process belongs to."""
    from unitgen.plan.gpus import gpus_report  # noqa: PLC0415

    return emit(gpus_report(), as_json=as_json)


@cli.group()
def sandbox() -> None:
    """A private systemd user manager for containers and CI (see docs/sandbox.md)."""


@sandbox.command(name="start")
@click.option("--dir", "directory", type=_LazyPath(file_okay=False),
              help="Where to keep it (default: a new temporary directory).")
def sandbox_start(directory: Path | None) -> int:
    """Start one; print the environment that selects it (eval it in a shell)."""
    import shlex  # noqa: PLC0415

    from unitgen.ops.sandbox import Sandbox  # noqa: PLC0415

    box = Sandbox.start(directory)
    for key, value in box.env.items():
        click.echo(f"export {key}={shlex.quote(value)}")
    click.echo(f"# unitgen sandbox: manager pid {box.manager_pid}; stop it with: "
               f"unitgen sandbox stop {shlex.quote(str(box.root))}")
    return 0


@sandbox.command(name="stop")
@click.argument("directory", type=_LazyPath(file_okay=False, exists=True))
@click.option("--keep", is_flag=True, help="Keep the directory (units, journal).")
def sandbox_stop(directory: Path, keep: bool) -> int:
    """Stop a sandbox started with `unitgen sandbox start` (by its recorded pids)."""
    from unitgen.ops.sandbox import Sandbox  # noqa: PLC0415

    box = Sandbox.attach(directory)
    box.owns_root = not keep
    box.stop()
    click.echo(f"stopped the sandbox in {directory}", err=True)
    return 0


@sandbox.command(name="run", context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_run(command: tuple[str, ...]) -> int:
    """Run COMMAND with a fresh sandbox selected, then stop it."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from unitgen.errors import UnitgenError  # noqa: PLC0415
    from unitgen.ops.sandbox import Sandbox  # noqa: PLC0415

    box = Sandbox.start(tie_to_parent=True)
    click.echo(f"unitgen sandbox: private systemd user manager (pid {box.manager_pid}) in "
               f"{box.root}", err=True)
    try:
        return subprocess.run(list(command), env={**os.environ, **box.env}, check=False).returncode
    except FileNotFoundError:
        raise UnitgenError(f"{command[0]}: command not found") from None
    finally:
        box.stop()
        click.echo("unitgen sandbox: stopped", err=True)


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def probe(args: tuple[str, ...]) -> int:
    """Readiness probe (what units run as ExecStartPost=); --help for options."""
    from unitgen.inunit.probe import main as probe_main  # noqa: PLC0415

    return probe_main(list(args))


def _handle_errors(func: Callable[[], Any]) -> int:
    """The one place where exceptions become exit codes and messages."""
    from unitgen.errors import EXIT_FAILURE, EXIT_USAGE, SpecError, UnitgenError  # noqa: PLC0415

    try:
        rc = func()
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        return exc.exit_code
    except UnitgenError as exc:
        click.echo(f"error: {exc.message}", err=True)
        return exc.exit_code
    except OSError as exc:
        # A last resort: every expected I/O failure is already a UnitgenError.
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        return EXIT_FAILURE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
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
    sys.exit(_handle_errors(lambda: cli.main(args=argv, standalone_mode=False)))
