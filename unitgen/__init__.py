"""unitgen: model-server instance specs rendered to systemd units whose socket owns the port.

Kept import-light on purpose: ``python -m unitgen.inunit.probe`` runs inside every
unit's ``ExecStartPost=`` and must not pay for click, jinja2 or D-Bus.
"""

from __future__ import annotations

__version__ = "0.1.0"
