"""Operations of the supervisor target: deploy, status, logs, doctor and remove
over supervisord's XML-RPC API. Its plugin (what it adds to unitgen) is data
only: this package is imported to build the CLI."""

from unitgen.ops.registry import Option, OptionKind, Plugin

__all__ = ["PLUGIN"]

# where supervisord and its include directory are (docs/supervisor.md)
PLUGIN = Plugin(
    ops="unitgen.ops.supervisor.target:SupervisorOps",
    options=(
        Option("--supervisor-url", "supervisor_url",
               "supervisor: unix:///path or http://host:port (default: [supervisorctl] "
               "serverurl; env UNITGEN_SUPERVISOR_URL).", envvar="UNITGEN_SUPERVISOR_URL"),
        Option("--conf-dir", "conf_dir",
               "supervisor: include directory for conf files (default: from [include] of "
               "supervisord.conf; env UNITGEN_SUPERVISOR_CONF_DIR).", OptionKind.DIRECTORY,
               envvar="UNITGEN_SUPERVISOR_CONF_DIR"),
    ),
)
