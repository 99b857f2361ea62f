"""What a Ray cluster can hold: the nodes that are up now and, where an autoscaler runs, the nodes
it may add. "Can these workers ever be placed?" is decided per node shape against the cluster at
its largest, so a request that only an autoscaled node holds starts and waits for it, and only
what can never fit is refused.

Where the node types come from (Ray 2.60), in this order:

1. the cluster config in Ray's GCS, ``ray._private.state.state.get_cluster_config()``: the
   autoscaler's node groups with their resources and max counts, which Ray Train V2 (its worker
   group's insufficient-resources check) and Ray Data read; filled by an autoscaler that reports
   it (Ray 2.60's own monitor, the one ``ray up`` and ``fake_multinode`` run, does not);
2. the autoscaling config that this cluster's autoscaler runs with: the head's ``monitor.py
   --autoscaling-config=FILE`` for this cluster's GCS address, in the head node's process table
   (``ray up`` writes it as ``~/ray_bootstrap_config.yaml``; ``ray job submit`` runs drivers on
   the head), or the file named by ``PACO_RAY_AUTOSCALING_CONFIG``;
3. neither: no autoscaler; the cluster is the nodes that are up now.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

AUTOSCALING_CONFIG_ENV = "PACO_RAY_AUTOSCALING_CONFIG"
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node: a tiny request pins work there
MONITORS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
EPS = 1e-9


def format_resources(resources: dict[str, float]) -> str:
    """``{GPU: 1, CPU: 8}``: accelerators first, then CPU, then the rest."""
    order = sorted((r for r in resources if not r.startswith("node:")), key=lambda r: (r != "GPU", r != "CPU", r))
    return "{" + ", ".join(f"{r}: {resources[r]:g}" for r in order) + "}"


@dataclass(frozen=True)
class NodeKind:
    """Nodes of one shape: a node type of the autoscaler, or one node that is up."""
    name: str
    resources: dict[str, float] | None  # None: not declared (assumed to hold any request)
    up: int = 0                         # such nodes up now
    most: float = 0                     # most such nodes at once (math.inf: no limit)

    def copies(self, bundle: dict[str, float]) -> float:
        """How many ``bundle``s one node of this kind holds."""
        if self.resources is None:
            return math.inf
        held = math.inf
        for name, amount in bundle.items():
            if amount > 0:
                held = min(held, math.floor((self.resources.get(name, 0.0) + EPS) / amount))
        return held

    def describe(self) -> str:
        shape = "(resources not declared)" if self.resources is None else format_resources(self.resources)
        if self.most == self.up:
            return f"{self.name} {shape}" + (f" x {self.up}" if self.up > 1 else "")
        most = "no limit" if math.isinf(self.most) else f"up to {self.most:g}"
        return f"{self.name} {shape} ({most}, {self.up} up)"


@dataclass(frozen=True)
class Capacity:
    """The cluster at its largest: node kinds, a cap on the number of nodes (head included) and a
    cap per resource (Ray's cluster config ``max_resources``)."""
    kinds: tuple[NodeKind, ...]
    max_nodes: float = math.inf
    max_resources: dict[str, float] = field(default_factory=dict)
    source: str = ""  # where the node types were read; "" for the nodes up now

    @property
    def autoscaling(self) -> bool:
        return any(k.most > k.up for k in self.kinds)

    @property
    def what(self) -> str:
        return "node type" if self.autoscaling else "node"

    def largest(self, bundle: dict[str, float]) -> list[tuple[NodeKind, float, bool]]:
        """(kind, nodes, launched) of the largest cluster for ``bundle``: every node up now, then
        the nodes the autoscaler may launch, those holding the most bundles first, within
        ``max_nodes``."""
        chosen = [(k, float(k.up), False) for k in self.kinds if k.up]
        room = self.max_nodes - sum(k.up for k in self.kinds)
        for kind in sorted(self.kinds, key=lambda k: -k.copies(bundle)):
            extra = min(kind.most - kind.up, room)
            if extra > 0:
                chosen.append((kind, extra, True))
                room -= extra
        return chosen

    def slots(self, bundle: dict[str, float]) -> float:
        """Most ``bundle``s placeable at once (soft placement: any node)."""
        total = 0.0
        for kind, nodes, _ in self.largest(bundle):
            copies = kind.copies(bundle)
            if copies:
                total += copies * nodes
        for name, limit in self.max_resources.items():
            if bundle.get(name, 0) > 0:
                total = min(total, math.floor((limit + EPS) / bundle[name]))
        return total

    def nodes_holding(self, bundle: dict[str, float], count: int = 1) -> float:
        """Most nodes that can each hold ``count`` bundles at once."""
        return sum(nodes for kind, nodes, _ in self.largest(bundle) if kind.copies(bundle) >= count)

    def kinds_text(self) -> str:
        listed = "; ".join(k.describe() for k in self.kinds)
        cap = "" if math.isinf(self.max_nodes) else f"; at most {self.max_nodes - 1:g} worker nodes"
        return listed + cap + (f" (from {self.source})" if self.source else "")

    def placement_problem(self, bundle: dict[str, float], workers: int, strategy: str = "PACK") -> str | None:
        """Why ``workers`` x ``bundle`` can never be placed with ``strategy``, in one line naming
        the resource and the node kinds; None when they can (now or once the autoscaler grows
        the cluster)."""
        if not any(k.copies(bundle) >= 1 and k.most >= 1 for k in self.kinds):
            known = [k.resources for k in self.kinds if k.resources is not None]
            short = [r for r, a in bundle.items() if a > max((res.get(r, 0.0) for res in known), default=0) + EPS]
            what = " and ".join(short) if short else " and ".join(bundle) + " together"
            return (f"workers: one worker needs {format_resources(bundle)} but no {self.what} has that much "
                    f"{what}: {self.kinds_text()}")
        if strategy == "STRICT_SPREAD":
            nodes = self.nodes_holding(bundle)
            if workers > nodes:
                return (f"placement_strategy: STRICT_SPREAD puts each of the {workers} workers on its own node but "
                        f"the cluster {'may have' if self.autoscaling else 'has'} {nodes:g} that hold one "
                        f"({format_resources(bundle)}): {self.kinds_text()}")
        elif strategy == "STRICT_PACK":
            most = max((k.copies(bundle) for k in self.kinds if k.most >= 1), default=0)
            if workers > most:
                return (f"placement_strategy: STRICT_PACK puts all {workers} workers on one node but no {self.what} "
                        f"holds more than {most:g} of {format_resources(bundle)}: {self.kinds_text()}")
        slots = self.slots(bundle)
        if workers > slots:
            return (f"workers: {workers} workers x {format_resources(bundle)} exceed what the cluster can "
                    f"{'ever ' if self.autoscaling else ''}hold ({slots:g}): {self.kinds_text()}")
        return None

    def fits(self, bundles: list[dict[str, float]], spread: dict[str, float] | None = None) -> bool:
        """Whether every bundle can be placed at once in the largest cluster (first fit, largest
        bundles first; nodes chosen by how many ``spread`` bundles they hold)."""
        free: list[dict[str, float] | None] = []  # nodes in use: what each has left
        spare: list[list] = []  # [kind, nodes the autoscaler may still launch]
        for kind, nodes, launched in self.largest(spread or bundles[0]):
            if launched:
                spare.append([kind, min(nodes, len(bundles))])
            else:
                free += [None if kind.resources is None else dict(kind.resources) for _ in range(int(nodes))]
        for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
            if not _place(bundle, free, spare):
                return False
        return True


def _place(bundle: dict[str, float], free: list, spare: list) -> bool:
    """Put ``bundle`` on the first node with room, starting an autoscaled node when none has."""
    for node in free:
        if node is None:
            return True
        if all(node.get(r, 0.0) + EPS >= a for r, a in bundle.items()):
            for r, a in bundle.items():
                node[r] = node.get(r, 0.0) - a
            return True
    for entry in spare:
        kind, left = entry
        if left > 0 and kind.copies(bundle) >= 1:
            entry[1] -= 1
            free.append(None if kind.resources is None else dict(kind.resources))
            return _place(bundle, free[-1:], [])
    return False


# ----------------------------------------------------------------------------- reading it from Ray


def from_autoscaling_config(config: dict[str, Any], live: Iterable[dict[str, Any]] = (),
                            types_by_node: dict[str, str] | None = None, source: str = "") -> Capacity:
    """The capacity an autoscaler with ``config`` (a cluster launcher YAML as a mapping) gives,
    with ``live`` nodes (``ray.nodes()`` entries) counted against their types."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    up = _count_live(live, types, head, types_by_node or {})
    kinds = []
    for name, spec in types.items():
        spec = spec or {}
        resources = spec.get("resources")
        most = float(spec.get("max_workers", 0 if name == head else config.get("max_workers", 0)))
        declared = None if resources is None else {k: float(v) for k, v in resources.items()}
        if declared is not None and name == head:
            declared[HEAD_RESOURCE] = 1.0
        kinds.append(NodeKind(name, declared, up=up.get(name, 0), most=most + (1 if name == head else 0)))
    extra = [NodeKind(f"node {node_id[:8]}", _declared(n), up=1, most=1) for node_id, n in up.get(None, [])]
    max_workers = config.get("max_workers")
    return Capacity(tuple(kinds + extra), max_nodes=math.inf if max_workers is None else int(max_workers) + 1,
                    source=source)


def from_cluster_config(config, live: Iterable[dict[str, Any]] = ()) -> Capacity:
    """The capacity in Ray's GCS cluster config (``autoscaler_pb2.ClusterConfig``)."""
    types = {g.name or f"group{i}": {"resources": dict(g.resources),
                                     "max_workers": math.inf if g.max_count == -1 else g.max_count}
             for i, g in enumerate(config.node_group_configs)}
    up = _count_live(live, types, None, {})
    kinds = [NodeKind(name, {k: float(v) for k, v in spec["resources"].items()}, up=up.get(name, 0),
                      most=max(float(spec["max_workers"]), up.get(name, 0))) for name, spec in types.items()]
    kinds += [NodeKind(f"node {node_id[:8]}", _declared(n), up=1, most=1) for node_id, n in up.get(None, [])]
    return Capacity(tuple(kinds), max_resources={k: float(v) for k, v in config.max_resources.items()},
                    source="Ray's cluster config")


def present(live: Iterable[dict[str, Any]]) -> Capacity:
    """The nodes that are up now, each its own kind."""
    kinds = [NodeKind(f"node {n.get('NodeManagerAddress', '?')}" + ("" if i == 0 else f" #{i + 1}"), _declared(n),
                      up=1, most=1) for i, n in enumerate(live)]
    return Capacity(tuple(kinds))


def _declared(node: dict[str, Any]) -> dict[str, float]:
    """A live node's schedulable resources (CPU, GPU, custom), without Ray's bookkeeping ones."""
    return {k: float(v) for k, v in (node.get("Resources") or {}).items() if k == HEAD_RESOURCE or (
        not k.startswith("node:") and k not in ("memory", "object_store_memory") and "_group_" not in k)}


def _count_live(live, types: dict[str, Any], head: str | None, types_by_node: dict[str, str]) -> dict:
    """{type name: live nodes of that type, None: [(node id, node) of no known type]}."""
    counts: dict = {}
    for node in live:
        node_id = node.get("NodeID", "")
        name = types_by_node.get(node_id)
        if name is None and head and "node:__internal_head__" in (node.get("Resources") or {}):
            name = head
        if name is None:
            name = next((t for t, spec in types.items() if _same_shape(node, (spec or {}).get("resources"))), None)
        if name is None or name not in types:
            counts.setdefault(None, []).append((node_id, node))
        else:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _same_shape(node: dict[str, Any], declared: dict[str, Any] | None) -> bool:
    if not declared:
        return False
    have = _declared(node)
    return HEAD_RESOURCE not in have and all(abs(have.get(k, 0.0) - float(v)) < EPS for k, v in declared.items())


def read_capacity() -> Capacity:
    """This cluster's capacity (Ray must be initialised): Ray's cluster config, else the
    autoscaler's own config, else the nodes up now (see the module docstring)."""
    import ray
    from ray._private.state import state

    live = [n for n in ray.nodes() if n.get("Alive")]
    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return from_cluster_config(config, live)
    path = os.environ.get(AUTOSCALING_CONFIG_ENV) or monitor_config_path(ray.get_runtime_context().gcs_address)
    if path:
        return from_autoscaling_config(load_yaml(path), live, autoscaler_report().get("node_type_mapping") or {},
                                       source=f"the autoscaler's config {path}")
    return present(live)


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    from .schema import ConfigError

    try:
        with open(os.path.expanduser(path)) as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{AUTOSCALING_CONFIG_ENV}: cannot read the autoscaling config {path} "
                          f"({type(err).__name__})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{AUTOSCALING_CONFIG_ENV}: {path} is not a cluster config mapping")
    return loaded


def monitor_config_path(gcs_address: str) -> str | None:
    """The ``--autoscaling-config`` of the autoscaler monitoring ``gcs_address`` on this machine."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if not any(m in arg for arg in args for m in MONITORS) or f"--gcs-address={gcs_address}" not in args:
            continue
        for arg in args:
            if arg.startswith("--autoscaling-config="):
                return os.path.expanduser(arg.split("=", 1)[1])
    return None


def autoscaler_report() -> dict[str, Any]:
    """The autoscaler's latest status report (pending and failed launches, node types by node
    id), as ``ray status`` reads it; {} without one."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return {}
    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except Exception:  # a status is a nicety: never fail a run over it
        return {}


def autoscaler_activity(report: dict[str, Any]) -> str:
    """What the autoscaler is doing, in a few words: nodes launching, nodes that failed."""
    parts = []
    pending = dict(report.get("pending_launches") or {})
    for _, node_type, *_ in report.get("pending_nodes") or []:
        pending[node_type] = pending.get(node_type, 0) + 1
    if pending:
        parts.append("the autoscaler is launching " + ", ".join(f"{n} {t}" for t, n in sorted(pending.items())))
    failed = report.get("failed_nodes") or []
    if failed:
        parts.append(f"{len(failed)} launch(es) failed: " + ", ".join(str(f[1]) for f in failed[:3]))
    return "; ".join(parts) if parts else "no launch in progress"
