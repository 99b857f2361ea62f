"""cluster.yaml against Ray's own cluster-launcher schema and the project's invariants (no cloud)."""
import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from paco_ray.search_space import load_space

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def pins():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.match(r"([A-Za-z0-9_.\-\[\],]+)==([^\s;]+)", d).groups() for d in deps)


def test_cluster_yaml_passes_rays_schema_and_a_typo_does_not(cluster):
    validate(cluster)
    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["gpu_large"]["min_wrokers"] = 0
    with pytest.raises(Exception, match="min_wrokers"):
        validate(typo)


def test_nodes_install_the_project_as_the_readme_does(cluster):
    readme = (REPO / "README.md").read_text()
    assert "./setup.sh" in readme and cluster["setup_commands"] == ["cd ~/paco_ray && ./setup.sh"]
    assert cluster["file_mounts"]["~/paco_ray"] == "."
    ray_pin = pins()["ray[train,tune,default]"]
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-py311")  # same Ray, Python 3.11
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("~/paco_ray/.venv/bin/ray" in c for c in starts)  # Ray from the pinned .venv


def test_dashboard_stays_local_and_token_auth_is_on(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(cluster)
    for command in cluster["head_start_ray_commands"][1:] + cluster["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token for all nodes


def test_gpu_workers_fit_the_imagenet_trials(cluster):
    space = load_space(REPO / "search_spaces" / "imagenet_lt.yaml")
    r = space.resources
    worker_need = {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers}
    types = cluster["available_node_types"]
    fitting = [name for name, t in types.items() if name != cluster["head_node_type"]
               and all(t["resources"].get(k, 0) >= v for k, v in worker_need.items())]
    assert fitting, f"no worker type holds one ImageNet-LT trial ({worker_need})"
    gpus = sum(types[n]["resources"]["GPU"] * types[n]["max_workers"] for n in fitting)
    assert gpus >= space.max_concurrent_trials * r.workers  # max_concurrent_trials can all run
    # the trial drivers (fractions of a CPU) fit on the head node
    head = types[cluster["head_node_type"]]["resources"]
    assert head["CPU"] >= space.max_concurrent_trials * r.trial_driver_cpus
    # and a one-GPU CIFAR trial fits the small GPU type
    cifar = load_space(REPO / "search_spaces" / "cifar100_lt.yaml").resources
    assert types["gpu_small"]["resources"]["CPU"] >= cifar.cpus_per_worker and types["gpu_small"]["resources"]["GPU"] >= 1


def test_data_is_staged_on_local_disk_and_never_rsynced(cluster):
    from paco_ray.data.staging import STAGE_DIR_ENV

    options = cluster["docker"]["worker_run_options"]
    assert any(o.startswith(f"-e {STAGE_DIR_ENV}=/mnt/local/") for o in options)
    assert any(o.startswith("-v ") and o.endswith(":/mnt/local") for o in options)  # the host's local disk
    assert {"data", "**/*.beton", "**/*.parquet"} <= set(cluster["rsync_exclude"])
