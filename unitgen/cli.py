"""The ``unitgen`` command: a thin skin that parses options, calls the core and
prints the result. Exceptions become exit codes here, and only here."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from unitgen import __version__
from unitgen.errors import EXIT_FAILURE, EXIT_USAGE, SpecError, UnitgenError
from unitgen.result import Result, to_json, to_text

if TYPE_CHECKING:
    from unitgen.render import RenderContext

__all__ = ["cli", "main"]

SPEC = click.Path(path_type=Path, dir_okay=False)


def emit(result: Result, *, as_json: bool) -> int:
    """Print a result as JSON or text; return its exit code."""
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
    from unitgen.render import RenderContext as Ctx  # noqa: PLC0415 - keeps `unitgen probe` light

    return Ctx.detect(scope="user" if user else "system")


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=SPEC)
@click.option("--user", is_flag=True, help="Units for the per-user manager.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(specs: tuple[Path, ...], user: bool, as_json: bool) -> int:
    """Validate specs and explain every problem; write nothing."""
    from unitgen import core  # noqa: PLC0415

    return emit(core.check(list(specs), _ctx(user)), as_json=as_json)


@cli.command()
@click.argument("spec", type=SPEC)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Write the files into this directory instead of printing them.")
@click.option("--user", is_flag=True, help="Units for the per-user manager (WantedBy=default.target).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def render(spec: Path, out: Path | None, user: bool, as_json: bool) -> int:
    """Print (or write with --out) the units of one spec."""
    from unitgen import core  # noqa: PLC0415

    return emit(core.render(spec, _ctx(user), out), as_json=as_json)


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def probe(args: tuple[str, ...]) -> int:
    """Readiness probe (what units run as ExecStartPost=); --help for options."""
    from unitgen.probe import main as probe_main  # noqa: PLC0415

    return probe_main(list(args))


def _handle_errors(func: Callable[[], Any]) -> int:
    """The one place where exceptions become exit codes and messages."""
    try:
        rc = func()
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        return exc.exit_code
    except UnitgenError as exc:
        click.echo(f"error: {exc.message}", err=True)
        return exc.exit_code
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
