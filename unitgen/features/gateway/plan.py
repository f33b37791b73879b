"""A gateway's routing plan: which instances join it, by which names, grouped
into replica sets, and how long a request may wait. Pure data, for every target
(the HAProxy configuration is rendered from it by :mod:`unitgen.features.gateway.render`).

A route name is what clients put in the body's ``model``: an instance's
``name`` and its ``aliases``. Instances that share a route name are replicas
(a conversation keeps to one of them, or fewest requests in flight: their
``balance``). Names reached by exactly the same
instances share one HAProxy backend, so an instance's concurrency bound
(``max_concurrent``) holds across its names as long as they lead to the same
replica set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from unitgen.features.gateway.spec import GatewaySpec, UpstreamSpec
from unitgen.features.swap.plan import turn_wait
from unitgen.plan.instance import CONFIG_DIR, Instance
from unitgen.spec.backends import BackendName
from unitgen.spec.keys import Balance
from unitgen.spec.model import HealthSpec, InstanceSpec
from unitgen.spec.ports import probe_host

__all__ = ["BALANCE_FACTOR", "GATEWAY_HEALTH", "ROUTE_NAME_RE", "GatewayPlan", "GatewaySettings",
           "Member", "Route", "balance_problems", "gateway_instance_spec", "member_key",
           "member_of", "metrics_of", "route_keys", "routes", "settings_of", "upstream_members"]

# What a route name may be: what an OpenAI client sends as ``model`` (Hugging Face
# ids included: "Qwen/Qwen2-7B-Instruct"); no blank or control character (a map
# file key is one word), at most 200 characters.
ROUTE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")

# A replica takes a conversation while its requests in flight stay under this
# share (in percent) of the route's average: the bound (no replica above
# 1.5x its share), and HAProxy's own hash-balance-factor's meaning.
BALANCE_FACTOR = 150


@dataclass(frozen=True)
class Member:
    """One instance behind a gateway."""

    instance: str
    address: str  # host:port the gateway connects to (the instance's public socket)
    names: tuple[str, ...]  # its route names: its name, then its aliases
    max_concurrent: int | None = None  # requests it takes at once; the rest queue
    wait: float = 1800.0  # how long an answer may take to start (a load, a swap)
    queue_timeout: float = 60.0  # how long a request may wait in the queue (then 429)
    on_demand: bool = False
    gateway: str = ""  # the gateway it joins
    # on another host (a spec's ``upstreams``): the gateway checks it (see
    # ``upstream_members``); a local member lives and dies with the gateway's host
    remote: bool = False
    # the variable of its secret file that holds its own API key (None: it has none),
    # or for one on another host the file that holds it; the key itself is never in
    # a Member (they are written to unit headers and gateway.json)
    key_env: str | None = None
    key_file: str | None = None
    balance: str = Balance.CONVERSATION.value  # how its replicas share requests

    @property
    def keyed(self) -> bool:
        """It has an API key of its own, which the gateway sends it."""
        return bool(self.key_env or self.key_file)

    @property
    def active_check(self) -> bool:
        """The gateway may connect to it on its own: never to an on-demand
        instance, whose socket would start it."""
        return self.remote and not self.on_demand


@dataclass(frozen=True)
class Route:
    """A replica set and the names that lead to it."""

    backend: str  # the HAProxy backend's name (r1, r2, ...)
    names: tuple[str, ...]
    members: tuple[Member, ...]

    @property
    def wait(self) -> float:
        """The longest any of its members may take to start answering."""
        return max(m.wait for m in self.members)

    @property
    def queue_timeout(self) -> float:
        """How long a request may queue for a member with a bound."""
        return max(m.queue_timeout for m in self.members)

    @property
    def bounded(self) -> bool:
        """Some member takes a limited number of requests at once."""
        return any(m.max_concurrent for m in self.members)

    @property
    def by_conversation(self) -> bool:
        """Its replicas are chosen by the conversation (not by fewest in flight):
        two or more, and every one says so (:func:`balance_problems` refuses a mix)."""
        return len(self.members) > 1 and all(
            m.balance == Balance.CONVERSATION for m in self.members)


@dataclass(frozen=True)
class GatewaySettings:
    """A gateway's own keys (its spec)."""

    name: str
    api_keys_file: str | None = None
    metrics: str | None = None  # host:port of the Prometheus exporter
    metrics_keys_file: str | None = None  # keys the exporter wants (beyond loopback)
    # the spec's defaults (declared once, in unitgen.features.gateway.spec)
    max_body: int = GatewaySpec.max_body  # bytes a body may have and still be routed
    max_connections: int = GatewaySpec.max_connections
    client_timeout: float = GatewaySpec.client_timeout  # a silent client is closed after
    request_timeout: float = GatewaySpec.request_timeout  # to send a whole request
    max_connections_per_client: int | None = None  # None: half of max_connections
    # when its keys files last changed (size and mtime, never their contents): a
    # changed keys file changes the settings, so deploying the gateway reloads it
    keys_stamp: str = ""

    @property
    def per_client(self) -> int:
        """Connections one client address may hold: never all of them."""
        return self.max_connections_per_client or max(1, self.max_connections // 2)


def routes(members: Iterable[Member]) -> list[Route]:
    """Route names grouped by the instances they reach, in a stable order."""
    by_name: dict[str, list[Member]] = {}
    for m in sorted(members, key=lambda m: m.instance):
        for name in m.names:
            by_name.setdefault(name, []).append(m)
    by_set: dict[tuple[str, ...], list[str]] = {}
    for name, ms in sorted(by_name.items()):
        by_set.setdefault(tuple(m.instance for m in ms), []).append(name)
    out: list[Route] = []
    for i, (instances, names) in enumerate(sorted(by_set.items(), key=lambda kv: kv[1]), 1):
        found = tuple(next(m for m in by_name[names[0]] if m.instance == inst)
                      for inst in instances)
        out.append(Route(f"r{i}", tuple(names), found))
    return out


@dataclass(frozen=True)
class GatewayPlan:
    """What a gateway instance carries besides its socket and service: its own
    settings and the instances it routes to."""

    settings: GatewaySettings
    members: tuple[Member, ...]
    metrics: tuple[str, int] | None = None  # host, port of the exporter's socket
    # member -> its own API key, for members that have one (secret: never shown)
    keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def routes(self) -> list[Route]:
        """Its routes (see :func:`routes`)."""
        return routes(self.members)


def route_keys(plan: GatewayPlan) -> tuple[dict[str, str], list[str]]:
    """The API key the gateway sends each backend (by backend name), and what
    keeps it from sending the right one. HAProxy sets a header before it picks
    a server, so a set of replicas shares one key: replicas with different keys,
    or a key and none (the others would receive it), are refused."""
    keys = dict(plan.keys)
    out: dict[str, str] = {}
    unread = {m.instance: m for m in plan.members if m.keyed and m.instance not in keys}
    problems = [f"the API key of {name} cannot be read from its api_key_file {m.key_file}"
                if m.key_file else f"the API key of {name} cannot be read from its secret "
                "file: deploy it again" for name, m in sorted(unread.items())]
    for r in plan.routes:
        if any(m.instance in unread for m in r.members):
            continue
        found = {keys.get(m.instance) if m.keyed else None for m in r.members}
        if len(found) > 1:
            problems.append(f"{', '.join(m.instance for m in r.members)} are replicas (route "
                            f"{', '.join(r.names)}) with different API keys, or a key and none: "
                            "the gateway sends one key to a set of replicas; give them the "
                            "same key")
        elif (key := found.pop()) is not None:
            out[r.backend] = key
    return out, problems


def balance_problems(plan: GatewayPlan) -> list[str]:
    """Replica sets whose members disagree on how they share requests: one
    backend has one way of choosing."""
    return [f"{', '.join(m.instance for m in r.members)} are replicas (route "
            f"{', '.join(r.names)}) with different balance "
            f"({', '.join(sorted({m.balance for m in r.members}))}): a set of replicas is "
            "chosen one way; give them the same balance"
            for r in plan.routes if len({m.balance for m in r.members}) > 1]


def member_of(inst: Instance) -> Member | None:
    """The gateway member an instance is (None: it joins no gateway)."""
    spec = inst.spec
    if spec.gateway is None:
        return None
    # how long it may take to start answering: its start deadline, and for a
    # swap-group member the turns of the others before it
    wait = inst.health_timeout + 30.0
    if spec.swap_group:
        wait = turn_wait(inst.health_timeout, spec.swap_drain)
    elif inst.pool is not None:
        # a pool member may wait for room: turns of others, each a minimum turn,
        # a drain and a load (TurnRules.max_wait), then its own load
        wait = turn_wait(inst.health_timeout + inst.pool.min_turn, spec.swap_drain)
    return Member(instance=spec.name,
                  address=f"{_bracket(probe_host(inst.public.host))}:{inst.public.port}",
                  names=(spec.name, *spec.aliases), max_concurrent=spec.max_concurrent,
                  wait=wait, queue_timeout=spec.queue_timeout,
                  on_demand=spec.activation == "on-demand", gateway=spec.gateway,
                  key_env=inst.probe_key_env if member_key(inst) is not None else None,
                  balance=Balance(spec.balance).value)


def member_key(inst: Instance) -> str | None:
    """An instance's own API key (the one its probe sends), or None."""
    return next((v for k, v in inst.secrets if k == inst.probe_key_env), None)


def upstream_members(g: GatewaySpec) -> list[Member]:
    """A gateway's members on other hosts (its ``upstreams``). The server name
    (``Member.instance``) is ``<node>_<name>``: stable across reloads and the
    same in every backend, so the runtime API drains a node by it."""
    return [_upstream(u, g.name) for u in g.upstreams]


def _upstream(u: UpstreamSpec, gateway: str) -> Member:
    return Member(instance=u.server, address=u.address, names=(u.name, *u.aliases),
                  max_concurrent=u.max_concurrent, wait=u.wait, queue_timeout=u.queue_timeout,
                  on_demand=u.on_demand, gateway=gateway, remote=True, key_file=u.api_key_file,
                  balance=Balance(u.balance).value)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def gateway_instance_spec(g: GatewaySpec) -> InstanceSpec:
    """The instance that runs a gateway: HAProxy, taking its socket from the
    manager (fd 3), ready when its own health path answers on that port."""
    return InstanceSpec(
        source=g.source, name=g.name, backend=BackendName("custom"),
        description=g.description or f"OpenAI gateway {g.name} (HAProxy)",
        host=g.host, port=g.port,
        command=("haproxy", "-Ws", "-f", f"{CONFIG_DIR}/unitgen/gateways/{g.name}/haproxy.cfg"),
        socket_activation=True, max_connections=g.max_connections,
        health=HealthSpec(path=GATEWAY_HEALTH, timeout=60.0, watchdog=30.0),
    )


GATEWAY_HEALTH = "/unitgen/health"


def settings_of(g: GatewaySpec) -> GatewaySettings:
    """A gateway spec's own keys, as the HAProxy renderer takes them."""
    return GatewaySettings(name=g.name, api_keys_file=g.api_keys_file, metrics=g.metrics,
                           metrics_keys_file=g.metrics_keys_file,
                           max_body=g.max_body, max_connections=g.max_connections,
                           client_timeout=g.client_timeout, request_timeout=g.request_timeout,
                           max_connections_per_client=g.max_connections_per_client)


def metrics_of(g: GatewaySpec) -> tuple[str, int] | None:
    """The exporter's listen address, or None."""
    if g.metrics is None:
        return None
    host, _, port = g.metrics.rpartition(":")
    return host.strip("[]"), int(port)
