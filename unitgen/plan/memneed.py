"""A GPU pool member's memory need, from its spec (issue 27), in this order:

1. ``declared``: the spec's ``gpu_memory``;
2. ``backend-args``: what the server's own arguments make it take (vLLM's
   ``--gpu-memory-utilization``, 0.9 when not given, and SGLang's
   ``--mem-fraction-static``: a fraction of each GPU's total);
3. ``measured``: what its processes held at its last load
   (:mod:`unitgen.inunit.memrecord`, valid while the spec is the same);
4. ``estimate``: for a GGUF model (llama.cpp, llama-box), the file's size plus
   its KV cache (layers and heads from the file's header, the context from
   ``-c`` or else the one it was trained with, llama.cpp's default) plus
   :data:`OVERHEAD`; the size times :data:`SIZE_FACTOR` when the header does not
   say; otherwise, or without the file, the whole GPU.

What the backends say about their sizing is in the backend table
(:class:`unitgen.spec.backends.MemorySizing`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from unitgen.errors import Problem, SpecError
from unitgen.inunit.gpuneed import GIB, Need, NeedSource
from unitgen.inunit.memrecord import Measured
from unitgen.inunit.nvml import gib
from unitgen.plan.gguf import model_files, read_gguf
from unitgen.spec.argscan import find_options
from unitgen.spec.backends import Backend, get_backend
from unitgen.spec.model import InstanceSpec

__all__ = ["OVERHEAD", "SIZE_FACTOR", "estimate", "fingerprint", "memory_need"]

# llama.cpp's CUDA context and compute buffers beside the weights and the KV
# cache: a few hundred MiB each for the usual batch sizes; a round 1 GiB.
OVERHEAD = GIB
# A GGUF whose header does not give its shape: weights plus a quarter for the
# cache and buffers of a typical 4-8k context.
SIZE_FACTOR = 1.25


def memory_need(spec: InstanceSpec, *, measured: Measured | None = None) -> Need:
    """The need of ``spec``'s server on each of its GPUs, from the first source
    that knows it. ``measured`` is its record (:func:`fingerprint` checked by
    the reader). SpecError (file and key) when the arguments say a fraction
    the server would refuse."""
    if spec.gpu_memory is not None:
        return Need(NeedSource.DECLARED, bytes=spec.gpu_memory, detail="gpu_memory")
    backend = get_backend(spec.backend)
    from_args = _from_args(spec, backend)
    if from_args is not None:
        return from_args
    if measured is not None and measured.peak > 0:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(measured.at))
        return Need(NeedSource.MEASURED, bytes=measured.peak, detail=f"its load of {when}")
    return estimate(spec)


def _from_args(spec: InstanceSpec, backend: Backend) -> Need | None:
    sizing = backend.memory
    if sizing is None or not sizing.fraction_flags:
        return None
    found = find_options(spec.args, sizing.fraction_flags, backend.syntax)
    if found:
        last = found[-1]  # argparse: the last one wins
        try:
            value = float(last.value or "")
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:
            raise SpecError(problems=[Problem(
                spec.source, "args", f"{last.shown()}: the fraction of GPU memory must be a "
                "number above 0 and at most 1")])
        return Need(NeedSource.BACKEND_ARGS, fraction=value, detail=last.shown())
    if sizing.default_fraction is not None:
        return Need(NeedSource.BACKEND_ARGS, fraction=sizing.default_fraction,
                    detail=f"{sizing.fraction_flags[0]} {sizing.default_fraction:g}, "
                           f"{backend.name}'s default")
    return None


def _gpu_count(spec: InstanceSpec) -> int:
    return spec.gpus if isinstance(spec.gpus, int) else len(spec.gpus or ()) or 1


def estimate(spec: InstanceSpec) -> Need:
    """A stated guess, before the first load: see the module's docstring."""
    backend = get_backend(spec.backend)
    sizing = backend.memory
    if sizing is None or not sizing.gguf_model or not spec.model:
        return Need(NeedSource.ESTIMATE, fraction=1.0,
                    detail="nothing is known before its first load: the whole GPU "
                           "(gpu_memory says less)")
    path = Path(spec.model)
    if not path.is_absolute():
        path = Path(spec.source).parent / path
    files = model_files(path)
    try:
        size = sum(f.stat().st_size for f in files)
    except OSError:
        return Need(NeedSource.ESTIMATE, fraction=1.0,
                    detail=f"model file {path} is not here to size: the whole GPU "
                           "(gpu_memory says less)")
    count = _gpu_count(spec)
    split = f", split over {count} GPUs" if count > 1 else ""
    facts = read_gguf(files[0])
    if facts is None:
        total = math.ceil(size * SIZE_FACTOR)
        return Need(NeedSource.ESTIMATE, bytes=math.ceil(total / count),
                    detail=f"GGUF {gib(size)} x {SIZE_FACTOR:g}: its header does not say its "
                           f"shape{split}")
    ctx_found = find_options(spec.args, sizing.context_flags, backend.syntax)
    n_ctx = facts.context_length
    if ctx_found and (ctx_found[-1].value or "").isdigit() and int(ctx_found[-1].value or 0):
        n_ctx = int(ctx_found[-1].value or 0)
    kv = facts.kv_cache_bytes(n_ctx)
    total = size + kv + OVERHEAD * count
    return Need(NeedSource.ESTIMATE, bytes=math.ceil(total / count), detail=(
        f"GGUF {gib(size)} + KV cache {gib(kv)} for {n_ctx} tokens ({facts.block_count} "
        f"layers, {facts.head_count_kv} KV heads of {facts.key_length}+{facts.value_length}, "
        f"f16) + {gib(OVERHEAD)} per GPU for CUDA and buffers{split}"))


def fingerprint(spec: InstanceSpec) -> str:
    """What a measured need depends on: the server, its model, its arguments,
    its GPU count and image. A record with another fingerprint is not used."""
    key = [str(spec.backend), spec.model, list(spec.args), _gpu_count(spec), spec.image,
           list(spec.command or ())]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
