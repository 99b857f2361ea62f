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
    # what training needs (no test tools), and the project's .venv first on the nodes' PATH
    assert "./setup.sh" in readme and cluster["setup_commands"][0] == "cd ~/paco_ray && ./setup.sh --runtime"
    assert "paco_ray/.venv/bin:$PATH" in cluster["setup_commands"][1] and ".bashrc" in cluster["setup_commands"][1]
    assert cluster["file_mounts"]["~/paco_ray"] == "."
    ray_pin = pins()["ray[train,tune,default]"]
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-py311")  # same Ray, Python 3.11
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray " in c]
    assert len(starts) == 4 and all("~/paco_ray/.venv/bin/ray" in c for c in starts)  # Ray from the pinned .venv


def test_dashboard_stays_local_and_token_auth_is_on(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(cluster)
    for command in cluster["head_start_ray_commands"][1:] + cluster["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command or "paco_ray.monitoring" in command
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
    # the stage directory on the host's NVMe is made writable for the container's user on each GPU type
    for name, spec in cluster["available_node_types"].items():
        if spec["resources"].get("GPU"):
            assert any("/opt/dlami/nvme/paco_ray" in c and "chown" in c for c in spec["initialization_commands"])


def tracked_tree(tmp_path: Path) -> Path:
    """A copy of the repository's tracked files plus what a working copy also holds: a dataset, a
    run folder, a virtualenv, Parquet and .beton files."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "repo"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for junk in ("data/imagenet_lt/train.beton", "data/imagenet_lt/manifest.parquet", "runs/r/checkpoint/state.pt",
                 ".venv/bin/python", "paco_ray/data/__pycache__/x.pyc", "scratch/out.beton"):
        (source / junk).parent.mkdir(parents=True, exist_ok=True)
        (source / junk).write_text("x")
    return source


def test_rsync_copies_every_code_file_and_no_data(cluster, tmp_path):
    from paco_ray.cluster_check import check, synced_files

    source = tracked_tree(tmp_path)
    synced = synced_files(cluster, source)
    code = {str(p.relative_to(source)) for d in ("paco_ray", "pipelines", "configs", "search_spaces")
            for p in (source / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"paco_ray/data/loaders.py", "paco_ray/data/__init__.py"} <= code <= synced
    assert not [f for f in synced if f.startswith(("data/", "runs/", ".venv/")) or f.endswith((".beton", ".parquet"))
                or "__pycache__" in f]
    assert check(cluster, source) == []
    # the shipped file's former excludes: an unanchored `data` drops the package paco_ray/data/
    unanchored = {**cluster, "rsync_exclude": [".venv", "runs", "data", "**/*.beton"]}
    assert "paco_ray/data/loaders.py" not in synced_files(unanchored, source)
    assert any("code files would not reach the nodes" in p for p in check(unanchored, source))


def test_images_and_worker_profiles_are_checked_offline(cluster, tmp_path):
    from paco_ray.cluster_check import node_problems

    assert node_problems(cluster, bucket=True) == []
    old_form = copy.deepcopy(cluster)
    old_form["available_node_types"]["gpu_small"]["node_config"]["ImageId"] = \
        "resolve-ssm-parameter:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    assert ["ImageId" in p and "gpu_small" in p for p in node_problems(old_form, bucket=True)] == [True]
    no_profile = copy.deepcopy(cluster)
    del no_profile["available_node_types"]["gpu_large"]["node_config"]["IamInstanceProfile"]
    (problem,) = node_problems(no_profile, bucket=True)
    assert problem.startswith("available_node_types.gpu_large.node_config: no IamInstanceProfile")
    assert node_problems(no_profile, bucket=False) == []  # data and results not in a bucket: not needed


def test_the_head_serves_prometheus_and_grafana_to_the_dashboard_on_loopback(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    for variable in ("RAY_PROMETHEUS_HOST=http://127.0.0.1:9090", "RAY_GRAFANA_HOST=http://127.0.0.1:3000",
                     "RAY_GRAFANA_IFRAME_HOST=http://127.0.0.1:3000"):
        assert variable in start
    assert start.index("ray start --head") < start.index("paco_ray.monitoring start")  # Ray writes their configs first
    setup = " ".join(cluster["head_setup_commands"])
    assert "prometheus-2." in setup and "grafana-" in setup


def test_monitoring_binds_loopback_and_makes_a_private_admin_password(tmp_path, monkeypatch):
    import stat

    from paco_ray import monitoring

    password = monitoring.admin_password_file(tmp_path / "pw")
    assert stat.S_IMODE(password.stat().st_mode) == 0o600 and len(password.read_text()) >= 24
    assert monitoring.admin_password_file(tmp_path / "pw").read_text() == password.read_text()  # made once
    calls = []
    monkeypatch.setattr(monitoring.subprocess, "Popen", lambda args, **kw: calls.append((args, kw.get("env"))))
    session = tmp_path / "session"
    (session / "metrics" / "prometheus").mkdir(parents=True)
    (session / "metrics" / "prometheus" / "prometheus.yml").write_text("scrape_configs: []\n")
    monitoring.start_prometheus("prometheus", session, 9090, tmp_path / "data")
    monitoring.start_grafana(tmp_path / "grafana", session, 3000, tmp_path / "pw")
    (prometheus, _), (grafana, env) = calls
    assert "--web.listen-address=127.0.0.1:9090" in prometheus
    assert env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1" and env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == str(tmp_path / "pw")
    assert "admin" not in env.get("GF_SECURITY_ADMIN_PASSWORD", "")
