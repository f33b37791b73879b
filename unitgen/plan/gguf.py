"""The few facts of a GGUF model file (llama.cpp's format) that size its KV
cache: layers, attention heads, head sizes, the context it was trained with.

Only the header's key/value section is read, and only until those keys are
found (llama.cpp writes the model's keys before the tokenizer's long arrays);
at most :data:`MAX_HEADER_BYTES`. Anything unexpected gives None, and the
caller falls back to a cruder estimate.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["MAX_HEADER_BYTES", "GgufFacts", "model_files", "read_gguf"]

MAX_HEADER_BYTES = 64 * 1024 * 1024
_MAGIC = b"GGUF"
# value types (ggml/include/gguf.h: enum gguf_type) -> struct format; 8 string, 9 array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
_STRING, _ARRAY = 8, 9
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


@dataclass(frozen=True)
class GgufFacts:
    """What the header says about the model's shape."""

    architecture: str
    context_length: int  # the context it was trained with
    block_count: int  # layers
    head_count_kv: int
    key_length: int  # per head
    value_length: int

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """K and V for ``n_ctx`` tokens in every layer (f16 by default, as llama.cpp)."""
        per_token = self.head_count_kv * (self.key_length + self.value_length)
        return n_ctx * self.block_count * per_token * bytes_per_value


class _Reader:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.read_bytes = 0

    def take(self, n: int) -> bytes:
        self.read_bytes += n
        if self.read_bytes > MAX_HEADER_BYTES:
            raise ValueError("header too long")
        data = self.fh.read(n)
        if len(data) != n:
            raise ValueError("file ends inside its header")
        return data

    def scalar(self, kind: int) -> object:
        fmt = "<" + _SCALAR[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        (n,) = struct.unpack("<Q", self.take(8))
        return self.take(n).decode("utf-8", "replace")

    def skip_string(self) -> None:
        (n,) = struct.unpack("<Q", self.take(8))
        self.read_bytes += n
        if self.read_bytes > MAX_HEADER_BYTES:
            raise ValueError("header too long")
        self.fh.seek(n, 1)

    def value(self, kind: int, keep: bool) -> object:
        """A value of ``kind``; arrays are kept (as lists of numbers) only when ``keep``."""
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, count = struct.unpack("<IQ", self.take(12))
            if inner in _SCALAR and not keep:
                self.take(count * struct.calcsize("<" + _SCALAR[inner]))
                return None
            if inner == _STRING and not keep:
                for _ in range(count):
                    self.skip_string()
                return None
            items = [self.value(inner, keep) for _ in range(count)]
            return items if keep else None
        if kind not in _SCALAR:
            raise ValueError(f"unknown value type {kind}")
        return self.scalar(kind)


# without these there is no estimate; the head counts and sizes have defaults
_REQUIRED = {"context_length", "block_count", "embedding_length", "attention.head_count"}


def _wanted(arch: str) -> dict[str, str]:
    return {f"{arch}.{k}": k for k in (
        "context_length", "block_count", "embedding_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length")}


def _number(value: object) -> int:
    """A count as the header gives it: a number, or one per layer (take the largest)."""
    if isinstance(value, list):
        return max(int(v) for v in value) if value else 0
    if isinstance(value, int | float):
        return int(value)
    raise ValueError(f"not a number: {value!r}")


def read_gguf(path: Path) -> GgufFacts | None:
    """The model's shape from a GGUF file's header; None if it is not one or
    does not say (a fallback estimate is the caller's)."""
    try:
        with path.open("rb") as fh:
            return _facts(_Reader(fh))
    except (OSError, ValueError, KeyError, struct.error, ZeroDivisionError):
        return None


def _facts(r: _Reader) -> GgufFacts | None:
    if r.take(4) != _MAGIC:
        return None
    version, _tensors, count = struct.unpack("<IQQ", r.take(20))
    if version not in (2, 3):
        return None  # v1 (32-bit counts) is long gone; a big-endian file reads as a huge version
    arch = ""
    got: dict[str, object] = {}
    for _ in range(count):
        key = r.string()
        (kind,) = struct.unpack("<I", r.take(4))
        if key.startswith("tokenizer.") and set(got) >= _REQUIRED:
            break  # the model's own keys come first: what follows is its vocabulary
        wanted = _wanted(arch) if arch else {}
        value = r.value(kind, keep=key in wanted)
        if key == "general.architecture" and isinstance(value, str):
            arch = value
        elif key in wanted:
            got[wanted[key]] = value
            if len(got) == len(wanted):
                break
    if not arch:
        return None
    heads = _number(got["attention.head_count"])
    head_size = _number(got["embedding_length"]) // heads
    return GgufFacts(
        architecture=arch, context_length=_number(got["context_length"]),
        block_count=_number(got["block_count"]),
        head_count_kv=_number(got.get("attention.head_count_kv", heads)),
        key_length=_number(got.get("attention.key_length", head_size)),
        value_length=_number(got.get("attention.value_length", head_size)))


def model_files(path: Path) -> list[Path]:
    """The file and, for a split model (``NAME-00001-of-00003.gguf``), its other parts."""
    match = _SHARD.match(path.name)
    if not match:
        return [path]
    n = int(match.group("n"))
    return [path.with_name(f"{match.group('stem')}-{i:05d}-of-{n:05d}.gguf")
            for i in range(1, n + 1)]
