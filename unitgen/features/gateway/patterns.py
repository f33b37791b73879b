"""What a gateway lets through to its members, as HAProxy matches it: the
paths it routes, and the one-``model`` rule for request bodies.

Kept apart from the configuration's template so that each rule is written
once, with its reasons, and tested against a real HAProxy
(tests/offline/test_gateway_door.py)."""

from __future__ import annotations

__all__ = ["ONE_MODEL_RE", "ROUTED_PATHS"]

# The POST paths routed by the body's "model": the OpenAI API as the backends
# serve it (docs/gateway.md, "What it does", says which backend serves which).
# Anything else is the gateway's own 404: the servers' admin endpoints (SGLang's
# /update_weights_from_disk, llama-server's /slots, vLLM's /sleep and
# /collective_rpc, LoRA loading) and every other spelling of these paths, since
# the match is exact ("..", "//", percent-encoding, a trailing "/").
ROUTED_PATHS = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/rerank", "/v1/score", "/v1/audio/speech",
)

# HAProxy routes by the first "model" of a body (json_query), the servers'
# JSON parsers keep the last: a body naming two models would be served as one
# it was not routed as (a LoRA adapter the gateway does not offer, another
# route's bound). The pattern matches an object whose top level has at most one
# key that a JSON parser reads as "model" (escaped spellings included, such as
# "mod\u0065l"), skipping nested values whole (a tool's parameter may be called
# "model"). A body it cannot match (not an object, not JSON, nested deeper than
# PCRE's stack allows: some 200 levels) is refused too: a match, not a failed
# search, lets a request through. Possessive quantifiers: no backtracking, so
# the time is linear in the body (measured in docs/gateway.md).
_WS = r"[ \t\n\r]*+"
_STRING = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'


def _letter(c: str) -> str:
    """One letter of a key, literal or as a JSON ``\\u`` escape (hex in either case)."""
    code = f"{ord(c):04x}"
    hi, lo = code[2], code[3]
    lo_class = f"[{lo}{lo.upper()}]" if lo.isalpha() else lo
    return f"(?:{c}|\\\\u00{hi}{lo_class})"


_MODEL_KEY = '"' + "".join(_letter(c) for c in "model") + '"'
_VALUE = r"(?:(?&s)|(?&o)|(?&a)|[-+.0-9A-Za-z]++)"
_DEFINE = (f"(?(DEFINE)(?<s>{_STRING})(?<m>{_MODEL_KEY})(?<v>{_VALUE})"
           f"(?<o>\\{{{_WS}(?:(?&s){_WS}:{_WS}(?&v){_WS}(?:,{_WS}(?&s){_WS}:{_WS}(?&v){_WS})*+)?\\}})"
           f"(?<a>\\[{_WS}(?:(?&v){_WS}(?:,{_WS}(?&v){_WS})*+)?\\]))")
_OTHER_PAIR = f"(?!(?&m))(?&s){_WS}:{_WS}(?&v){_WS}"
ONE_MODEL_RE = (f"\\A{_WS}\\{{{_WS}(?:{_OTHER_PAIR},{_WS})*+"
                f"(?:(?&m){_WS}:{_WS}(?&v){_WS}(?:,{_WS}{_OTHER_PAIR})*+|{_OTHER_PAIR})?"
                f"\\}}{_WS}\\z{_DEFINE}")
