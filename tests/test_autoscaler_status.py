"""What the autoscaler says, without Ray running: v1's JSON report and v2's GetClusterStatus reply
in the formats Ray 2.60 writes them (the reply built with Ray's own protobuf classes), node types
matched as Ray keys them (by IP under v1, by node id under v2, with IPs that differ from the node
ids), and the capacity of a cluster whose node types share a shape."""
import math

import pytest
import yaml

from paco_ray.autoscaler_status import AutoscalerStatus, from_v1_report, from_v2_reply
from paco_ray.capacity import from_autoscaling_config

HEAD_ID, A_ID, B_ID, C_ID = "f" * 56, "a" * 56, "b" * 56, "c" * 56


def node(node_id: str, ip: str, resources: dict, head: bool = False) -> dict:
    """A ray.nodes() entry."""
    extra = {"node:__internal_head__": 1.0} if head else {}
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": ip,
            "Resources": {**resources, "memory": 1e10, f"node:{ip}": 1.0, **extra}}


# two worker types of one shape (spot and on-demand), as on AWS
CONFIG = {"max_workers": 6, "head_node_type": "head",
          "available_node_types": {"head": {"resources": {"CPU": 8}, "max_workers": 0},
                                   "gpu_spot": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 4},
                                   "gpu_ondemand": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2}}}
LIVE = [node(HEAD_ID, "10.0.0.1", {"CPU": 8}, head=True), node(A_ID, "10.0.1.5", {"CPU": 4, "GPU": 1}),
        node(B_ID, "10.0.1.6", {"CPU": 4, "GPU": 1}), node(C_ID, "10.0.1.7", {"CPU": 4, "GPU": 1})]


def v1_report(**overrides) -> dict:
    """autoscaler v1's ``autoscaler_report`` (dataclasses.asdict of AutoscalerSummary)."""
    report = {"active_nodes": {"head": 1, "gpu_ondemand": 3}, "idle_nodes": None, "pending_nodes": [],
              "pending_launches": {}, "failed_nodes": [], "node_activities": None, "pending_resources": {},
              "node_availability_summary": {"node_availabilities": {}}, "legacy": True,
              "node_type_mapping": {"10.0.0.1": "head", "10.0.1.5": "gpu_ondemand", "10.0.1.6": "gpu_ondemand",
                                    "10.0.1.7": "gpu_spot"}}
    report.update(overrides)
    return report


def test_v1_node_types_are_matched_by_ip_not_by_node_id():
    status = from_v1_report(v1_report())
    assert status.version == "v1" and not status.readonly
    capacity = from_autoscaling_config(CONFIG, LIVE, status)
    up = {k.name: (k.up, k.most) for k in capacity.kinds}
    assert up == {"head": (1, 1), "gpu_spot": (1, 4), "gpu_ondemand": (2, 2)}
    # a lookup by node id in that mapping finds nothing: the types then come from the shape alone
    by_id = from_autoscaling_config(CONFIG, LIVE, AutoscalerStatus("v1", types_by_ip={n["NodeID"]: "gpu_ondemand"
                                                                                     for n in LIVE[1:]}))
    assert {k.name: k.up for k in by_id.kinds} == {"head": 1, "gpu_spot": 3, "gpu_ondemand": 0}
    # 6 worker nodes at most: the 3 up and 3 more spot ones (on-demand is at its 2)
    assert capacity.slots({"CPU": 1, "GPU": 1}) == 6
    assert [k.most - k.up for k in capacity.kinds] == [0, 3, 0]


def test_without_a_report_types_of_one_shape_fill_the_one_with_room_first():
    capacity = from_autoscaling_config(CONFIG, LIVE, AutoscalerStatus())
    up = {k.name: k.up for k in capacity.kinds}
    # three nodes of the shared shape: none is counted beyond its type's max_workers
    assert up["gpu_spot"] + up["gpu_ondemand"] == 3 and all(k.up <= k.most for k in capacity.kinds)


def test_a_shared_ip_is_not_used_to_name_a_type():
    two_on_one_machine = [LIVE[0], node(A_ID, "10.0.1.5", {"CPU": 4, "GPU": 1}),
                          node(B_ID, "10.0.1.5", {"CPU": 4, "GPU": 1})]
    status = from_v1_report(v1_report(node_type_mapping={"10.0.1.5": "gpu_ondemand"}))
    assert status.node_type(two_on_one_machine[1], ip_unique=False) is None
    capacity = from_autoscaling_config(CONFIG, two_on_one_machine, status)
    assert sum(k.up for k in capacity.kinds if k.name.startswith("gpu")) == 2


def test_v1_launches_and_the_clouds_reason_for_a_failed_one():
    report = v1_report(pending_launches={"gpu_spot": 2, "gpu_ondemand": 0, "gpu_large": 1},
                       pending_nodes=[["10.0.1.9", "gpu_spot", "setting-up"]],
                       node_availability_summary={"node_availabilities": {
                           "gpu_large": {"node_type": "gpu_large", "is_available": False,
                                        "last_checked_timestamp": 1796348909.0,
                                        "unavailable_node_information": {
                                            "category": "InsufficientInstanceCapacity",
                                            "description": "We currently do not have sufficient g5.12xlarge capacity"}},
                           "gpu_ondemand": {"node_type": "gpu_ondemand", "is_available": True,
                                            "last_checked_timestamp": 1796348909.0,
                                            "unavailable_node_information": None}}})
    status = from_v1_report(report)
    assert status.launching == {"gpu_spot": 3, "gpu_large": 1}
    # a type whose launch failed is retried: said once, as failed
    assert status.activity() == ("the autoscaler is launching 3 gpu_spot; launching gpu_large failed: "
                                 "InsufficientInstanceCapacity: We currently do not have sufficient g5.12xlarge "
                                 "capacity")
    assert from_v1_report(v1_report()).activity() == "no launch in progress"
    assert AutoscalerStatus().activity() == "no autoscaler report"


def v2_reply():
    """A GetClusterStatusReply as autoscaler v2 reports it (Ray's protobuf classes)."""
    from ray.core.generated import autoscaler_pb2 as pb

    reply = pb.GetClusterStatusReply()
    for node_id, ip, type_name, status in ((HEAD_ID, "10.0.0.1", "headgroup", pb.NodeStatus.RUNNING),
                                           (A_ID, "10.0.1.5", "gpu-ondemand", pb.NodeStatus.RUNNING),
                                           (C_ID, "10.0.1.7", "gpu-spot", pb.NodeStatus.IDLE)):
        state = reply.cluster_resource_state.node_states.add()
        state.node_id, state.node_ip_address, state.ray_node_type_name = bytes.fromhex(node_id), ip, type_name
        state.status = status
        state.total_resources["CPU"] = 4.0
    reply.autoscaling_state.pending_instance_requests.add(ray_node_type_name="gpu-spot", count=2)
    reply.autoscaling_state.failed_instance_requests.add(ray_node_type_name="gpu-large", count=1, reason="")
    reply.autoscaling_state.failed_instance_requests.add(ray_node_type_name="gpu-large", count=1, reason="")
    gang = reply.autoscaling_state.infeasible_gang_resource_requests.add()
    for _ in range(2):
        request = gang.requests.add()
        request.resources_bundle["CPU"] = 8.0
        request.resources_bundle["GPU"] = 1.0
    return reply


def test_v2_node_types_by_node_id_launches_failures_and_infeasible_groups():
    status = from_v2_reply(v2_reply())
    assert status.version == "v2"
    assert status.types_by_node_id == {HEAD_ID: "headgroup", A_ID: "gpu-ondemand", C_ID: "gpu-spot"}
    assert status.node_type(LIVE[3]) == "gpu-spot" and status.node_type(LIVE[2]) is None
    assert status.launching == {"gpu-spot": 2}
    assert status.reports_infeasible([{"GPU": 1, "CPU": 8}] * 2)
    assert not status.reports_infeasible([{"GPU": 1, "CPU": 8}] * 3)
    assert not status.reports_infeasible([{"GPU": 1, "CPU": 4}] * 2)
    assert status.activity() == ("the autoscaler is launching 2 gpu-spot; launching gpu-large failed 2 time(s): the "
                                 "autoscaler gives no reason; the autoscaler reports 2 x {GPU: 1, CPU: 8} infeasible "
                                 "(no node type it may launch holds them)")


def test_a_cluster_without_an_autoscaler_is_recognised_by_its_report():
    """Ray's readonly provider (a cluster started by ray.init or a plain `ray start`) names each
    node's type node_<its id>."""
    readonly = from_v1_report(v1_report(node_type_mapping={HEAD_ID: f"node_{HEAD_ID}"}))
    assert readonly.readonly and not from_v1_report(v1_report()).readonly


@pytest.mark.parametrize("max_workers", [None, 3])
def test_the_shipped_cluster_counts_live_nodes_against_their_reported_types(max_workers):
    from conftest import REPO

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    if max_workers is not None:
        cluster["max_workers"] = max_workers
    live = [node(HEAD_ID, "10.0.0.1", {"CPU": 8, "GPU": 0}, head=True), node(A_ID, "10.0.1.5", {"CPU": 48, "GPU": 4})]
    status = from_v1_report(v1_report(node_type_mapping={"10.0.0.1": "head", "10.0.1.5": "gpu_large"}))
    capacity = from_autoscaling_config(cluster, live, status)
    assert {k.name: k.up for k in capacity.kinds} == {"head": 1, "gpu_small": 0, "gpu_large": 1}
    workers = cluster["max_workers"]
    expected = min(4, workers) * 4 + max(0, min(8, workers - 4))  # gpu_large first: most GPU workers per node
    assert capacity.slots({"CPU": 1, "GPU": 1}) == expected
    assert not math.isinf(capacity.max_nodes)
