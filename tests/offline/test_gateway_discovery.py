"""Prometheus discovery (issue 28, engine metrics): the file every ``deploy``
and ``remove`` rewrites lists each always-on instance whose engine exports
metrics and each gateway's exporter, with the labels the dashboard groups by;
never an on-demand instance (a scrape would start its model)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from unitgen.features.gateway.discovery import targets
from unitgen.features.gateway.ops import GatewayFeature
from unitgen.features.gateway.plan import GatewaySettings
from unitgen.ops.pipeline import Planned
from unitgen.plan.instance import resolve
from unitgen.plan.record import Record, record_of
from unitgen.spec.model import parse_spec

if TYPE_CHECKING:
    from unitgen.features.gateway.config import GatewayBinding


@dataclass
class Binding:
    """The part of a target's gateway binding discovery reads."""

    root: Path
    root_only: bool = False

    def directory(self, gateway: str) -> Path:
        return self.root / "gateways" / gateway

    def discovery_file(self) -> Path:
        return self.root / "prometheus" / "unitgen.json"

    def files(self, gateway: str, plan: object, where: object) -> list[object]:
        return []  # the gateways' own files: tests/offline/test_gateway.py

    def secret(self, instance: str, variable: str) -> None:
        return None

    def reload(self, gateway: str) -> None:
        return None  # not running


@dataclass
class Installed:
    name: str
    rec: Record


SPECS = {
    "qwen": ('backend = "vllm"\nmodel = "Qwen/Qwen2-7B-Instruct"\nport = 8001\n'
             'gateway = "gw"\n'),
    "lazy": ('backend = "vllm"\nmodel = "m"\nport = 8002\nactivation = "on-demand"\n'),
    "llama": 'backend = "llama-server"\nmodel = "/m/l.gguf"\nport = 8003\nargs = ["--metrics"]\n',
    "quiet": 'backend = "llama-server"\nmodel = "/m/q.gguf"\nport = 8004\n',
    "sg": 'backend = "sglang"\nmodel = "s"\nport = 8005\nargs = ["--enable-metrics"]\n',
    "box": 'backend = "vox-box"\nmodel = "v"\nport = 8006\n',
}


def _planned(name: str, tmp: Path) -> Planned:
    spec = parse_spec(f'name = "{name}"\n' + SPECS[name], f"{name}.toml")
    return Planned(tmp / f"{name}.toml", resolve(spec), ())


def _gateway(binding: Binding, name: str, metrics: str | None, keys: str | None = None,
             api_keys: str | None = None) -> Installed:
    directory = binding.directory(name)
    directory.mkdir(parents=True)
    settings = GatewaySettings(name, metrics=metrics, metrics_keys_file=keys,
                               api_keys_file=api_keys)
    where = list(metrics.rsplit(":", 1)) if metrics else None
    (directory / "gateway.json").write_text(json.dumps({
        "settings": asdict(settings), "upstreams": [],
        "metrics": [where[0], int(where[1])] if where else None}))
    return Installed(name, Record(name=name, kind="gateway", public="0.0.0.0:8080",
                                  probe="127.0.0.1:8080"))


def test_eager_engines_and_exporters_are_listed_with_their_labels(tmp_path):
    binding = Binding(tmp_path)
    installed = {"gw": _gateway(binding, "gw", "127.0.0.1:9101"),
                 "gw2": _gateway(binding, "gw2", "0.0.0.0:9102", keys="/k", api_keys="/a"),
                 "gw3": _gateway(binding, "gw3", None)}
    feature = GatewayFeature(cast("GatewayBinding", binding))
    feature.plan(installed, [_planned(n, tmp_path) for n in SPECS])
    [(path, text)] = feature.files()
    assert path == binding.discovery_file() and text is not None
    found = json.loads(text)
    groups = {g["labels"]["instance"]: g for g in found if "/keys" not in str(g["labels"])}
    assert sorted(groups) == ["gw", "gw2", "llama", "qwen", "sg"]  # not lazy, quiet, box, gw3
    # a gateway with API keys: its counters per key are a target of their own
    [per_key] = [g for g in found if g["labels"].get("__metrics_path__") == "/metrics/keys"]
    assert per_key["targets"] == ["127.0.0.1:9102"] and per_key["labels"]["instance"] == "gw2"
    assert per_key["labels"]["auth"] == "bearer"  # behind the same keys as /metrics
    assert groups["qwen"]["targets"] == ["127.0.0.1:8001"]
    labels = groups["qwen"]["labels"]
    assert {k: labels[k] for k in ("backend", "model", "gateway", "__metrics_path__")} == {
        "backend": "vllm", "model": "Qwen/Qwen2-7B-Instruct", "gateway": "gw",
        "__metrics_path__": "/metrics"}
    assert labels["node"]
    assert groups["gw"]["targets"] == ["127.0.0.1:9101"]
    assert groups["gw"]["labels"]["gateway"] == "gw" and "auth" not in groups["gw"]["labels"]
    assert groups["gw2"]["labels"]["auth"] == "bearer"  # its /metrics wants a key
    assert groups["gw2"]["targets"] == ["127.0.0.1:9102"]  # a wildcard bind, on loopback

    # once written, the same run writes nothing; a remove rewrites it without the removed
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert feature.files() == []
    now = {**installed, **{n: Installed(n, record_of(_planned(n, tmp_path).instance))
                           for n in SPECS}}
    feature.before_remove(now, ["qwen", "gw2"])
    assert sorted(g["labels"]["instance"] for g in json.loads(path.read_text())) == [
        "gw", "llama", "sg"]


def test_an_instance_record_says_where_its_metrics_are(tmp_path):
    recs = {n: record_of(_planned(n, tmp_path).instance) for n in SPECS}
    assert {n: r.metrics for n, r in recs.items()} == {
        "qwen": "/metrics", "lazy": "/metrics", "llama": "/metrics", "quiet": "",
        "sg": "/metrics", "box": ""}
    assert recs["qwen"].model == "Qwen/Qwen2-7B-Instruct"
    assert targets([recs["lazy"]], {}, "h") == []  # on-demand: a scrape would start it
