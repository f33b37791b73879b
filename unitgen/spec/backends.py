"""What unitgen knows about each model server: its command line, how it is told
where to listen, which options and variables move that address, where its API
key goes, and how it says "ready".

Pure data, shared by every target (systemd today, supervisor later).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from unitgen.spec.argscan import EXACT, OptionSyntax

__all__ = ["BACKENDS", "GENERIC_LISTEN_FLAGS", "Backend", "BackendName", "Call", "GpuUse",
           "MemorySizing", "SleepMode", "get_backend"]


@dataclass(frozen=True)
class GpuUse:
    """How a server is told to use the GPUs a spec gives it, when its ``args`` do
    not already say: the defaults users expect from the GPU count."""

    flags: tuple[str, ...]  # options that already say it (found in the server's own syntax)
    words: tuple[str, ...]  # added otherwise; "{count}" becomes the number of GPUs
    min_count: int = 1  # added only from this many GPUs on


def _tensor_parallel(*flags: str) -> GpuUse:
    """Tensor parallel over every GPU (one GPU needs no flag)."""
    return GpuUse(flags=flags, words=(flags[0], "{count}"), min_count=2)


@dataclass(frozen=True)
class Call:
    """One HTTP request to the server's own endpoint (the query is part of the path)."""

    method: str
    path: str
    body: str = ""  # sent as JSON when not empty


@dataclass(frozen=True)
class SleepMode:
    """How a server releases its GPU memory and keeps its process (issue 27): the
    tier between loaded and stopped. Asleep, the weights wait in host RAM, so a
    wake is a copy back, not a load from disk; the GPU pool's policy counts that
    RAM against its budget."""

    flags: tuple[str, ...]  # options it must be started with
    env: tuple[tuple[str, str], ...]  # variables it must be started with
    sleep: Call
    wake: Call
    is_sleeping: Call | None  # answers {"is_sleeping": true|false}; None: no way to ask


@dataclass(frozen=True)
class MemorySizing:
    """How a server sizes its GPU memory: what a GPU pool's member needs
    before it was ever measured (issue 27)."""

    fraction_flags: tuple[str, ...] = ()  # it takes this fraction of each GPU's total
    default_fraction: float | None = None  # without the option (None: it decides at start)
    gguf_model: bool = False  # the model is a GGUF file: its size and KV cache estimate it
    context_flags: tuple[str, ...] = ()  # the context size option (sizes the KV cache)


_LLAMA_CPP_MEMORY = MemorySizing(gguf_model=True, context_flags=("-c", "--ctx-size"))

# vLLM (docs/features/sleep_mode.md): level 1 moves the weights to host RAM and
# drops the KV cache; the endpoints exist only with VLLM_SERVER_DEV_MODE=1, and
# the level is a query parameter.
_VLLM_SLEEP = SleepMode(
    flags=("--enable-sleep-mode",), env=(("VLLM_SERVER_DEV_MODE", "1"),),
    sleep=Call("POST", "/sleep?level=1"), wake=Call("POST", "/wake_up"),
    is_sleeping=Call("GET", "/is_sleeping"))
# SGLang: --enable-memory-saver releases the memory; without
# --enable-weights-cpu-backup the weights' pages come back with undefined
# content on resume (made for RL loops that load new weights anyway), so both.
_SGLANG_SLEEP = SleepMode(
    flags=("--enable-memory-saver", "--enable-weights-cpu-backup"), env=(),
    sleep=Call("POST", "/release_memory_occupation", "{}"),
    wake=Call("POST", "/resume_memory_occupation", "{}"), is_sleeping=None)

# Every layer on the GPU (999: more layers than any model has).
_OFFLOAD_LAYERS = GpuUse(flags=("-ngl", "--n-gpu-layers", "--gpu-layers"),
                         words=("--n-gpu-layers", "999"))


@dataclass(frozen=True)
class Backend:
    """One model server's command-line contract."""

    name: str
    program: str  # default executable, searched on systemd's PATH when not absolute
    prefix: tuple[str, ...]  # words between the executable and the model
    model_flag: str | None  # None: the model is positional
    health_path: str
    unix_flag: str | None  # option that takes a Unix socket path, if the server has one
    host_flag: str | None  # options used for a private loopback TCP endpoint
    port_flag: str | None
    # Every spelling a user might use to move the listen address.
    port_flags: tuple[str, ...] = ("--port",)
    host_flags: tuple[str, ...] = ("--host",)
    endpoint_flags: tuple[str, ...] = ()  # always refused: the private endpoint is unitgen's
    port_env: tuple[str, ...] = ()
    host_env: tuple[str, ...] = ()
    key_flags: tuple[str, ...] = ("--api-key",)
    key_env: str | None = None  # variable the server reads its key from; None: argv only
    key_many: bool = False  # the key option takes several keys (vLLM: nargs="+")
    refused_flags: tuple[tuple[str, str], ...] = ()  # (flag, why)
    refused_env: tuple[tuple[str, str], ...] = ()  # (variable, why): the same options, by variable
    syntax: OptionSyntax = EXACT  # how its parser reads option words: every scan uses it
    loading: str = ""  # how it behaves while loading, for messages and docs
    gpu_use: GpuUse | None = None  # None: told nothing about its GPUs
    # the option that names the models it answers to (None: it answers to any name)
    served_names_flag: str | None = None
    served_names_many: bool = False  # it takes several names (vLLM: nargs="+")
    sleep: SleepMode | None = None  # None: it cannot release its GPU memory alive (stop/start)
    memory: MemorySizing | None = None  # None: nothing known until measured
    # where its Prometheus metrics answer ("": it has none unitgen knows of), and
    # the option that turns them on (None: always on)
    metrics_path: str = ""
    metrics_flag: str | None = None


_TLS_WHY = (
    "TLS on the server would make the plain-HTTP readiness probe and the proxy's view "
    "disagree; terminate TLS in front of the public port instead"
)

# How each server's own parser reads its options (unitgen.spec.argscan has the rules).
# SGLang (``argparse.ArgumentParser(prog="sglang serve")``) and vox-box (its
# ``start`` subparser) are Python argparse with its defaults: prefixes, ``-p9000``.
ARGPARSE = OptionSyntax(abbrev=True, attached_short=True)
# vLLM's FlexibleArgumentParser (vllm/utils/argparse_utils.py) rewrites every word
# that starts with "--": '_' becomes '-' in the name up to the first '.' or '=',
# and ``--NAME.FIELD V`` becomes ``--NAME '{"FIELD": V}'``; then argparse (its
# default allow_abbrev=True).
VLLM_ARGS = replace(ARGPARSE, underscores=True, dotted=True)
# llama.cpp's common/arg.cpp: '_' becomes '-' in a word that starts with "--",
# then the name must be one of an option's spellings exactly; a value option
# takes the next word, whatever it is. There is no --name=value form.
LLAMA_CPP = OptionSyntax(underscores=True, value_always_next=True)
# llama-box (llama-box/engine_param.hpp) compares each word with strcmp and
# takes the next word as the value, like llama.cpp but without the '_' rewrite.
LLAMA_BOX = OptionSyntax(value_always_next=True)

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            name="vllm", program="vllm", prefix=("serve",), model_flag=None,
            health_path="/health", unix_flag="--uds", host_flag="--host", port_flag="--port",
            endpoint_flags=("--uds",), key_env="VLLM_API_KEY", key_many=True,
            refused_flags=(("--ssl-keyfile", _TLS_WHY), ("--ssl-certfile", _TLS_WHY)),
            syntax=VLLM_ARGS, loading="connection refused until loaded",
            gpu_use=_tensor_parallel("--tensor-parallel-size", "-tp"),
            # vLLM answers 404 to a model that is none of these (its default: the model path)
            served_names_flag="--served-model-name", served_names_many=True,
            sleep=_VLLM_SLEEP,
            memory=MemorySizing(fraction_flags=("--gpu-memory-utilization",),
                                default_fraction=0.9),
            metrics_path="/metrics",
        ),
        Backend(
            name="sglang", program="python3", prefix=("-m", "sglang.launch_server"),
            model_flag="--model-path", health_path="/health", unix_flag=None,
            host_flag="--host", port_flag="--port", key_env=None,
            refused_flags=(("--ssl-keyfile", _TLS_WHY), ("--ssl-certfile", _TLS_WHY)),
            syntax=ARGPARSE, loading="503 until loaded",
            gpu_use=_tensor_parallel("--tp-size", "--tp"), sleep=_SGLANG_SLEEP,
            # SGLang picks its default fraction at start from the GPU's size and the TP degree
            memory=MemorySizing(fraction_flags=("--mem-fraction-static",)),
            metrics_path="/metrics", metrics_flag="--enable-metrics",
        ),
        Backend(
            name="llama-server", program="llama-server", prefix=(), model_flag="-m",
            health_path="/health", unix_flag="--host", host_flag="--host", port_flag="--port",
            port_env=("LLAMA_ARG_PORT",), host_env=("LLAMA_ARG_HOST",),
            key_env="LLAMA_API_KEY",
            refused_flags=(
                ("--api-key-file", "the readiness probe must authenticate; give the key with "
                                   "--api-key and unitgen keeps it in a secret file"),
                ("--ssl-key-file", _TLS_WHY), ("--ssl-cert-file", _TLS_WHY),
            ),
            refused_env=(("LLAMA_ARG_SSL_KEY_FILE", _TLS_WHY), ("LLAMA_ARG_SSL_CERT_FILE", _TLS_WHY)),
            syntax=LLAMA_CPP, loading="503 {\"error\":\"Loading model\"} until loaded",
            gpu_use=_OFFLOAD_LAYERS, memory=_LLAMA_CPP_MEMORY,
            metrics_path="/metrics", metrics_flag="--metrics",
        ),
        Backend(
            name="llama-box", program="llama-box", prefix=(), model_flag="-m",
            health_path="/health", unix_flag="--host", host_flag="--host", port_flag="--port",
            # llama-box forks llama.cpp's argument parser; catching its variables too costs nothing.
            port_env=("LLAMA_ARG_PORT",), host_env=("LLAMA_ARG_HOST",), key_env=None,
            refused_flags=(("--ssl-key-file", _TLS_WHY), ("--ssl-cert-file", _TLS_WHY)),
            syntax=LLAMA_BOX, loading="404 until loaded", gpu_use=_OFFLOAD_LAYERS,
            memory=_LLAMA_CPP_MEMORY, metrics_path="/metrics", metrics_flag="--metrics",
        ),
        Backend(
            name="vox-box", program="vox-box", prefix=("start",), model_flag="--model",
            health_path="/v1/models", unix_flag=None, host_flag="--host", port_flag="--port",
            port_flags=("--port", "-p"), key_flags=(), syntax=ARGPARSE,
            loading="connection refused: it loads before it listens",
        ),
        Backend(
            name="custom", program="", prefix=(), model_flag=None, health_path="/health",
            unix_flag=None, host_flag=None, port_flag=None, key_flags=(),
            loading="declared by the user",
        ),
    )
}

# The valid values of a spec's ``backend``: the table's names, in its order. A
# backend is added by adding its entry above; nothing else lists them.
BackendName = StrEnum(  # type: ignore[misc]  # mypy cannot list the members of a derived enum
    "BackendName", {name.upper().replace("-", "_"): name for name in BACKENDS})
BackendName.__doc__ = "The model servers unitgen knows: the names of :data:`BACKENDS`."

# For custom commands: options that commonly fix a listen address. A literal
# value here (rather than a {port}/{host}/{unix} placeholder) is refused.
GENERIC_LISTEN_FLAGS = ("--port", "--host", "--bind", "--listen", "--uds", "--unix-socket")


def get_backend(name: str) -> Backend:
    """Return the backend definition for a validated backend name."""
    return BACKENDS[name]
