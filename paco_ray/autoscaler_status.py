"""What the cluster's autoscaler says it is doing, read the way ``ray status`` reads it (Ray 2.60):

- autoscaler v1 (``ray up``'s default): its JSON report in the GCS key-value store
  (``DEBUG_AUTOSCALING_STATUS``): node types by node IP, launches in progress, and launch
  failures with the cloud's reason (``node_availability_summary``: a denied ``iam:PassRole``,
  ``InsufficientInstanceCapacity``);
- autoscaler v2 (``RAY_enable_autoscaler_v2=1``; KubeRay's default): the GCS ``GetClusterStatus``
  reply (``ray.autoscaler.v2``): node types per node id, pending and failed launches, and the
  placement groups it cannot place on any node it may launch (``infeasible_gang_resource_requests``).

Nothing here fails a run: a status that cannot be read is an empty one.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from .resources import format_resources

READONLY_TYPE_PREFIX = "node_"  # Ray's name for each node of a cluster without an autoscaler: node_<node id>


@dataclass(frozen=True)
class AutoscalerStatus:
    version: str = ""  # "v1", "v2", or "" (no report)
    types_by_ip: dict[str, str] = field(default_factory=dict)       # v1 keys its node types by node IP
    types_by_node_id: dict[str, str] = field(default_factory=dict)  # v2 by node id (ray_node_type_name)
    launching: dict[str, int] = field(default_factory=dict)         # node type -> nodes being launched
    failures: tuple[str, ...] = ()   # "gpu_large failed: InsufficientInstanceCapacity: ..." (latest per type)
    failed_types: frozenset[str] = frozenset()
    infeasible: tuple[tuple[tuple[tuple[str, float], ...], ...], ...] = ()  # gang requests, bundles as sorted items

    @property
    def readonly(self) -> bool:
        """A report of a cluster without an autoscaler (Ray names each node's type node_<its id>
        there): the cluster is the nodes up now."""
        types = {**self.types_by_ip, **self.types_by_node_id}
        return bool(types) and all(t == f"{READONLY_TYPE_PREFIX}{key}" for key, t in types.items())

    def node_type(self, node: dict[str, Any], ip_unique: bool = True) -> str | None:
        """The node type the autoscaler gives a ``ray.nodes()`` entry: by node id under v2, by
        IP under v1 (only where no other live node shares the IP); None where it names none."""
        found = self.types_by_node_id.get(node.get("NodeID", ""))
        if found is None and ip_unique:
            found = self.types_by_ip.get(node.get("NodeManagerAddress", ""))
        return found

    def reports_infeasible(self, bundles: list[dict[str, float]]) -> bool:
        """Whether the autoscaler reports a placement group of exactly these bundles as one it
        cannot place on any node it may launch (v2)."""
        wanted = Counter(_bundle_key(b) for b in bundles)
        return any(Counter(gang) == wanted for gang in self.infeasible)

    def activity(self) -> str:
        """What the autoscaler is doing, in a few words: nodes launching, launches that failed
        and why, requests it reports it cannot place."""
        parts = []
        launching = {t: n for t, n in self.launching.items() if t not in self.failed_types}  # a failed type is retried
        if launching:
            parts.append("the autoscaler is launching " + ", ".join(f"{n} {t}" for t, n in sorted(launching.items())))
        if self.failures:
            parts.append("launching " + "; ".join(self.failures))
        for gang in self.infeasible[:2]:
            counts = Counter(gang)
            parts.append("the autoscaler reports " + " + ".join(
                f"{n} x {format_resources(dict(bundle))}" for bundle, n in counts.items())
                + " infeasible (no node type it may launch holds them)")
        if parts:
            return "; ".join(parts)
        return "no launch in progress" if self.version else "no autoscaler report"


def _bundle_key(bundle: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, float(v)) for k, v in bundle.items() if v))


def from_v1_report(report: dict[str, Any]) -> AutoscalerStatus:
    """The status in autoscaler v1's ``autoscaler_report`` (``AutoscalerSummary`` as a mapping)."""
    launching = Counter({t: n for t, n in (report.get("pending_launches") or {}).items() if n})
    for _, node_type, *_ in report.get("pending_nodes") or []:
        launching[node_type] += 1
    failures, failed = [], set()
    availability = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    for node_type, record in sorted(availability.items()):
        info = (record or {}).get("unavailable_node_information")
        if not record.get("is_available", True) and info:
            failures.append(f"{node_type} failed: {info.get('category', '?')}: {info.get('description', '')}".rstrip(": "))
            failed.add(node_type)
    failed_nodes = Counter(t for _, t in report.get("failed_nodes") or [])
    failures += [f"{t} failed: {n} node(s) failed to start" for t, n in sorted(failed_nodes.items())
                 if t not in availability]
    return AutoscalerStatus("v1", types_by_ip=dict(report.get("node_type_mapping") or {}),
                            launching=dict(launching), failures=tuple(failures), failed_types=frozenset(failed))


def from_v2_reply(reply) -> AutoscalerStatus:
    """The status in autoscaler v2's ``GetClusterStatusReply`` (as ``ray status`` parses it, plus
    the infeasible placement groups, which its text leaves out)."""
    from ray.autoscaler.v2.schema import Stats
    from ray.autoscaler.v2.utils import ClusterStatusParser

    status = ClusterStatusParser.from_get_cluster_status_reply(reply, stats=Stats())
    types = {n.node_id: n.ray_node_type_name for n in [*status.active_nodes, *status.idle_nodes] if n.node_id}
    launching = Counter()
    for launch in status.pending_launches:
        launching[launch.ray_node_type_name] += launch.count
    for node in status.pending_nodes:
        launching[node.ray_node_type_name] += 1
    failed: dict[str, list] = {}
    for launch in status.failed_launches:
        failed.setdefault(launch.ray_node_type_name, []).append(launch)
    failures = []
    for node_type, launches in sorted(failed.items()):
        reasons = [launch.details for launch in launches if launch.details]
        why = reasons[-1] if reasons else "the autoscaler gives no reason"
        failures.append(f"{node_type} failed {len(launches)} time(s): {why}")
    infeasible = tuple(tuple(_bundle_key(dict(r.resources_bundle)) for r in gang.requests)
                       for gang in reply.autoscaling_state.infeasible_gang_resource_requests)
    return AutoscalerStatus("v2", types_by_node_id=types, launching=dict(launching), failures=tuple(failures),
                            failed_types=frozenset(failed), infeasible=infeasible)


def read_status() -> AutoscalerStatus:
    """The running autoscaler's status (Ray must be initialised); empty without one."""
    try:
        import ray
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2():
            from ray._raylet import GcsClient
            from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

            reply = GetClusterStatusReply()
            reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
            return from_v2_reply(reply)
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if not _internal_kv_initialized():
            return AutoscalerStatus()
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report")
        return from_v1_report(report) if report else AutoscalerStatus()
    except Exception:  # a status is a courtesy: never fail a run over it
        return AutoscalerStatus()


def unique_ips(live: Iterable[dict[str, Any]]) -> set[str]:
    """The node IPs that only one live node has (several raylets on one machine share one)."""
    counts = Counter(n.get("NodeManagerAddress", "") for n in live)
    return {ip for ip, n in counts.items() if n == 1}
