"""Training: ``train_loop_per_worker`` for a Ray Train TorchTrainer, ``fit`` to launch it, and the
CLI ``python -m paco_ray.train [CONFIG.yaml] [--set key=value ...] [--workers N] [--gpu]``.

The loop reads top to bottom: build data, model and optimizer; resume if a checkpoint exists;
then per epoch train, evaluate on the validation split and report metrics with the full state.
It talks to Ray only through a small session object, so it also runs in-process (LocalSession).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, load_state, rng_states, save_state, set_rng_states
from .config import ConfigError, TrainConfig, load_config, resume_conflict
from .data.loaders import build_loaders
from .data.prepared import DatasetError, PreparedDataset, resolve_dataset
from .evaluate import evaluate_checkpoint, format_table, metrics_from_counts, per_class_counts
from .faults import KillPlan
from .losses import balanced_softmax, cross_entropy, paco_loss
from .model import PaCoModel
from .telemetry import RayMetrics, TensorBoard

# ----------------------------------------------------------------------------- building blocks


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> PaCoModel:
    key_encoder = {"paco": "momentum", "gpaco": "shared"}.get(cfg.loss)
    return PaCoModel(cfg.model.backbone, num_classes, in_channels, cfg.model.proj_dim,
                     cfg.paco.queue_size, cfg.paco.momentum, key_encoder)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup from 1/warmup_steps to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def compute_loss(cfg: TrainConfig, out, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    if cfg.contrastive:
        p = cfg.paco
        return paco_loss(out.q, out.k, out.queue_keys, labels, out.queue_labels, out.logits, log_prior,
                         alpha=p.alpha, beta=p.beta, gamma=p.gamma, temperature=p.temperature)
    if cfg.loss == "balanced_softmax":
        return balanced_softmax(out, labels, log_prior)
    return cross_entropy(out, labels)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------- sessions


class LocalSession:
    """One in-process worker: checkpoints go to ``out_dir/epoch_NNNN``; metrics are kept in a list."""

    def __init__(self, out_dir: str | os.PathLike, resume_from: str | os.PathLike | None = None,
                 device: str = "cpu"):
        self.rank, self.world_size, self.device = 0, 1, torch.device(device)
        self.out_dir, self.resume_from = Path(out_dir), resume_from
        self.reports: list[dict[str, Any]] = []

    def telemetry(self) -> tuple[TensorBoard | None, RayMetrics | None]:
        import pyarrow.fs

        return TensorBoard(pyarrow.fs.LocalFileSystem(), str(self.out_dir / "tensorboard")), None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def load_checkpoint(self) -> dict | None:
        return load_state(self.resume_from) if self.resume_from else None

    def report(self, metrics: dict[str, Any], state: dict | None) -> None:
        if state is not None:
            metrics = {**metrics, "checkpoint_path": str(save_state(self.out_dir / f"epoch_{metrics['epoch']:04d}", state).parent)}
        self.reports.append(metrics)


class RaySession:
    """The current Ray Train worker: rank, device, DDP wrapping, checkpoints through Ray storage."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def telemetry(self) -> tuple[TensorBoard | None, RayMetrics | None]:
        """TensorBoard from rank 0 into the run's storage; Ray gauges from every worker, tagged by
        trial (the Tune trial id, or the run name) and worker rank."""
        import ray.train

        context = ray.train.get_context()
        storage = context.get_storage()
        tensorboard = None
        if self.rank == 0:
            tensorboard = TensorBoard(storage.storage_filesystem, f"{storage.experiment_fs_path}/tensorboard")
        return tensorboard, RayMetrics(context.get_experiment_name().rsplit("/", 1)[-1], self.rank)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def load_checkpoint(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(directory)

    def report(self, metrics: dict[str, Any], state: dict | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_state(directory, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


# ----------------------------------------------------------------------------- the loop


RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng")  # beyond what every checkpoint has


def train(cfg: TrainConfig, session, kill_plan: KillPlan | None = None) -> None:
    """Train ``cfg`` on this worker; every epoch report validation metrics and the full state.
    ``kill_plan`` is a fault-injection drill (paco_ray.faults): this worker may SIGKILL itself once."""
    rank, world_size, device = session.rank, session.world_size, session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    data = PreparedDataset.open(resolve_dataset(cfg.data))
    classes = data.classes
    loaders = build_loaders(data, cfg.data, rank=rank, world_size=world_size, seed=cfg.seed, device=device)
    counts = torch.tensor(classes.train_counts, dtype=torch.float, device=device)
    log_prior = (counts / counts.sum()).log()

    model = build_model(cfg, classes.num_classes, data.channels)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                nesterov=cfg.optim.nesterov)
    steps_per_epoch = data.size("train") // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} exceeds the {data.size('train')} training images")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.epochs * steps_per_epoch))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = getattr(torch, cfg.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    start_epoch = 0
    state = session.load_checkpoint()
    if state is not None:
        try:
            conflict = resume_conflict(state["config"], cfg)
        except ConfigError as err:
            raise CheckpointError(f"checkpoint config is not valid here: {err}") from None
        if conflict and not cfg.resume_override:
            raise CheckpointError(f"checkpoint was trained with other settings: {conflict}; "
                                  "set resume_override: true to resume from it anyway")
        missing = [key for key in RESUME_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)}, needed to resume training")
        saved_classes = len(state["classes"].get("names", ()))
        if saved_classes != classes.num_classes:
            raise CheckpointError(f"checkpoint has {saved_classes} classes but the dataset {cfg.data.path} "
                                  f"has {classes.num_classes}")
        try:
            unwrap(model).load_state_dict(state["model"])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()
            raise CheckpointError(f"checkpoint does not fit this model ({cfg.model.backbone}, "
                                  f"{classes.num_classes} classes): {first}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        start_epoch = state["epoch"]
    tensorboard, ray_metrics = session.telemetry()

    for epoch in range(start_epoch, cfg.optim.epochs):
        # ---- train one epoch
        model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = torch.zeros(data.size("train"), dtype=torch.int32, device=device)
        steps = local_images = skipped = 0
        for x_q, x_k, labels, index in loaders.train(epoch):
            if kill_plan is not None:
                kill_plan.maybe_kill(rank, epoch * steps_per_epoch + steps + skipped + 1)
            x_q, labels = loaders.normalize(x_q), labels.to(device, non_blocking=True)
            x_k = loaders.normalize(x_k) if cfg.contrastive else None
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = model(x_q, x_k, labels)
                loss = compute_loss(cfg, out, labels, log_prior)
            optimizer.zero_grad(set_to_none=True)
            # every rank takes the same decision, or DDP would wait forever in backward
            if all_reduce_sum((~torch.isfinite(loss.detach())).to(torch.int32)).item() > 0:
                step = steps + skipped + 1
                where = f"epoch {epoch + 1}, step {step} (global step {epoch * steps_per_epoch + step})"
                if not cfg.skip_nonfinite:
                    raise FloatingPointError(f"non-finite loss ({loss.item()}) at {where}; "
                                             "set skip_nonfinite: true to skip such steps")
                sys.stderr.write(f"warning: skipped a step with a non-finite loss at {where}\n")
                skipped += 1
                continue
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach()
            seen[index.to(device)] += 1
            steps += 1
            local_images += labels.numel()
        if steps == 0:
            raise FloatingPointError(f"every step of epoch {epoch + 1} had a non-finite loss ({skipped} skipped)")
        epoch_loss = all_reduce_sum(loss_sum / steps).item() / world_size
        seen = all_reduce_sum(seen)
        elapsed = time.perf_counter() - started

        # ---- evaluate on the validation split (sharded, counts summed over ranks)
        val = metrics_from_counts(
            per_class_counts(model, loaders.eval("val"), loaders.normalize, classes.num_classes, device), classes)
        val_per_class = val.pop("per_class")
        metrics = {
            "epoch": epoch + 1,
            "train_loss": epoch_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": int(seen.sum().item()) / elapsed,
            "epoch_time_s": elapsed,
            "train_samples": int((seen > 0).sum().item()),
            "train_duplicate_samples": int((seen > 1).sum().item()),
            "skipped_steps": skipped,
            **{f"val_{k}": v for k, v in val.items()},
        }
        if cfg.contrastive:
            metrics["queue_fill"] = unwrap(model).queue.filled().item() / cfg.paco.queue_size

        # ---- telemetry: Ray gauges from every worker (its own throughput), TensorBoard from rank 0
        if ray_metrics is not None:
            ray_metrics.record({**metrics, "images_per_s": local_images / elapsed})
        if tensorboard is not None:
            tensorboard.log(metrics, val_per_class, classes)

        # ---- report, with the full state from rank 0
        full_state = None
        if rank == 0:
            # sys.stdout, not print: Ray Train patches print() into a logger that echoes twice
            sys.stdout.write(f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {epoch_loss:.4f}  "
                             f"val top1 {val['top1']:.2f}  balanced {val['balanced_acc']:.2f}  "
                             f"({elapsed:.1f} s, {metrics['images_per_s']:.0f} img/s)\n")
            sys.stdout.flush()
            full_state = {
                "config": cfg.to_dict(), "classes": classes.to_dict(), "epoch": epoch + 1,
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(),
                "metrics": metrics,
            }
        session.report(metrics, full_state)
    if tensorboard is not None:
        tensorboard.close()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    cfg = TrainConfig.from_dict(config)
    # Ray Train logs every report at INFO through a logger outside ray.train; obey log_level
    logging.getLogger().setLevel(cfg.log_level)
    train(cfg, RaySession(), KillPlan.from_env(os.environ))


# ----------------------------------------------------------------------------- launching


def fit(cfg: TrainConfig):
    """Run ``cfg`` as a Ray Train TorchTrainer (connects to or starts Ray); return the Result, or
    raise ``ray.train.TrainingFailedError`` once ``max_failures`` restarts are used up.

    Re-running with the same ``storage_path`` and ``name`` resumes from the last checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg.data.path = str(resolve_dataset(cfg.data))  # prepare once here, not in every worker
    PreparedDataset.open(cfg.data.path)  # a bad dataset fails here in one line, not in every worker
    kill_plan = KillPlan.from_env(os.environ)  # a fault-injection drill travels to the workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute="val_balanced_acc",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level),
            worker_runtime_env={"env_vars": kill_plan.env()} if kill_plan else None),
    )
    return trainer.fit()


def scaling_config(cfg: TrainConfig):
    import ray.train

    return ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                   resources_per_worker=worker_resources(cfg),
                                   placement_strategy=cfg.placement_strategy)


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return resources


def check_fits_cluster(cfg: TrainConfig) -> None:
    """Fail fast (instead of waiting forever) when the workers cannot be placed on this cluster."""
    import ray

    total = ray.cluster_resources()
    if cfg.placement_strategy == "STRICT_SPREAD":
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        if cfg.workers > nodes:
            raise ConfigError(f"placement_strategy: STRICT_SPREAD puts each of the {cfg.workers} workers on its own "
                              f"node but the cluster has {nodes}")
    for name, per_worker in worker_resources(cfg).items():
        have = total.get(name, 0)
        if per_worker * cfg.workers > have + 1e-9:
            raise ConfigError(f"workers: {cfg.workers} workers x {per_worker:g} {name} exceed the cluster's {have:g} {name}")


INPUT_ERRORS = (ConfigError, CheckpointError, DatasetError)
# How Ray reports a worker whose process is gone (by name: some are internal to Ray Train)
WORKER_DEATHS = ("WorkerHealthCheckFailedError", "ActorDiedError", "ActorUnavailableError", "RayActorError")


def failure_line(error: BaseException) -> str:
    """One line for a failed run: the worker that caused it and its own error, not the traceback
    Ray wraps around every worker's (a lost worker first: the others then fail in collectives)."""
    failures = getattr(error, "worker_failures", None) or {}
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


def best_checkpoint(result) -> str:
    """Path of the reported checkpoint with the highest validation balanced accuracy."""
    candidates = result.best_checkpoints or []
    if not candidates:
        raise CheckpointError(f"run {result.path!r} reported no checkpoint")
    checkpoint, _ = max(candidates, key=lambda cm: cm[1].get("val_balanced_acc", float("-inf")))
    return checkpoint.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paco_ray.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded Fashion-MNIST-LT job)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set loss=ce --set paco.temperature=0.1")
    parser.add_argument("--workers", type=int, help="number of Ray Train workers")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="one GPU per worker, NCCL, AMP")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.gpu is not None:
        overrides.append(f"use_gpu={str(args.gpu).lower()}")
    try:
        cfg = load_config(args.config, overrides)
        KillPlan.from_env(os.environ)  # a malformed drill fails here, not after Ray has started
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import ray
    import ray.train

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(dashboard_host="127.0.0.1", configure_logging=False)
    try:
        check_fits_cluster(cfg)
        result = fit(cfg)
        path = best_checkpoint(result)
        table, _ = evaluate_checkpoint(path)
    except (ConfigError, CheckpointError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as err:
        print(f"error: training failed (max_failures: {cfg.max_failures}): {failure_line(err)}", file=sys.stderr)
        bad_input = any(isinstance(e, INPUT_ERRORS) for e in getattr(err, "worker_failures", {}).values())
        return 2 if bad_input else 1
    print(f"\n{cfg.run_name}: loss={cfg.loss}, {cfg.optim.epochs} epochs, {cfg.workers} workers, "
          f"{time.perf_counter() - started:.0f} s")
    print(f"best checkpoint (val balanced accuracy): {path}")
    print(format_table(table))
    return 0


if __name__ == "__main__":
    # Re-enter through the package so Ray pickles train_loop_per_worker by reference.
    from paco_ray.train import main as package_main

    sys.exit(package_main())
