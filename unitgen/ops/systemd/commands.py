"""The systemd target's own commands (its plugin adds them to ``unitgen``):
``unitgen sandbox``, a private systemd user manager. A skin like the CLI: it
parses and prints; the sandbox is :mod:`unitgen.ops.systemd.sandbox`, imported
when a command runs so that building the CLI stays light. Errors reach the
CLI's one handler as they do from every verb."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from unitgen.errors import UnitgenError

__all__ = ["sandbox"]


@click.group()
def sandbox() -> None:
    """A private systemd user manager for containers and CI (see docs/sandbox.md)."""


@sandbox.command(name="start")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              help="Where to keep it (default: a new temporary directory).")
def sandbox_start(directory: Path | None) -> int:
    """Start one; print the environment that selects it (eval it in a shell)."""
    from unitgen.ops.systemd.sandbox import Sandbox  # noqa: PLC0415

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
    from unitgen.ops.systemd.sandbox import Sandbox  # noqa: PLC0415

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

    from unitgen.ops.systemd.sandbox import Sandbox  # noqa: PLC0415

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
