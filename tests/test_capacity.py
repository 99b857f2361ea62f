"""What a cluster can hold, without Ray: the shipped cluster.yaml's node types at their largest, the
nodes up now, per-node shapes (not summed resources), and trial concurrency, each checked against
an independent brute-force count."""
import itertools
import re
import math
from pathlib import Path

import pytest
import yaml

from paco_ray.capacity import Capacity, NodeKind, from_autoscaling_config, present
from paco_ray.schema import ConfigError
from paco_ray.search_space import load_space
from paco_ray.tune import concurrency, scale_to_cluster

REPO = Path(__file__).resolve().parent.parent
def head(cpus: float = 8.0) -> dict:
    """A ray.nodes() entry of a head node."""
    return {"NodeID": "h" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1",
            "Resources": {"CPU": cpus, "memory": 1e10, "node:__internal_head__": 1.0, "node:10.0.0.1": 1.0}}


HEAD = head()


@pytest.fixture(scope="module")
def shipped():
    """cluster.yaml right after `ray up`: the head up, no worker node."""
    return from_autoscaling_config(yaml.safe_load((REPO / "cluster.yaml").read_text()), [HEAD])


def brute_force_slots(kinds: list[NodeKind], max_nodes: int, bundle: dict) -> int:
    """The most bundles any allowed set of nodes holds, by trying every count of every kind."""
    def copies(k):
        return min(int(k.resources.get(r, 0) // a) for r, a in bundle.items())
    best = 0
    for counts in itertools.product(*[range(int(k.most) + 1) for k in kinds]):
        if sum(counts) <= max_nodes and all(c >= k.up for c, k in zip(counts, kinds)):
            best = max(best, sum(c * copies(k) for c, k in zip(counts, kinds)))
    return best


def test_the_shipped_cluster_holds_gpu_work_only_once_the_autoscaler_adds_nodes(shipped):
    assert shipped.autoscaling and [k.up for k in shipped.kinds] == [1, 0, 0]
    imagenet = load_space(REPO / "search_spaces" / "imagenet_lt.yaml")
    worker = {"CPU": imagenet.resources.cpus_per_worker, "GPU": 1.0}
    assert shipped.placement_problem(worker, 4) is None  # gpu_large holds a whole trial
    assert concurrency(imagenet, shipped, trials=12) == 4  # 4 gpu_large nodes, the drivers on the head
    cifar = load_space(REPO / "search_spaces" / "cifar100_lt.yaml")
    assert concurrency(cifar, shipped, trials=64) == cifar.max_concurrent_trials
    # the present alone (the head) has no GPU: that was the old, wrong answer
    with pytest.raises(ConfigError, match=r"no node has that much GPU: node 10.0.0.1 \{CPU: 8\}"):
        concurrency(imagenet, present([HEAD]))


def test_only_what_can_never_fit_is_refused_naming_the_resource_and_the_node_types(shipped):
    problem = shipped.placement_problem({"CPU": 8, "GPU": 8}, 1)
    assert problem.startswith("workers: one worker needs {GPU: 8, CPU: 8} but no node type has that much GPU: "
                              "head {GPU: 0, CPU: 8}; gpu_small {GPU: 1, CPU: 4} (up to 8, 0 up); "
                              "gpu_large {GPU: 4, CPU: 48} (up to 4, 0 up); at most 12 worker nodes")
    # 12 worker nodes at most: 4 gpu_large (16 GPUs) + 8 gpu_small (8 GPUs)
    assert shipped.placement_problem({"CPU": 1, "GPU": 1}, 24) is None
    assert "exceed what the cluster can ever hold (24)" in shipped.placement_problem({"CPU": 1, "GPU": 1}, 25)
    assert shipped.placement_problem({"CPU": 1, "GPU": 1}, 12, "STRICT_SPREAD") is None
    assert "STRICT_SPREAD puts each of the 13 workers on its own node but the cluster may have 12 that hold one" \
        in shipped.placement_problem({"CPU": 1, "GPU": 1}, 13, "STRICT_SPREAD")
    assert shipped.placement_problem({"CPU": 8, "GPU": 1}, 4, "STRICT_PACK") is None
    assert "STRICT_PACK puts all 5 workers on one node but no node type holds more than 4" \
        in shipped.placement_problem({"CPU": 8, "GPU": 1}, 5, "STRICT_PACK")


def test_each_node_is_judged_by_its_own_shape_not_the_summed_resources():
    two_small = present([head(4.0), {"NodeID": "b" * 56, "Resources": {"CPU": 4.0}}])
    # 8 CPUs in all, but an 8-CPU worker fits neither node
    assert "one worker needs {CPU: 8} but no node has that much CPU" in two_small.placement_problem({"CPU": 8}, 1)
    # 3 x 2.5 CPU = 7.5 <= 8, but each 4-CPU node holds one
    assert "3 workers x {CPU: 2.5} exceed what the cluster can hold (2)" in two_small.placement_problem({"CPU": 2.5}, 3)
    assert not two_small.autoscaling and two_small.placement_problem({"CPU": 2}, 4) is None


@pytest.mark.parametrize("bundle", [{"CPU": 1}, {"CPU": 3, "GPU": 1}, {"CPU": 8}, {"GPU": 2}])
def test_slots_equal_a_brute_force_count_over_every_allowed_cluster(bundle):
    kinds = [NodeKind("head", {"CPU": 2.0}, up=1, most=1), NodeKind("small", {"CPU": 4.0, "GPU": 1.0}, up=1, most=3),
             NodeKind("large", {"CPU": 16.0, "GPU": 4.0}, most=2), NodeKind("cpu", {"CPU": 8.0}, most=4)]
    for max_nodes in (2, 3, 5, 10):
        capacity = Capacity(tuple(kinds), max_nodes=max_nodes)
        assert capacity.slots(bundle) == brute_force_slots(kinds, max_nodes, bundle), (bundle, max_nodes)


def test_concurrency_counts_the_trial_drivers_and_caps_max_concurrent_trials(capsys):
    space = load_space(REPO / "search_spaces" / "fashion_mnist_lt.yaml")  # 1 worker x 0.9 CPU + 0.1 driver
    one_node = present([head(2.0)])
    assert concurrency(space, one_node) == 2
    space.max_concurrent_trials = 12  # more than fit: capped, with one line saying so
    assert concurrency(space, one_node, trials=12) == 2
    assert "max_concurrent_trials=12 but 2 trial(s) fit the cluster now; running 2 at once" in capsys.readouterr().err
    tight = present([head(0.95)])
    with pytest.raises(ConfigError, match=r"one trial \(1 x \{CPU: 0.9\} \+ \{CPU: 0.1\} for its trial driver on the "
                                          r"head\) can never"):
        concurrency(space, tight)
    # the trial drivers stay on the head: a cluster whose head has no CPU to spare holds no trial
    worker_heavy = present([head(0.05), {"NodeID": "w" * 56, "Resources": {"CPU": 16.0}}])
    with pytest.raises(ConfigError, match="for its trial driver on the head"):
        concurrency(space, worker_heavy)
    space.resources.trial_driver_on_head = False
    assert concurrency(space, worker_heavy, trials=12) == 12  # 16 CPUs: 16 x (0.9 + 0.1) at most, 12 trials


def test_retraining_scaled_to_the_shipped_cluster_uses_every_gpu_it_can_grow_to(shipped):
    gpu = load_space(REPO / "search_spaces" / "imagenet_lt.yaml").full_config()
    cfg = scale_to_cluster(gpu, shipped)
    # 4 gpu_large (16 GPUs) + 8 gpu_small (8 GPUs); 4 CPUs per worker fit every GPU node
    assert (cfg.workers, cfg.cpus_per_worker, cfg.data.batch_size) == (24, 4, 24 * gpu.data.batch_size // gpu.workers)
    assert cfg.optim.lr == pytest.approx(gpu.optim.lr * cfg.data.batch_size / gpu.data.batch_size)
    unbounded = Capacity((NodeKind("any", {"CPU": 4.0, "GPU": 1.0}, most=math.inf),))
    with pytest.raises(ConfigError, match="no limit on its nodes"):
        scale_to_cluster(gpu, unbounded)


def test_unknown_node_types_refuse_nothing_and_size_a_search_from_its_own_limit(capsys):
    """Where the node types cannot be read (KubeRay without API access, a driver off the head),
    nothing is refused, as Ray Train does: the autoscaler's own reports end a wait that cannot succeed."""
    unknown = present([HEAD], known=False, note="the cluster's node types are unknown here")
    assert unknown.autoscaling and unknown.placement_problem({"CPU": 8, "GPU": 8}, 64, "STRICT_SPREAD") is None
    imagenet = load_space(REPO / "search_spaces" / "imagenet_lt.yaml")  # GPU trials, none fit the head
    assert concurrency(imagenet, unknown, trials=12) == imagenet.max_concurrent_trials
    imagenet.max_concurrent_trials = 0  # "as many as fit": what fits the nodes up now, at least one
    assert concurrency(imagenet, unknown, trials=12) == 1
    assert "max_concurrent_trials=0 with unknown node types: running 1 at once" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--scale-to-cluster: the cluster's node types are unknown here; set "
                                          r"node_types"):
        scale_to_cluster(imagenet.full_config(), unknown)


def test_node_types_from_a_cluster_file_and_what_contradicts_the_running_autoscaler(tmp_path):
    from paco_ray.node_types import differences, from_file

    shipped = from_file(str(REPO / "cluster.yaml"))
    assert set(shipped.config["available_node_types"]) == {"head", "gpu_small", "gpu_large"}
    other = yaml.safe_load((REPO / "cluster.yaml").read_text())
    other["available_node_types"]["gpu_large"]["max_workers"] = 2
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    running = from_file(str(tmp_path / "other.yaml"))
    assert differences(shipped, shipped) is None
    assert differences(shipped, running) == (f"gpu_large: {{'CPU': 48.0, 'GPU': 4.0}} up to 4 in {REPO / 'cluster.yaml'}, "
                                             f"{{'CPU': 48.0, 'GPU': 4.0}} up to 2 in {tmp_path / 'other.yaml'}")
    for text, message in (("[1, 2]", "is not a mapping"), ("kind: Deployment\n", "neither a cluster launcher config"),
                          ("kind: RayCluster\nspec: {}\n", "has no RayCluster spec (spec.headGroupSpec)"),
                          ("a: [", "cannot read")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"^node_types: .*" + re.escape(message)):
            from_file(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match=r"^node_types: cannot read /nonexistent.yaml \(FileNotFoundError\)"):
        from_file("/nonexistent.yaml")
