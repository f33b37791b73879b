"""Each backend's arguments are scanned the way that server's own parser reads
them: vLLM's FlexibleArgumentParser turns ``_`` into ``-`` in option names and
takes argparse prefixes, llama.cpp does the same with exact names only, SGLang
and vox-box are plain argparse, llama-box compares names exactly.

The reference parsers below are the servers' rules written out (argparse itself
for the Python servers); the scan must find every option they would read."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import GOLDEN_CTX, write_spec
from unitgen.errors import SpecError
from unitgen.ops.systemd.specs import render_spec
from unitgen.plan.instance import resolve
from unitgen.spec.model import parse_spec

KEY = "sk-Very-Secret-42"


def render(tmp_path: Path, backend: str, args: list[str], extra: str = "") -> dict[str, str]:
    """The files unitgen writes for a spec (unit files and the secret file)."""
    spec = write_spec(tmp_path, "k", f'name = "k"\nbackend = "{backend}"\nmodel = "m"\n'
                                     f"port = 8000\nargs = {json.dumps(args)}\n{extra}")
    return {f.name: f.text for f in render_spec(spec, GOLDEN_CTX).files}


def refused(backend: str, args: list[str]) -> list[str]:
    text = f'name = "k"\nbackend = "{backend}"\nmodel = "m"\nargs = {json.dumps(args)}\n'
    with pytest.raises(SpecError) as info:
        resolve(parse_spec(text, "k.toml"))
    return [str(p) for p in info.value.problems]


def assert_key_only_in_secret_file(files: dict[str, str], variable: str) -> None:
    units = {name: text for name, text in files.items() if not name.endswith(".env")}
    assert all(KEY not in text for text in units.values()), "the key is in a unit file"
    assert f'{variable}="{KEY}"' in files["k.env"].splitlines()


# --- item: --api_key is vLLM's API key ---------------------------------------


@pytest.mark.parametrize("args", [
    ["--api_key", KEY], [f"--api_key={KEY}"], ["--api-key", KEY],
    ["--api_ke", KEY],  # an argparse prefix, after vLLM's '_' -> '-'
    ["--dtype", "half", "--api_key", KEY, "--max_model_len", "4096"],
])
def test_vllm_api_key_in_any_spelling_goes_to_the_secret_file(tmp_path, args):
    files = render(tmp_path, "vllm", args)
    assert_key_only_in_secret_file(files, "VLLM_API_KEY")
    # exactly what --api-key KEY renders: the same units and the same secret file
    others = ["--dtype", "half", "--max_model_len", "4096"] if "--dtype" in args else []
    assert files == render(tmp_path, "vllm", [*others, "--api-key", KEY])


@pytest.mark.parametrize("args", [["--api_key", KEY], [f"--api_key={KEY}"]])
def test_llama_server_reads_underscores_too(tmp_path, args):
    assert_key_only_in_secret_file(render(tmp_path, "llama-server", args), "LLAMA_API_KEY")


def test_llama_server_takes_the_next_word_as_the_key_even_with_a_dash(tmp_path):
    """common/arg.cpp: the word after a value option is its value, whatever it is."""
    global KEY  # noqa: PLW0603 - the helpers check this key
    saved, KEY = KEY, "-sk-starts-with-a-dash"
    try:
        assert_key_only_in_secret_file(render(tmp_path, "llama-server", ["--api-key", KEY]),
                                       "LLAMA_API_KEY")
    finally:
        KEY = saved


def test_vllm_several_keys_are_refused_and_none_is_left_in_argv():
    """vLLM's --api-key takes one or more keys (nargs="+"); one secret file
    variable holds one, so unitgen refuses rather than leave the rest behind."""
    out = refused("vllm", ["--api-key", KEY, "sk-second-key"])
    assert any("one key" in m for m in out), out
    assert all(KEY not in m and "sk-second-key" not in m for m in out)


@pytest.mark.parametrize(("backend", "args"), [
    ("sglang", ["--api_key", KEY]),  # argparse does not read it: the server would not start
    ("llama-box", ["--api_key", KEY]),
    ("vllm", ["--api-key.x", KEY]),  # vLLM: --NAME.FIELD is JSON syntax for --NAME
])
def test_spellings_the_server_misreads_are_refused_without_echoing_the_key(backend, args):
    out = refused(backend, args)
    assert out and all(KEY not in m for m in out)


# --- item: --ssl_keyfile gets past the TLS refusal ---------------------------


@pytest.mark.parametrize(("backend", "word"), [
    ("vllm", "--ssl_keyfile"), ("vllm", "--ssl_certfile"), ("vllm", "--ssl-keyfile"),
    ("vllm", "--ssl_key"), ("sglang", "--ssl-keyf"),
    ("llama-server", "--ssl_key_file"), ("llama-server", "--ssl-cert_file"),
])
@pytest.mark.parametrize("joined", [False, True])
def test_tls_options_are_refused_in_every_spelling(backend, word, joined):
    args = [f"{word}=/etc/k.pem"] if joined else [word, "/etc/k.pem"]
    out = refused(backend, args)
    assert any("not supported" in m and "TLS" in m for m in out), out


# --- ports and hosts follow the same rules -----------------------------------


@pytest.mark.parametrize(("backend", "args"), [
    ("vox-box", ["--p", "9000"]),  # the only vox-box option starting --p
    ("vox-box", ["--p=9000"]),
    ("vllm", ["--port", "9000"]),
    ("llama-server", ["--port", "9000"]),
])
def test_port_spellings_are_adopted(backend, args):
    inst = resolve(parse_spec(f'name = "k"\nbackend = "{backend}"\nmodel = "m"\n'
                              f"args = {json.dumps(args)}\n", "k.toml"))
    assert inst.public.port == 9000 and "9000" not in inst.argv


@pytest.mark.parametrize("variable", ["LLAMA_ARG_SSL_KEY_FILE", "LLAMA_ARG_SSL_CERT_FILE"])
def test_llama_server_tls_variables_are_refused_like_its_options(variable):
    """common/arg.cpp reads --ssl-key-file from LLAMA_ARG_SSL_KEY_FILE too."""
    text = ('name = "k"\nbackend = "llama-server"\nmodel = "m"\n'
            f'env = {{ {variable} = "/etc/k.pem" }}\n')
    with pytest.raises(SpecError) as info:
        resolve(parse_spec(text, "k.toml"))
    assert [p.key for p in info.value.problems] == [f"env.{variable}"]
    assert "TLS" in info.value.problems[0].message


def test_gpu_defaults_see_an_underscore_spelling(tmp_path):
    """llama-server reads --n_gpu_layers as --n-gpu-layers: no default is added."""
    files = render(tmp_path, "llama-server", ["--n_gpu_layers", "20"],
                   'gpus = ["GPU-00000000-1111-2222-3333-000000000000"]\n')
    assert "--n-gpu-layers" not in files["k-backend.service"]


# --- table: each backend's spellings ---------------------------------------

READ, MISSPELLED, NOT_READ = "read", "misspelled", "not read"


@pytest.mark.parametrize(("backend", "argv", "flag", "outcome"), [
    # vLLM: '_' -> '-' up to '.', then argparse prefixes
    ("vllm", ["--api_key", "K"], "--api-key", READ),
    ("vllm", ["--api_key=K"], "--api-key", READ),
    ("vllm", ["--api_ke", "K"], "--api-key", READ),
    ("vllm", ["--ssl_keyfile", "f"], "--ssl-keyfile", READ),
    ("vllm", ["--ssl-key", "f"], "--ssl-keyfile", READ),
    ("vllm", ["--api-key.x", "K"], "--api-key", MISSPELLED),
    ("vllm", ["--api_key.x=K"], "--api-key", MISSPELLED),
    ("vllm", ["--port.x", "1"], "--port", MISSPELLED),
    ("vllm", ["--apikey", "K"], "--api-key", NOT_READ),
    # SGLang: argparse as it comes
    ("sglang", ["--api-k", "K"], "--api-key", READ),
    ("sglang", ["--api_key", "K"], "--api-key", MISSPELLED),
    ("sglang", ["--ssl_keyfile", "f"], "--ssl-keyfile", MISSPELLED),
    ("sglang", ["--api-key.x", "K"], "--api-key", NOT_READ),
    # vox-box: argparse; its --port is the only option starting --p
    ("vox-box", ["--p", "1"], "--port", READ),
    ("vox-box", ["--po=1"], "--port", READ),
    ("vox-box", ["-p1"], "-p", READ),
    # llama-server: '_' -> '-' in the whole word, exact names, next word is the value
    ("llama-server", ["--api_key", "K"], "--api-key", READ),
    ("llama-server", ["--ssl_key_file", "f"], "--ssl-key-file", READ),
    ("llama-server", ["--ssl-key_file", "f"], "--ssl-key-file", READ),
    ("llama-server", ["--api-key", "-K"], "--api-key", READ),
    ("llama-server", ["--api-k", "K"], "--api-key", NOT_READ),
    ("llama-server", ["--por", "1"], "--port", NOT_READ),
    # llama-box: strcmp
    ("llama-box", ["--port", "-1"], "--port", READ),
    ("llama-box", ["--api_key", "K"], "--api-key", MISSPELLED),
    ("llama-box", ["--por", "1"], "--port", NOT_READ),
])
def test_spellings_per_backend(backend, argv, flag, outcome):
    from unitgen.spec.argscan import find_misspelled, find_options  # noqa: PLC0415
    from unitgen.spec.backends import get_backend  # noqa: PLC0415

    syntax = get_backend(backend).syntax
    read = find_options(tuple(argv), (flag,), syntax)
    odd = find_misspelled(tuple(argv), (flag,), syntax)
    got = READ if read else MISSPELLED if odd else NOT_READ
    assert got == outcome
    if read:
        assert read[0].value == (argv[-1] if len(argv) == 2 else argv[0].rsplit("=", 1)[-1]
                                 if "=" in argv[0] else argv[0][2:])


# --- property: the scan finds what each server's parser reads ----------------

WATCHED = {
    # option: its value in every reference parser
    "vllm": ("--port", "--host", "--api-key", "--ssl-keyfile", "--ssl-certfile", "--uds"),
    "sglang": ("--port", "--host", "--api-key", "--ssl-keyfile", "--ssl-certfile"),
    "vox-box": ("--port", "--host"),
    "llama-server": ("--port", "--host", "--api-key", "--api-key-file", "--ssl-key-file",
                     "--ssl-cert-file"),
    "llama-box": ("--port", "--host"),
}
# other options of each server that start like the watched ones, so that the
# reference argparse parsers see the same ambiguities the real ones do
OTHERS = {
    "vllm": ("--pipeline-parallel-size", "--hf-overrides", "--allowed-origins",
             "--ssl-ca-certs", "--uvicorn-log-level", "--dtype"),
    "sglang": ("--page-size", "--host-kv-cache", "--admin-api-key", "--ssl-ca-certs",
               "--dtype"),
    "vox-box": ("--huggingface-repo-id", "--device", "--data-dir"),
    "llama-server": ("--path", "--api-prefix", "--alias", "--dtype"),
    "llama-box": ("--alias", "--dtype", "--threads-http"),
}


class _RefusedError(Exception):
    pass


class _Argparse(argparse.ArgumentParser):
    def error(self, message: str):
        raise _RefusedError(message)


def argparse_reads(argv: list[str], options: tuple[str, ...]) -> dict[str, str] | None:
    """What Python's argparse (SGLang, vox-box) gives each option, or None: refused."""
    p = _Argparse(add_help=False)
    for opt in options:
        p.add_argument(opt, dest=opt)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns = p.parse_args(argv)
    except _RefusedError:
        return None
    return {k: v for k, v in vars(ns).items() if v is not None}


def vllm_reads(argv: list[str], options: tuple[str, ...]) -> dict[str, str] | None:
    """vLLM's FlexibleArgumentParser: '_' -> '-' in the name of every word that
    starts with '--' (up to '=' or '.'), then argparse. Dotted words are JSON
    syntax this reference does not model: refused."""
    out = []
    for word in argv:
        if word.startswith("--"):
            key, eq, value = word.partition("=")
            if "." in key:
                return None
            out.append(key.replace("_", "-") + eq + value)
        else:
            out.append(word)
    return argparse_reads(out, options)


def llama_reads(argv: list[str], options: tuple[str, ...], *,
                underscores: bool) -> dict[str, str] | None:
    """llama.cpp's common/arg.cpp (underscores) and llama-box: exact names,
    the next word is the value whatever it is, anything else is an error."""
    got: dict[str, str] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if underscores and word.startswith("--"):
            word = word.replace("_", "-")
        if word not in options or i + 1 >= len(argv):
            return None
        got[word] = argv[i + 1]
        i += 2
    return got


Reader = Callable[[list[str], tuple[str, ...]], dict[str, str] | None]
READERS: dict[str, Reader] = {
    "vllm": vllm_reads,
    "sglang": argparse_reads,
    "vox-box": argparse_reads,
    "llama-server": lambda a, o: llama_reads(a, o, underscores=True),
    "llama-box": lambda a, o: llama_reads(a, o, underscores=False),
}


@st.composite
def spelling(draw: st.DrawFn, option: str) -> str:
    """A way of writing ``option`` that some server might read."""
    name = option
    style = draw(st.sampled_from(["as is", "underscores", "underscores", "prefix", "both"]))
    if style in ("underscores", "both"):
        name = "--" + "".join(ch if ch != "-" or not draw(st.booleans()) else "_"
                              for ch in name[2:])
    if style in ("prefix", "both"):
        name = name[:draw(st.integers(3, len(name)))]
    return name


@st.composite
def argv_for(draw: st.DrawFn, backend: str) -> list[str]:
    words: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        option = draw(st.sampled_from(WATCHED[backend] + OTHERS[backend]))
        name = draw(spelling(option))
        value = draw(st.sampled_from(["9000", "0.0.0.0", "sk-1", "-x1", "/k.pem"]))
        joined = draw(st.sampled_from([False, False, True]))
        words += [f"{name}={value}"] if joined else [name, value]
    return words


def scanned(backend: str, argv: list[str]) -> dict[str, str] | None:
    """What unitgen's scan makes of ``argv``, per option, from the plan: None if refused."""
    from unitgen.spec.argscan import find_options  # noqa: PLC0415
    from unitgen.spec.backends import get_backend  # noqa: PLC0415

    b = get_backend(backend)
    return {f.flag: f.value or "" for f in find_options(tuple(argv), WATCHED[backend], b.syntax)}


@pytest.mark.parametrize("backend", list(WATCHED))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_scan_finds_every_option_the_server_reads(backend, data):
    argv = data.draw(argv_for(backend))
    reads = READERS[backend](argv, WATCHED[backend] + OTHERS[backend])
    if reads is None:
        return  # the server refuses this argv: it never runs with it
    found = scanned(backend, argv)
    assert found is not None
    for option in WATCHED[backend]:
        if option in reads:
            assert found.get(option) == reads[option], (argv, reads, found)
