"""Writing small GGUF files (llama.cpp's format) for tests: a header with the
given keys, then zeros up to a size (sparse, so a "7 GiB" model costs nothing)."""

from __future__ import annotations

import struct
from pathlib import Path

# value types of gguf.h: (type number, struct format)
U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10
_FMT = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(kind: int, value: object) -> bytes:
    if kind == STRING:
        return _string(str(value))
    if kind == ARRAY:
        assert isinstance(value, tuple)
        inner, items = value
        return struct.pack("<IQ", inner, len(items)) + b"".join(_value(inner, v) for v in items)
    return struct.pack(_FMT[kind], value)


def write_gguf(path: Path, keys: list[tuple[str, int, object]], size: int = 0,
               version: int = 3) -> Path:
    """A GGUF file with these (key, type, value) pairs; ARRAY values are (type, items)."""
    head = b"GGUF" + struct.pack("<IQQ", version, 0, len(keys))
    for key, kind, value in keys:
        head += _string(key) + struct.pack("<I", kind) + _value(kind, value)
    with path.open("wb") as fh:
        fh.write(head)
        if size > len(head):
            fh.truncate(size)
    return path


def llama_keys(*, ctx: int = 4096, layers: int = 32, embedding: int = 4096, heads: int = 32,
               kv_heads: int | None = 8, vocab: int = 1000) -> list[tuple[str, int, object]]:
    """The keys llama.cpp writes for a llama model, in its order (the model's
    own keys, then the tokenizer's long arrays)."""
    keys: list[tuple[str, int, object]] = [
        ("general.architecture", STRING, "llama"),
        ("general.name", STRING, "test model"),
        ("llama.context_length", U32, ctx),
        ("llama.embedding_length", U32, embedding),
        ("llama.block_count", U32, layers),
        ("llama.attention.head_count", U32, heads),
    ]
    if kv_heads is not None:
        keys.append(("llama.attention.head_count_kv", U32, kv_heads))
    keys += [("tokenizer.ggml.model", STRING, "gpt2"),
             ("tokenizer.ggml.tokens", ARRAY, (STRING, [f"t{i}" for i in range(vocab)])),
             ("tokenizer.ggml.scores", ARRAY, (F32, [0.0] * vocab))]
    return keys
