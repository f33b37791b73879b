"""Targets are plugins of one registry (unitgen.ops.registry): each declares
its operations, its options (each filling a field of Where) and its own
commands; the CLI is built from them and names no target. A target's optional
verbs have defaults in the interface."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import click
import pytest

from unitgen.cli import cli
from unitgen.errors import EXIT_USAGE, NotAvailableError
from unitgen.ops import registry
from unitgen.ops.interface import TargetOps, Where


def test_every_target_is_a_plugin_whose_operations_take_a_where():
    for name in registry.names():
        plugin = registry.plugin(name)
        ops = registry.load(plugin.ops)
        assert isinstance(ops, type) and TargetOps in ops.__mro__, name  # its defaults
        assert registry.target(name, Where()).name == name


def test_options_fill_fields_of_where_each_once():
    fields = {f.name for f in dataclasses.fields(Where)}
    declared = [option for _, option in registry.options()]
    assert all(o.field in fields for o in declared)
    assert len({o.field for o in declared}) == len(declared)
    assert len({o.flag for o in declared}) == len(declared)
    # every field but the CLI's own (--gpus-from) is some target's option
    assert {o.field for o in declared} == fields - {"gpus_from"}


def test_target_commands_are_commands_and_take_no_verb_name():
    verbs = {"check", "render", "deploy", "status", "ls", "remove", "logs", "doctor", "gpus",
             "schema", "probe"}
    for path in registry.commands():
        command = registry.load(path)
        assert isinstance(command, click.Command), path
        assert command.name is not None and command.name not in verbs
        assert cli.commands[command.name] is command


def test_an_optional_verb_a_target_lacks_says_so():
    ops = registry.target("supervisor", Where())
    with pytest.raises(NotAvailableError) as err:
        ops.doctor_unit("x.service", 8000, "/health")
    assert err.value.exit_code == EXIT_USAGE
    assert err.value.message.startswith("--unit is not available with the supervisor target")


def test_doctor_unit_on_a_target_without_it_is_bad_input():
    done = subprocess.run([sys.executable, "-m", "unitgen", "doctor", "--target", "supervisor",
                           "--unit", "x.service", "--port", "1"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == EXIT_USAGE
    assert "no units of its own" in done.stderr and "Traceback" not in done.stderr


def test_a_target_added_to_the_registry_reaches_the_cli(tmp_path):
    # one package and one line in the registry: --target offers it, its
    # options and commands are there, and its operations are called
    pkg = tmp_path / "faketarget"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import click
        from unitgen.ops.registry import Plugin

        PLUGIN = Plugin(ops="faketarget:FakeOps", commands=("faketarget:hello",))

        @click.command()
        def hello():
            """Say hello."""
            click.echo("hello from fake")

        class FakeOps:
            name = "fake"

            def __init__(self, where):
                self.where = where

            def ls(self):
                from unitgen.result import Result
                return Result(data={"user": self.where.user}, lines=("fake ls",))
    '''))
    code = textwrap.dedent('''
        import sys
        from unitgen.ops import registry
        registry.TARGETS["fake"] = "faketarget"
        from unitgen.cli import main
        main(sys.argv[1:])
    ''')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, check=False, env={"PYTHONPATH": str(tmp_path)})

    assert "hello from fake" in run("hello").stdout
    assert "[systemd|supervisor|fake]" in run("ls", "--help").stdout
    done = run("ls", "--target", "fake", "--user")
    assert done.returncode == 0 and done.stdout.strip() == "fake ls"


def test_help_imports_no_manager_library():
    code = ("import sys\nfrom unitgen.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('jinja2', 'dbus_fast', 'psutil', 'pynvml', 'tomllib') "
            "if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stderr.strip() == "[]"
