"""The Ray side of a run, shared by ``paco_ray.train`` and every ``paco_ray.tune`` trial: start
Ray, check that the workers fit the cluster, run one ``TorchTrainer``, pick its best checkpoint,
and turn a failed run into one line."""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Callable, Iterable

from .config import TrainConfig
from .faults import KillPlan
from .schema import ConfigError
from .data.staging import STAGE_TIMEOUT_S
from .storage import exists, filesystem, is_uri

# How Ray reports a worker whose process is gone (by name: some are internal to Ray Train)
WORKER_DEATHS = ("WorkerHealthCheckFailedError", "ActorDiedError", "ActorUnavailableError", "RayActorError")


RAY_CURRENT_CLUSTER = "/tmp/ray/ray_current_cluster"  # where `ray start` records a cluster on this machine
# Lines Ray forwards from its own processes that no user can act on (Ray's warnings stay)
RAY_NOISE = ("Actor with class name: 'PreemptionWatcher'",)


def start_ray() -> None:
    """Connect to (or start) Ray with the dashboard on loopback, leaving logging to the caller.
    Workers' lines reach this terminal without colour codes when it is not a terminal (a log
    file), and without RAY_NOISE."""
    import ray

    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not ray.is_initialized():
        ray.init(dashboard_host="127.0.0.1", configure_logging=False)
    filter_ray_noise()


def filter_ray_noise() -> None:
    """Drop RAY_NOISE lines from what Ray prints of its workers' output in this driver."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for i, (name, handler) in enumerate(list(dispatcher.handlers)):
        if name != "ray_print_logs" or getattr(handler, "filters_ray_noise", False):
            continue

        def filtered(data, _print=handler):
            lines = [line for line in data.get("lines", []) if not any(n in line for n in RAY_NOISE)]
            if lines:
                _print({**data, "lines": lines})

        filtered.filters_ray_noise = True
        dispatcher.handlers[i] = (name, filtered)


def check_gpu_request(use_gpu: bool) -> None:
    """Before Ray starts: GPU workers asked for on a machine without CUDA and with no Ray cluster
    to join (RAY_ADDRESS, or one started here with ``ray start``) would wait forever."""
    if not use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    if torch.cuda.is_available() or os.path.exists(RAY_CURRENT_CLUSTER):
        return
    raise ConfigError("use_gpu: GPU workers requested (--gpu) but this machine has no CUDA device and no Ray "
                      "cluster is set to join (RAY_ADDRESS, or `ray start` here)")


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return resources


def copies_that_fit(need: dict[str, float], available: dict[str, float]) -> tuple[int, str | None]:
    """How many copies of ``need`` fit into ``available``, and the first resource of which not
    even one copy fits (None when one does)."""
    copies = math.inf
    for name, amount in need.items():
        have = available.get(name, 0.0)
        if amount > have + 1e-9:
            return 0, name
        copies = min(copies, int((have + 1e-9) // amount))
    return int(copies), None


def check_fits_cluster(cfg: TrainConfig) -> None:
    """Fail fast (instead of waiting forever) when the workers cannot be placed on this cluster."""
    import ray

    if cfg.placement_strategy == "STRICT_SPREAD":
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        if cfg.workers > nodes:
            raise ConfigError(f"placement_strategy: STRICT_SPREAD puts each of the {cfg.workers} workers on its own "
                              f"node but the cluster has {nodes}")
    per_worker = worker_resources(cfg)
    cluster = ray.cluster_resources()
    _, short = copies_that_fit({k: v * cfg.workers for k, v in per_worker.items()}, cluster)
    if short:
        raise ConfigError(f"workers: {cfg.workers} workers x {per_worker[short]:g} {short} exceed the cluster's "
                          f"{cluster.get(short, 0):g} {short}")


def run_trainer(loop: Callable[[dict], None], cfg: TrainConfig, *, name: str, storage_path: str, keep: int,
                metric: str = "val_balanced_acc", callbacks: list | None = None):
    """Run ``loop`` on ``cfg.workers`` Ray Train workers and return the Result; raises
    ``ray.train.TrainingFailedError`` once ``max_failures`` restarts are used up. The same
    ``name`` and ``storage_path`` resume from the run's last checkpoint. A fault-injection drill
    in this process's environment (paco_ray.faults) travels to the workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    kill_plan = KillPlan.from_env(os.environ)
    # Workers stage a dataset in object storage before their first collective: the process group
    # waits longer than a node may stage, so a slow node ends in the staging error naming it.
    collective_timeout_s = 1800 + (STAGE_TIMEOUT_S if is_uri(cfg.data.path) else 0)
    trainer = TorchTrainer(
        loop,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(timeout_s=int(collective_timeout_s)),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=worker_resources(cfg),
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=metric,
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level),
            worker_runtime_env={"env_vars": kill_plan.env()} if kill_plan else None,
            callbacks=callbacks),
    )
    return trainer.fit()


def result_checkpoints(result, metric: str = "val_balanced_acc") -> list[tuple[float, str]]:
    """(metric, path) of every checkpoint a Ray Train Result still holds."""
    return [(m.get(metric, -math.inf), c.path) for c, m in (result.best_checkpoints or [])]


def best_checkpoint(candidates: Iterable[tuple[float, str]], storage: str) -> str | None:
    """The path with the highest metric among ``candidates`` that still exist under ``storage``
    (a local path or URI), or None."""
    fs, _ = filesystem(storage)
    for _, path in sorted(candidates, key=lambda mp: -mp[0]):
        if exists(fs, path):
            return path
    return None


def failure_line(error: BaseException) -> str:
    """One line for a failed run: the worker that caused it and its own error, not the traceback
    Ray wraps around every worker's (a lost worker first: the others then fail in collectives)."""
    failures: dict[int, Any] = getattr(error, "worker_failures", None) or {}
    if not failures:
        cause = getattr(error, "controller_failure", error)
        return f"{type(cause).__name__}: {_first_line(cause)}"
    died = sorted(rank for rank, err in failures.items() if type(err).__name__ in WORKER_DEATHS)
    if died:
        return f"worker {died[0]} died (its process exited or stopped answering health checks)"
    rank, cause = min(failures.items())
    return f"worker {rank}: {type(cause).__name__}: {_first_line(cause)}"


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "no message")
