"""The ``unitgen`` command: a thin skin that parses options, calls the core and
prints the result. Exceptions become exit codes here, and only here."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from unitgen import __version__
from unitgen.errors import EXIT_FAILURE, EXIT_USAGE, SpecError, UnitgenError, printable
from unitgen.result import Result, to_json, to_text

if TYPE_CHECKING:
    from unitgen.targets.systemd.render import RenderContext

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


EPILOG = """\b
Examples:
  unitgen check examples/*.toml
  unitgen deploy --user examples/demo.toml
  unitgen status --json

\b
Exit codes (every verb):
  0  done, or nothing to do (e.g. remove of an instance that is not installed)
  1  the operation failed (a unit did not start, systemd refused, I/O error)
  2  bad input: spec problems, busy or overlapping ports, bad options; nothing changed
  3  cannot check here: GPU placement needs NVML (use --gpus-from); nothing changed
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 110, "terminal_width": 110}, epilog=EPILOG)
@click.version_option(__version__, prog_name="unitgen")
def cli() -> None:
    """Model servers as systemd units whose socket owns the port."""


def _ctx(user: bool) -> RenderContext:
    from unitgen.targets.systemd.render import RenderContext as Ctx  # noqa: PLC0415 - keeps `unitgen probe` light

    return Ctx.detect(scope="user" if user else "system")


GPUS_FROM = click.option(
    "--gpus-from", type=click.Path(path_type=Path, dir_okay=False),
    help="Place GPUs as on the host whose `unitgen gpus --json` output is in this file.")


@cli.command(epilog="Example: unitgen check examples/*.toml --gpus-from gpu-host.json")
@click.argument("specs", nargs=-1, required=True, type=SPEC)
@click.option("--user", is_flag=True, help="Units for the per-user manager.")
@GPUS_FROM
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--target", "target", type=click.Choice(["systemd", "supervisor"]),
              default="systemd", envvar="UNITGEN_TARGET", show_default=True,
              help="Service manager (env UNITGEN_TARGET).")
@click.option("--no-verify", is_flag=True,
              help="Skip systemd-analyze verify of the rendered units (it costs ~2 ms a unit).")
def check(specs: tuple[Path, ...], user: bool, gpus_from: Path | None, as_json: bool,
          target: str, no_verify: bool) -> int:
    """Validate specs and explain every problem of every file; write nothing."""
    if target == "supervisor":
        from unitgen.ops.supervisor import commands as sup  # noqa: PLC0415

        return emit(sup.check(list(specs)), as_json=as_json)
    from unitgen.ops import core  # noqa: PLC0415

    return emit(core.check(list(specs), _ctx(user), gpus_from=gpus_from, verify=not no_verify),
                as_json=as_json)


def _target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--target, and where supervisord and its include directory are (docs/supervisor.md)."""
    func = click.option("--conf-dir", type=click.Path(path_type=Path, file_okay=False),
                        envvar="UNITGEN_SUPERVISOR_CONF_DIR",
                        help="supervisor: include directory for conf files (default: from "
                             "[include] of supervisord.conf; env UNITGEN_SUPERVISOR_CONF_DIR).")(func)
    func = click.option("--supervisor-url", envvar="UNITGEN_SUPERVISOR_URL",
                        help="supervisor: unix:///path or http://host:port (default: "
                             "[supervisorctl] serverurl; env UNITGEN_SUPERVISOR_URL).")(func)
    return click.option("--target", "target", type=click.Choice(["systemd", "supervisor"]),
                        default="systemd", envvar="UNITGEN_TARGET", show_default=True,
                        help="Service manager (env UNITGEN_TARGET).")(func)


@cli.command(epilog="Example: unitgen render examples/demo.toml --out /tmp/units\n\n"
                    "On stdout each file follows a line '----- unitgen: NAME -----'.")
@click.argument("spec", type=SPEC)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Write the files into this directory (created if missing) instead of "
                   "printing them.")
@click.option("--user", is_flag=True, help="Units for the per-user manager (WantedBy=default.target).")
@GPUS_FROM
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_target_options
def render(spec: Path, out: Path | None, user: bool, gpus_from: Path | None, as_json: bool,
           target: str, supervisor_url: str | None, conf_dir: Path | None) -> int:
    """Print (or write with --out) the units of one spec."""
    from unitgen.ops import core  # noqa: PLC0415

    if target == "supervisor":
        from unitgen.ops.supervisor import commands as sup  # noqa: PLC0415

        return emit(sup.render(spec, out), as_json=as_json)
    return emit(core.render(spec, _ctx(user), out, gpus_from=gpus_from), as_json=as_json)


@cli.command(epilog="Example: unitgen schema > unitgen.schema.json (see docs/spec.md, Editors)")
@click.option("--markdown", is_flag=True, help="The reference table of docs/spec.md instead.")
def schema(markdown: bool) -> int:
    """Print the JSON Schema of spec files, for editors that validate TOML."""
    import json  # noqa: PLC0415

    from unitgen.spec.reference import json_schema, markdown_table  # noqa: PLC0415

    click.echo(markdown_table().rstrip("\n") if markdown else json.dumps(json_schema(), indent=2))
    return 0


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
@_target_options
def deploy(specs: tuple[Path, ...], user: bool, dry_run: bool, diff: bool, no_wait: bool,
           port_range: str, as_json: bool, target: str, supervisor_url: str | None,
           conf_dir: Path | None) -> int:
    """Install or update instances and wait until they answer."""
    from unitgen.ops.deploy import DeployOptions  # noqa: PLC0415
    from unitgen.ops.deploy import deploy as run  # noqa: PLC0415

    lo, _, hi = port_range.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 65535):
        raise click.BadParameter(f"{port_range!r} is not LOW-HIGH, e.g. 31000-31999",
                                 param_hint="--port-range")
    if target == "supervisor":
        from unitgen.ops.supervisor import commands as sup  # noqa: PLC0415

        return emit(sup.deploy(list(specs), url=supervisor_url, conf_dir=conf_dir,
                               dry_run=dry_run, diff=diff, wait=not no_wait,
                               port_range=(int(lo), int(hi))), as_json=as_json)
    opts = DeployOptions(scope=_scope(user), ctx=_ctx(user), dry_run=dry_run, diff=diff,
                         wait=not no_wait, tty=sys.stderr.isatty() and not as_json,
                         port_range=(int(lo), int(hi)),
                         show=None if (as_json or dry_run) else click.echo)
    return emit(run(list(specs), opts), as_json=as_json)


@cli.command()
@click.argument("names", nargs=-1)
@USER
@JSON
@_target_options
def status(names: tuple[str, ...], user: bool, as_json: bool, target: str,
           supervisor_url: str | None, conf_dir: Path | None) -> int:
    """State, address, PID, uptime and memory of instances (all by default)."""
    if target == "supervisor":
        from unitgen.ops.supervisor import commands as sup  # noqa: PLC0415

        return emit(sup.status(list(names), url=supervisor_url, conf_dir=conf_dir),
                    as_json=as_json)
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
@_target_options
def remove(names: tuple[str, ...], user: bool, as_json: bool, target: str,
           supervisor_url: str | None, conf_dir: Path | None) -> int:
    """Stop, disable and delete an instance's generated files (nothing else)."""
    if target == "supervisor":
        from unitgen.ops.supervisor import commands as sup  # noqa: PLC0415

        return emit(sup.remove(list(names), url=supervisor_url, conf_dir=conf_dir),
                    as_json=as_json)
    from unitgen.ops.deploy import remove as run  # noqa: PLC0415

    return emit(run(list(names), _scope(user)), as_json=as_json)


@cli.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=100, show_default=True, help="How many lines.")
@USER
@_target_options
def logs(name: str, follow: bool, lines: int, user: bool, target: str,
         supervisor_url: str | None, conf_dir: Path | None) -> int:
    """An instance's whole story: its units and the manager's messages, in time order.

    Under supervisor: the program's log files."""
    if target == "supervisor":
        from unitgen.ops.supervisor import commands as sup  # noqa: PLC0415

        return sup.logs(name, url=supervisor_url, conf_dir=conf_dir, lines=lines, follow=follow)
    import subprocess  # noqa: PLC0415

    from unitgen.ops.journal import journal_argv  # noqa: PLC0415
    from unitgen.targets.systemd.installed import require  # noqa: PLC0415

    units = require(_scope(user), [name])[name].units
    argv = journal_argv(units, _scope(user), lines=lines, follow=follow)
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
@_target_options
def doctor(name: str | None, unit: str | None, port: int | None, path: str, user: bool,
           as_json: bool, target: str, supervisor_url: str | None,
           conf_dir: Path | None) -> int:
    """Find port mismatches (GPUStack #2154) and say how to fix them."""
    if target == "supervisor" and name:
        from unitgen.ops.supervisor import commands as sup  # noqa: PLC0415

        return emit(sup.doctor(name, url=supervisor_url, conf_dir=conf_dir), as_json=as_json)
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
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              help="Where to keep it (default: a new temporary directory).")
def sandbox_start(directory: Path | None) -> int:
    """Start one; print the environment that selects it (eval it in a shell)."""
    from unitgen.ops.sandbox import Sandbox  # noqa: PLC0415

    box = Sandbox.start(directory)
    for key, value in box.env.items():
        click.echo(f"export {key}={shlex.quote(value)}")
    click.echo(f"# unitgen sandbox: manager pid {box.manager_pid}; stop it with: "
               f"unitgen sandbox stop {shlex.quote(str(box.root))}")
    return 0


@sandbox.command(name="stop")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True))
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
