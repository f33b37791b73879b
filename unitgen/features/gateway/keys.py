"""The API key a gateway sends a member that has one of its own: an installed
instance's from its root-only secret file (where the target keeps it), an
upstream's from its ``api_key_file``. Never a client's key (docs/gateway.md)."""

from __future__ import annotations

from collections.abc import Callable

from unitgen.features.gateway.plan import Member
from unitgen.ops.files import read_key_file

__all__ = ["Secret", "installed_key"]

# (instance, variable) -> the value in that installed instance's secret file
Secret = Callable[[str, str], str | None]


def installed_key(m: Member, secret: Secret) -> str | None:
    """A member's own API key (its first line for a key file); None when it has
    none or it cannot be read."""
    if m.key_file:
        return read_key_file(m.key_file)
    if m.key_env is None:
        return None
    return secret(m.instance, m.key_env)
