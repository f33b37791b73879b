"""How much GPU memory a member of a GPU pool takes once loaded, and where that
figure comes from: the value the pool's policy (:mod:`unitgen.inunit.poolpolicy`)
weighs, that deploy resolves from a spec (:mod:`unitgen.plan.memneed`) and that
``status`` shows with its source.

Standard library only: the in-unit side of the pool reads it from its command
line (:meth:`Need.to_arg`, :meth:`Need.from_arg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["GIB", "Need", "NeedSource"]

GIB = 1024**3


class NeedSource(StrEnum):
    """Where a need comes from, in the order they are tried (the first one known wins)."""

    DECLARED = "declared"  # the spec's gpu_memory
    BACKEND_ARGS = "backend-args"  # the server's own arguments (vLLM, SGLang: a fraction)
    MEASURED = "measured"  # what NVML saw the instance hold at its last load
    ESTIMATE = "estimate"  # a stated guess (a GGUF's size and context, or the whole GPU)


@dataclass(frozen=True)
class Need:
    """GPU memory a member holds on EACH of its GPUs once loaded: a number of
    bytes, or a fraction of each GPU's total (how vLLM and SGLang size
    themselves). ``detail`` says how it was found, for ``status`` and messages."""

    source: NeedSource
    bytes: int | None = None
    fraction: float | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise ValueError("a need is either bytes or a fraction of the GPU, not both or neither")
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"a need in bytes must be positive, not {self.bytes}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"a need as a fraction of the GPU must be in (0, 1], not {self.fraction}")

    def on(self, total: int) -> int:
        """Bytes on a GPU of ``total`` bytes (a fraction rounds up: never less
        than the server takes)."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None  # noqa: S101 - __post_init__ guarantees one of them
        return math.ceil(self.fraction * total)

    def shown(self) -> str:
        """For a status line: ``40.0 GiB per GPU (declared)``, ``0.9 of each GPU
        (backend-args: --gpu-memory-utilization 0.9)``."""
        amount = (f"{self.bytes / GIB:.1f} GiB per GPU" if self.bytes is not None
                  else f"{self.fraction:g} of each GPU")
        return f"{amount} ({self.source}" + (f": {self.detail})" if self.detail else ")")

    def to_arg(self) -> str:
        """One command-line word: ``SOURCE:BYTES`` or ``SOURCE:FRACTIONx``."""
        amount = str(self.bytes) if self.bytes is not None else f"{self.fraction!r}x"
        return f"{self.source}:{amount}"

    @classmethod
    def from_arg(cls, word: str) -> Need:
        """The inverse of :meth:`to_arg`; ValueError for anything else."""
        source, sep, amount = word.partition(":")
        if not sep:
            raise ValueError(f"not a GPU memory need: {word!r} (SOURCE:BYTES or SOURCE:FRACTIONx)")
        kind = NeedSource(source)
        if amount.endswith("x"):
            return cls(kind, fraction=float(amount[:-1]))
        return cls(kind, bytes=int(amount))
