"""What a Ray cluster can hold: the nodes that are up now and, where an autoscaler runs, the nodes
it may add. "Can these workers ever be placed?" is decided per node shape against the cluster at
its largest, so a request that only an autoscaled node holds starts and waits for it, and only
what can never fit is refused. Where the node types cannot be known, nothing is refused: the run
starts (as Ray Train does) and the autoscaler's own reports end a wait that cannot succeed.

Where the node types come from (Ray 2.60), in this order:

1. the running autoscaler: the cluster config in Ray's GCS (``get_cluster_config()``, which Ray
   Train V2 and Ray Data read; filled by an autoscaler that reports it, which Ray 2.60's own do
   not), else its monitor's ``--autoscaling-config`` where the monitor runs on this driver's
   node (the head of a ``ray up`` cluster), else, in a KubeRay pod, the RayCluster resource
   (node_types.py);
2. the ``node_types`` config key: a cluster.yaml or RayCluster/RayJob manifest (a driver off the
   head, or a pod without access to the Kubernetes API); where the running autoscaler's config is
   found too and differs, that is said once and the running one is used;
3. a monitor without an autoscaling config, or Ray's readonly report: no autoscaler, the cluster
   is the nodes up now;
4. none of these: unknown; said once, and nothing is refused.

A live node's type is the one the autoscaler gives it (by node IP under v1, by node id under v2:
autoscaler_status.py), else the one type of its shape, else, where several types share its shape,
one of them that still has room.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .autoscaler_status import AutoscalerStatus

from .resources import format_resources

HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node: a tiny request pins work there
EPS = 1e-9


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
    known: bool = True  # False: the node types could not be read (kinds: the nodes up now); nothing is refused
    note: str = ""  # why they are unknown, said once by the command

    @property
    def autoscaling(self) -> bool:
        """Whether nodes may be added: an autoscaler's node types with room, or types unknown."""
        return not self.known or any(k.most > k.up for k in self.kinds)

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
        the cluster), or when the node types are unknown."""
        if not self.known:
            return None
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
                            status: "AutoscalerStatus | None" = None, source: str = "") -> Capacity:
    """The capacity an autoscaler with ``config`` (a cluster launcher mapping) gives, with the
    ``live`` nodes (``ray.nodes()`` entries) counted against their types: the type the autoscaler's
    ``status`` gives each, else the type of its shape (see the module docstring)."""
    from .autoscaler_status import AutoscalerStatus, unique_ips

    live = list(live)
    status = status or AutoscalerStatus()
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    most = {name: float((spec or {}).get("max_workers", 0 if name == head else config.get("max_workers", 0)))
            + (1 if name == head else 0) for name, spec in types.items()}
    up: dict[str, int] = {}
    untyped = []
    unique = unique_ips(live)
    for node in live:
        name = status.node_type(node, node.get("NodeManagerAddress", "") in unique)
        if name not in types and head and HEAD_RESOURCE in (node.get("Resources") or {}):
            name = head
        if name not in types:
            name = _type_by_shape(node, types, up, most)
        if name is None:
            untyped.append(node)
        else:
            up[name] = up.get(name, 0) + 1
    kinds = []
    for name, spec in types.items():
        resources = (spec or {}).get("resources")
        declared = None if resources is None else {k: float(v) for k, v in resources.items() if k != "memory"}
        if declared is not None and name == head:
            declared[HEAD_RESOURCE] = 1.0
        kinds.append(NodeKind(name, declared, up=up.get(name, 0), most=max(most[name], up.get(name, 0))))
    kinds += [NodeKind(f"node {n.get('NodeID', '')[:8]}", _declared(n), up=1, most=1) for n in untyped]
    max_workers = config.get("max_workers")
    return Capacity(tuple(kinds), max_nodes=math.inf if max_workers is None else int(max_workers) + 1, source=source)


def _type_by_shape(node: dict[str, Any], types: dict[str, Any], up: dict[str, int], most: dict[str, float]):
    """The node type of ``node``'s shape; where several types share it, the first with room left."""
    same = [t for t, spec in types.items() if _same_shape(node, (spec or {}).get("resources"))]
    return next((t for t in same if up.get(t, 0) < most[t]), same[0] if same else None)


def from_cluster_config(config, live: Iterable[dict[str, Any]] = (), status: "AutoscalerStatus | None" = None) -> Capacity:
    """The capacity in Ray's GCS cluster config (``autoscaler_pb2.ClusterConfig``)."""
    types = {g.name or f"group{i}": {"resources": dict(g.resources),
                                     "max_workers": math.inf if g.max_count == -1 else g.max_count}
             for i, g in enumerate(config.node_group_configs)}
    capacity = from_autoscaling_config({"available_node_types": types}, live, status, source="Ray's cluster config")
    return Capacity(capacity.kinds, max_resources={k: float(v) for k, v in config.max_resources.items()},
                    source=capacity.source)


def present(live: Iterable[dict[str, Any]], known: bool = True, note: str = "") -> Capacity:
    """The nodes that are up now, each its own kind (``known``: and no other node can be added)."""
    kinds = [NodeKind(f"node {n.get('NodeManagerAddress', '?')}" + ("" if i == 0 else f" #{i + 1}"), _declared(n),
                      up=1, most=1) for i, n in enumerate(live)]
    return Capacity(tuple(kinds), known=known, note=note)


def _declared(node: dict[str, Any]) -> dict[str, float]:
    """A live node's schedulable resources (CPU, GPU, custom), without Ray's bookkeeping ones."""
    return {k: float(v) for k, v in (node.get("Resources") or {}).items() if k == HEAD_RESOURCE or (
        not k.startswith("node:") and k not in ("memory", "object_store_memory") and "_group_" not in k)}


def _same_shape(node: dict[str, Any], declared: dict[str, Any] | None) -> bool:
    if not declared:
        return False
    have = _declared(node)
    return HEAD_RESOURCE not in have and all(abs(have.get(k, 0.0) - float(v)) < EPS
                                             for k, v in declared.items() if k != "memory")


NO_SOURCE = ("the cluster's node types are unknown here (no node_types key, no cluster config in Ray's GCS, {monitor}, "
             "{kuberay}): starting without a capacity check; the autoscaler decides whether the workers can be placed")


def read_capacity(node_types: str = "") -> Capacity:
    """This cluster's capacity (Ray must be initialised), from the sources in the module
    docstring; ``node_types`` is the config key's file (empty: none)."""
    import ray
    from ray._private.state import state

    from . import node_types as sources
    from .autoscaler_status import read_status

    live = [n for n in ray.nodes() if n.get("Alive")]
    status = read_status()
    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return from_cluster_config(config, live, status)
    declared = sources.from_file(node_types) if node_types else None
    context = ray.get_runtime_context()
    mine = next((n for n in live if n["NodeID"] == context.get_node_id()), {})
    running = sources.on_this_node(context.gcs_address, mine.get("NodeManagerAddress", ""))
    monitor = "no autoscaler monitor on this node"
    if isinstance(running, str):
        running, monitor = None, running
    kuberay = "not in a KubeRay pod"
    if running is None and (pod := sources.in_kuberay_pod()):
        running = sources.from_kubernetes(*pod)
        if isinstance(running, str):
            running, kuberay = None, running
    if isinstance(running, sources.NodeTypes):
        if declared is not None and (differs := sources.differences(declared, running)):
            sys.stderr.write(f"warning: node_types differs from the running autoscaler's ({differs}); "
                             f"using the running autoscaler's\n")
        chosen = running
    else:
        chosen = declared
    if chosen is not None:
        return from_autoscaling_config(chosen.config, live, status, source=chosen.source)
    if running == sources.STATIC or status.readonly:
        return present(live)
    return present(live, known=False, note=NO_SOURCE.format(monitor=monitor, kuberay=kuberay))
