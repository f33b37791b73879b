"""What the key declarations (:mod:`unitgen.spec.keys`) say to people and editors:
the reference table of ``docs/spec.md`` (:func:`markdown_table`, checked by a test;
``python -m unitgen.spec.reference`` rewrites it) and the JSON Schema that
``unitgen schema`` prints (:func:`json_schema`). Nothing here is written twice: each
default, choice, bound and pattern comes from its declaration or its reader.
"""

from __future__ import annotations

from typing import Any

from unitgen.features.gateway.spec import GATEWAY_KEYS
from unitgen.spec.keys import (
    DIRECTIVE_RE,
    ENV_NAME_RE,
    GPU_UUID_RE,
    KEYS,
    MAX_GPUS,
    Key,
    Kind,
    span,
)
from unitgen.spec.readers import SIZE_RE

__all__ = ["DOCS_BEGIN", "DOCS_END", "applies_to", "docs_with_table", "json_schema",
           "markdown_table", "shown_default"]

# How the docs show an empty default; an absent table of directives adds nothing.
_EMPTY = {Kind.WORDS: "`[]`", Kind.ENV: "`{}`"}


def shown_default(key: Key) -> str:
    """The default as the docs table shows it, derived from the declared value."""
    value = key.default
    if key.required:
        return "required"
    if key.default_doc:
        return key.default_doc
    if value is None:
        return "none"
    if value == ():
        return _EMPTY.get(key.kind, "none")
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if key.kind is Kind.DURATION:
        return f"`{span(value)}`"
    return f"`{value}`"


def applies_to(key: Key) -> str:
    """Which backends/activations, as the docs say it."""
    parts = []
    if key.backends:
        parts.append(", ".join(f"`{b}`" for b in key.backends) + " only")
    if key.activation:
        parts.append(f"`activation = \"{key.activation}\"` only")
    if key.needs:
        parts.append(f"with `{key.needs}`")
    return "; ".join(parts) or "all"


def markdown_table() -> str:
    """The reference table of docs/spec.md, generated from :data:`KEYS`."""
    rows = ["| key | type | default | applies to | meaning |", "|---|---|---|---|---|"]
    for key in KEYS:
        name = key.name
        if key.kind is Kind.DIRECTIVES:
            name = f"[{name}]"
        elif "." in name:
            table, sub = name.split(".", 1)
            name = f"[{table}] {sub}"
        kind = key.kind.value
        if key.kind is Kind.CHOICE:
            kind = " / ".join(f"`{c}`" for c in key.choice_values)
        doc = key.doc
        if key.lo is not None and key.kind is Kind.DURATION:
            doc += f" ({span(key.lo)} to {span(key.hi or 0)})"
        rows.append(f"| `{name}` | {kind} | {shown_default(key)} | {applies_to(key)} | {doc} |")
    return "\n".join(rows) + "\n"


def _schema_of(key: Key) -> dict[str, Any]:
    doc = key.doc.replace("`", "")
    word = {"type": ["string", "number"], "not": {"type": "boolean"}}
    schema: dict[str, Any]
    if key.kind in (Kind.TEXT, Kind.PROGRAM, Kind.PATH):
        schema = {"type": "string"}
        if key.pattern:
            schema["pattern"] = f"^(?:{key.pattern})$"
        if key.kind is Kind.PATH:
            schema["pattern"] = "^/"
    elif key.kind is Kind.CHOICE:
        schema = {"type": "string", "enum": list(key.choice_values)}
    elif key.kind is Kind.INTEGER:
        schema = {"type": "integer", "minimum": key.lo, "maximum": key.hi}
    elif key.kind is Kind.BOOLEAN:
        schema = {"type": "boolean"}
    elif key.kind is Kind.DURATION and key.can_be_off:
        schema = {"anyOf": [{"type": ["string", "number"]}, {"const": False}]}
    elif key.kind is Kind.DURATION:
        schema = {"type": ["string", "number"], "not": {"type": "boolean"}}
    elif key.kind is Kind.WORDS:
        schema = {"type": "array", "items": word}
    elif key.kind is Kind.ENV:
        schema = {"type": "object", "propertyNames": {"pattern": f"^{ENV_NAME_RE}$"},
                  "additionalProperties": word}
    elif key.kind is Kind.DIRECTIVES:
        schema = {"type": "object", "propertyNames": {"pattern": f"^{DIRECTIVE_RE}$"},
                  "additionalProperties": word}
    elif key.kind is Kind.GPUS:
        schema = {"oneOf": [
            {"type": "integer", "minimum": 0, "maximum": MAX_GPUS},
            {"type": "array", "minItems": 1, "uniqueItems": True,
             "items": {"type": "integer", "minimum": 0, "maximum": MAX_GPUS - 1}},
            {"type": "array", "minItems": 1, "uniqueItems": True,
             "items": {"type": "string", "pattern": f"^{GPU_UUID_RE}$"}},
        ]}
    else:  # Kind.SIZE
        schema = {"type": "string", "pattern": f"^{SIZE_RE}$"}
    return {"description": doc, **schema}


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) for spec files, for editors that validate TOML
    (Even Better TOML / taplo): an instance spec, or a gateway spec when ``kind =
    "gateway"``. unitgen's own checks stay the authority: they also check what a
    schema cannot (port rules, GPUs, cross-key rules)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://unitgen.invalid/spec.schema.json",
        "title": "unitgen spec: an instance, or a gateway (kind = \"gateway\")",
        "type": "object",
        "if": {"properties": {"kind": {"const": "gateway"}}, "required": ["kind"]},
        "then": _object(GATEWAY_KEYS, "unitgen gateway spec"),
        "else": _object(KEYS, "unitgen instance spec"),
    }


def _object(keys: tuple[Key, ...], title: str) -> dict[str, Any]:
    props: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key in keys:
        if "." in key.name:
            table, sub = key.name.split(".", 1)
            tables.setdefault(table, {})[sub] = _schema_of(key)
        else:
            props[key.name] = _schema_of(key)
    for table, subs in tables.items():
        props[table] = {"type": "object", "properties": subs, "additionalProperties": False}
    return {"title": title, "type": "object", "properties": props,
            "required": [k.name for k in keys if k.required], "additionalProperties": False}


DOCS_BEGIN = ("<!-- keys: generated from unitgen/spec/keys.py by "
              "`python -m unitgen.spec.reference`; do not edit -->")
DOCS_END = "<!-- keys: end -->"


def docs_with_table(text: str) -> str:
    """``text`` (docs/spec.md) with the generated table put between the markers."""
    head, sep, rest = text.partition(DOCS_BEGIN)
    _, sep2, tail = rest.partition(DOCS_END)
    if not sep or not sep2:
        raise ValueError("docs/spec.md has no key table markers")
    return f"{head}{DOCS_BEGIN}\n{markdown_table()}{DOCS_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/spec.md")
    target.write_text(docs_with_table(target.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the key table into {target}")
