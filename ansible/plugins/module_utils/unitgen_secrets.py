# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""Which values of a spec mapping are secrets, and the spec with them replaced
by a placeholder, so the unitgen_instance module can keep them out of every
log, diff and result while showing the rest of the spec.

A secret is what unitgen itself keeps in its 0600 secret file (the variable
named by ``api_key_env``, the backend's API key variable, every variable in
``secret_env``, the value of ``--api-key`` in ``args``), and, because unitgen
only knows what it is told, what looks like one: an ``env`` variable or an
option of ``args``/``command`` whose name has a word such as TOKEN, SECRET,
PASSWORD or ends in KEY (``HF_TOKEN``, ``OPENAI_API_KEY``, ``--hf-token``).

Standard library only; Python 3.8 compatible: this file travels to the
managed host.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Tuple

__all__ = [
    "CHANGED", "REDACTED", "Secret", "declared_names", "looks_secret", "redacted", "secrets",
    "spec_strings", "undeclared",
]

REDACTED = "<redacted>"
CHANGED = "<redacted: changed>"

# The variable each backend reads its API key from (unitgen moves the key there).
BACKEND_KEY_ENV = {"vllm": "VLLM_API_KEY", "llama-server": "LLAMA_API_KEY"}
# unitgen's argument scanner takes any prefix of a long option from four
# characters (argparse does too), so "--api-k sk-..." is the key as well.
_KEY_FLAG = "--api-key"
_SECRET_WORDS = frozenset({
    "TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL",
    "CREDENTIALS", "APIKEY", "AUTHTOKEN",
})
# HF_TOKEN_PATH, --api-key-file: where a secret is, not the secret.
_LOCATION_WORDS = frozenset({"PATH", "FILE", "DIR", "DIRECTORY"})
# Values that cannot be a credential (HF_HUB_DISABLE_IMPLICIT_TOKEN=1); masking
# them in every output would garble it.
_TRIVIAL = re.compile(r"(?i)[0-9]?|true|false|yes|no|on|off")

# (what it is, for messages and for telling a change: "env.HF_TOKEN", "args --api-key";
#  where it is: ("env", "HF_TOKEN") or ("args", 3); text before the secret in that
#  value: "--api-key=" for an inline option, else ""; the secret)
Secret = Tuple[str, Tuple[str, Any], str, str]


def looks_secret(name: str) -> bool:
    """Whether a variable or option name (``HF_TOKEN``, ``--hf-token``) names a secret."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name.upper()) if w]
    if not words or words[-1] in _LOCATION_WORDS:
        return False
    return words[-1] == "KEY" or any(w in _SECRET_WORDS for w in words)


def _key_flag(word: str) -> bool:
    """``--api-key``, ``--api_key``, ``--admin-api-key``, ``--hf-token``, ``--api-k``."""
    if not word.startswith("--") or len(word) < 3:
        return False
    flag = word.replace("_", "-").lower()
    return (len(flag) >= 4 and _KEY_FLAG.startswith(flag)) or looks_secret(flag)


def _scalar(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def _words(field: str, words: object) -> Iterator[Secret]:
    """Values of key options in an argv list: ``--api-key VALUE``, ``--api-key=VALUE``."""
    if not isinstance(words, (list, tuple)):
        return
    seen: dict[str, int] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not isinstance(word, str):
            i += 1
            continue
        if word == "--":
            return
        name, eq, inline = word.partition("=")
        if not _key_flag(name):
            i += 1
            continue
        flag = name.replace("_", "-").lower()
        seen[flag] = seen.get(flag, 0) + 1
        label = f"{field} {flag}" + (f" #{seen[flag]}" if seen[flag] > 1 else "")
        if eq:
            if inline:
                yield (label, (field, i), name + "=", inline)
            i += 1
            continue
        nxt = _scalar(words[i + 1]) if i + 1 < len(words) else None
        # A value that is another long option means the key is missing (unitgen
        # refuses the spec); anything else, even "-x", is taken as the key.
        if nxt and not nxt.startswith("--"):
            yield (label, (field, i + 1), "", nxt)
            i += 2
            continue
        i += 1


def secrets(spec: object) -> list[Secret]:
    """Every secret of a spec mapping (see the module's docstring), in spec order."""
    if not isinstance(spec, dict):
        return []
    found: list[Secret] = []
    env = spec.get("env")
    if isinstance(env, dict):
        declared = set(declared_names(spec))
        for name, value in env.items():
            text = _scalar(value)
            if not isinstance(name, str) or not text:
                continue
            if name in declared or (looks_secret(name) and not _TRIVIAL.fullmatch(text)):
                found.append((f"env.{name}", ("env", name), "", text))
    found.extend(_words("args", spec.get("args")))
    command = spec.get("command")
    if isinstance(command, (list, tuple)):
        found.extend(_words("command", list(command)))
    return found


def declared_names(spec: dict[str, Any]) -> list[str]:
    """The ``env`` variables unitgen itself keeps in the secret file: the API key
    variable (``api_key_env``, or the backend's own) and those in ``secret_env``."""
    names = []
    key_env = spec.get("api_key_env") or BACKEND_KEY_ENV.get(str(spec.get("backend")))
    if isinstance(key_env, str):
        names.append(key_env)
    listed = spec.get("secret_env")
    if isinstance(listed, (list, tuple)):
        names.extend(n for n in listed if isinstance(n, str))
    return names


def undeclared(spec: object) -> list[str]:
    """``env`` variables that look like secrets but that unitgen would write into
    the unit file (not the API key variable, not in ``secret_env``)."""
    if not isinstance(spec, dict):
        return []
    declared = set(declared_names(spec))
    return [where[1] for _, where, _, _ in secrets(spec)
            if where[0] == "env" and where[1] not in declared]


def redacted(spec: dict[str, Any], found: list[Secret],
             before: list[Secret] | None = None) -> dict[str, Any]:
    """A copy of ``spec`` with each secret in ``found`` replaced by ``<redacted>``,
    or by ``<redacted: changed>`` when ``before`` (the secrets of the previous
    spec) held a different value, or none, under the same name."""
    previous = {label: value for label, _, _, value in before} if before is not None else None
    out = dict(spec)
    copied = set()
    for label, (field, index), prefix, value in found:
        mark = REDACTED
        if previous is not None and previous.get(label) != value:
            mark = CHANGED
        if field not in copied:  # copy only what is redacted, and each part once
            out[field] = dict(out[field]) if field == "env" else list(out[field])
            copied.add(field)
        out[field][index] = prefix + mark
    return out


def spec_strings(value: object) -> Iterator[str]:
    """Every scalar of a parameter as text, as Ansible lists the values of a
    ``no_log`` option to mask them (non-empty strings, numbers; not booleans)."""
    if isinstance(value, (str, bytes)):
        if value:
            yield value if isinstance(value, str) else value.decode("utf-8", "replace")
    elif isinstance(value, dict):
        for item in value.values():
            yield from spec_strings(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from spec_strings(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield str(value)
