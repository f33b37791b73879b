"""The systemd target's operations: D-Bus, deploy, status, doctor, logs, swap
groups, the sandbox manager. Its plugin (what it adds to unitgen) is data only:
this package is imported to build the CLI."""

from unitgen.ops.registry import Option, OptionKind, Plugin

__all__ = ["PLUGIN"]

PLUGIN = Plugin(
    ops="unitgen.ops.systemd.target:SystemdOps",
    options=(Option("--user", "user", "systemd: the per-user manager (~/.config/systemd/user) "
                    "instead of the system one; render: units for it (WantedBy=default.target).",
                    OptionKind.FLAG),),
    commands=("unitgen.ops.systemd.commands:sandbox",),
)
