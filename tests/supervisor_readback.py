"""Read rendered supervisord conf files back with supervisor's own parser, the
way supervisord itself reads them (main config, [include], %(here)s, expansion,
then shlex.split of command= as the spawn does)."""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from supervisor.options import ServerOptions

MAIN = """\
[supervisord]
logfile={root}/sd.log
pidfile={root}/sd.pid
[unix_http_server]
file={root}/sock
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[include]
files=conf.d/*.conf
"""


@dataclass(frozen=True)
class Program:
    """One process as supervisord would run it."""

    group: str
    name: str
    argv: list[str]
    environment: dict[str, str]
    directory: str | None
    fcgi_socket: str | None


def read_back(conf_text: str) -> list[Program]:
    """Parse ``conf_text`` as an included file; raise ValueError like supervisord would."""
    with tempfile.TemporaryDirectory(prefix="unitgen-readback-") as tmp:
        root = Path(tmp)
        (root / "conf.d").mkdir()
        (root / "conf.d" / "x.conf").write_text(conf_text, encoding="utf-8")
        (root / "main.conf").write_text(MAIN.format(root=root), encoding="utf-8")
        opts = ServerOptions()
        opts.configfile = str(root / "main.conf")
        opts.process_config(do_usage=False)
        out = []
        for group in opts.process_group_configs:
            sock = getattr(group, "socket_config", None)
            for proc in group.process_configs:
                out.append(Program(group.name, proc.name, shlex.split(proc.command),
                                   dict(proc.environment or {}), proc.directory,
                                   sock.url if sock is not None else None))
        return out
