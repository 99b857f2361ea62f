"""The Ray side of a run, shared by ``paco_ray.train`` and every ``paco_ray.tune`` trial: start
Ray, check that the workers can ever be placed on the cluster (at its largest, where an
autoscaler runs), run one ``TorchTrainer`` whose workers wait a bounded time for their nodes,
evaluate a checkpoint on a node of the run's kind, and turn a failed run into one line."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

from .best_checkpoint import SELECTION_METRIC
from .autoscaler_status import read_status
from .capacity import Capacity, read_capacity
from .resources import format_resources
from .config import TrainConfig
from .data.staging import STAGE_TIMEOUT_S
from .faults import KillPlan
from .run_folder import trial_id_of
from .schema import ConfigError
from .storage import is_uri

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


def check_fits_cluster(cfg: TrainConfig, capacity: Capacity | None = None) -> Capacity:
    """Fail fast, in one line, when the workers can never be placed on this cluster: not on the
    nodes up now, nor, where an autoscaler runs, on the nodes it may add. Where the node types
    are unknown, says so once and refuses nothing. Returns the capacity."""
    capacity = capacity or read_capacity(cfg.node_types)
    if capacity.note:
        print(f"note: {capacity.note}", file=sys.stderr)
    problem = capacity.placement_problem(worker_resources(cfg), cfg.workers, cfg.placement_strategy)
    if problem:
        raise ConfigError(problem)
    return capacity


@contextlib.contextmanager
def environ(**values: str):
    """``os.environ`` with ``values`` set within the block (Ray reads some settings from it)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait for a worker group's nodes
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"  # Ray Train V2 shows its runs on the dashboard's Train page
NO_LIMIT_S = 10 ** 9


def run_trainer(loop: Callable[[dict], None], cfg: TrainConfig, *, name: str, storage_path: str, keep: int,
                metric: str = SELECTION_METRIC, callbacks: list | None = None, autoscaling: bool = False):
    """Run ``loop`` on ``cfg.workers`` Ray Train workers and return the Result; raises
    ``ray.train.TrainingFailedError`` once ``max_failures`` restarts are used up. The same
    ``name`` and ``storage_path`` resume from the run's last checkpoint. While the workers wait
    for their nodes, the waiting line prints; one attempt to place them waits ``node_wait_s``
    (Ray Train's worker-group start timeout) and counts like a failure against ``max_failures``.
    A fault-injection drill in this process's environment (paco_ray.faults) travels to the workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .node_wait import WaitingLine, forget_reason, run_key

    forget_reason(run_key(storage_path, name))
    kill_plan = KillPlan.from_env(os.environ)
    waiting = WaitingLine(cfg.workers, worker_resources(cfg), cfg.progress_every_s, autoscaling, trial_id_of(name),
                          cfg.placement_strategy, cfg.node_infeasible_s, run_key(storage_path, name))
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
            # a worker group that could not be placed (or started) in time gets the same retries as
            # one that failed while training
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   controller_failure_limit=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level),
            worker_runtime_env={"env_vars": kill_plan.env()} if kill_plan else None,
            callbacks=[*(callbacks or []), waiting]),
    )
    with environ(**{START_TIMEOUT_ENV: f"{cfg.node_wait_s or NO_LIMIT_S:g}",
                    STATE_TRACKING_ENV: os.environ.get(STATE_TRACKING_ENV, "1")}):
        return trainer.fit()


def evaluate_on_cluster(checkpoint: str, cfg: TrainConfig, splits: list[str] | None = None):
    """``evaluate.evaluate_checkpoint`` as a Ray task with one worker's resources, so it runs on a
    node of the run's kind (a GPU node for a GPU run) rather than in the driver, which on a
    cluster is the CPU-only head. Returns what evaluate_checkpoint returns; its errors are raised
    as they are."""
    import ray

    from .evaluate import evaluate_checkpoint

    task = ray.remote(evaluate_checkpoint).options(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)
    try:
        return ray.get(task.remote(checkpoint, splits))
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None


def failure_line(error: BaseException, cfg: TrainConfig | None = None, name: str | None = None) -> str:
    """One line for a failed run: the worker that caused it and its own error, not the traceback
    Ray wraps around every worker's (a lost worker first: the others then fail in collectives,
    and a lost node is named); workers that were never placed, with what the autoscaler did or
    reported (``name``: the Train run's, when not ``cfg.run_name``)."""
    failures: dict[int, Any] = getattr(error, "worker_failures", None) or {}
    if not failures:
        cause = getattr(error, "controller_failure", error)
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError" and cfg is not None:
            from .node_wait import run_key, unplaceable_reason

            workers = f"the {cfg.workers} workers ({format_resources(worker_resources(cfg))} each)"
            reason = unplaceable_reason(run_key(cfg.storage_path, cfg.run_name if name is None else name))
            if reason:
                return f"{workers} can never be placed: {reason}"
            return f"{workers} were not placed within node_wait_s={cfg.node_wait_s:g} s; {read_status().activity()}"
        return f"{type(cause).__name__}: {_first_line(cause)}"
    died = sorted(rank for rank, err in failures.items() if type(err).__name__ in WORKER_DEATHS)
    if died:
        node = lost_node(failures[died[0]])
        if node:
            return f"worker {died[0]} died: its node {node} was lost"
        return f"worker {died[0]} died (its process exited or stopped answering health checks)"
    rank, cause = min(failures.items())
    return f"worker {rank}: {type(cause).__name__}: {_first_line(cause)}"


def lost_node(error: BaseException) -> str | None:
    """The id of the node a dead worker ran on when that node is gone (marked dead by Ray, or its
    raylet no longer answering), else None: the worker's process died on a node that lives on."""
    actor_id = None
    while error is not None and actor_id is None:  # Ray nests the actor's own error in its health check's
        actor_id = getattr(error, "actor_id", None)
        error = getattr(error, "health_check_failure", None) or error.__cause__
    if not actor_id:
        return None
    try:
        import ray
        from ray.util.state import get_actor

        actor = get_actor(actor_id if isinstance(actor_id, str) else actor_id.hex(), timeout=10)
        node = next((n for n in ray.nodes() if actor and n["NodeID"] == actor.node_id), None)
    except Exception:  # naming the node is a courtesy: the failure line must still print
        return None
    if node is None:
        return None
    if node["Alive"] and _answers(node["NodeManagerAddress"], node["NodeManagerPort"]):
        return None
    return node["NodeID"]


def _answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "no message")
