"""Train one config: ``python -m paco_ray.train [CONFIG.yaml] [--set key=value ...] [--workers N] [--gpu]``.

The command prepares the embedded default dataset when ``data.path`` is empty, runs the config
on N Ray Train workers (one checkpoint per epoch under ``storage_path``), then evaluates the best
checkpoint (by validation balanced accuracy) on the validation and test splits.

``train(cfg, session)`` is the loop each worker runs, top to bottom: build data, model and
optimizer; resume if the session holds a checkpoint; then per epoch ``train_one_epoch``, evaluate
on the validation split and report metrics with the full state. It runs in-process too
(``LocalSession``).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time

if __name__ == "__main__":  # the command's options first: --help answers before the heavy imports
    from paco_ray.commands import train_parser
    train_parser().parse_args()

from dataclasses import dataclass  # noqa: E402
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import restore_training, training_state
from .commands import train_overrides, train_parser
from .config import TrainConfig, load_config
from .data.loaders import build_loaders
from .data.longtail import ClassInfo
from .data.prepared import DatasetError, PreparedDataset
from .data.staging import check_dataset, local_dataset
from .errors import InputError
from .evaluate import evaluate_split
from .faults import KillPlan
from .host import keep_freed_memory
from .losses import compute_loss
from .model import PaCoModel
from .nonfinite import BatchNormState, all_reduce_sum, nonfinite_flag
from .optim import build_optimizer, skip_next_step_if
from .progress import LOGGER, Progress, epoch_line, labelled, setup_logging
from .run_folder import CONFIG, RESULTS, MetricsLog, config_yaml, to_json
from .session import LocalSession, RaySession

__all__ = ["train", "train_one_epoch", "train_loop_per_worker", "fit", "main", "LocalSession", "RaySession"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def log_class_prior(classes: ClassInfo, device: torch.device) -> torch.Tensor:
    counts = torch.tensor(classes.train_counts, dtype=torch.float, device=device)
    return (counts / counts.sum()).log()


def open_dataset(cfg: TrainConfig) -> PreparedDataset:
    """The prepared dataset of ``cfg``; one in object storage is staged into this node's cache first."""
    if not cfg.data.path:
        raise DatasetError("data.path: empty; prepare a dataset with python -m pipelines... (python -m "
                           "paco_ray.train prepares the embedded default itself)")
    return PreparedDataset.open(local_dataset(cfg.data.path, cfg.data.stage_dir))


@dataclass
class EpochStats:
    loss: float             # mean training loss over every rank's steps
    elapsed: float          # seconds
    seen: torch.Tensor      # (N,) how often each training image was used, summed over ranks
    local_images: int       # images this rank trained on
    skipped: int            # steps skipped for a non-finite loss


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, session, kill_plan: KillPlan | None = None) -> None:
    """Train ``cfg`` on this worker; every epoch report validation metrics and the full state.
    ``kill_plan`` is a fault-injection drill (paco_ray.faults): this worker may SIGKILL itself once."""
    device = session.device
    logger = setup_logging()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        keep_freed_memory()  # no page faults for each step's activations
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    data = open_dataset(cfg)
    classes = data.classes
    loaders = build_loaders(data, cfg.data, rank=session.rank, world_size=session.world_size, seed=cfg.seed,
                            device=device)
    log_prior = log_class_prior(classes, device)
    model = PaCoModel.from_config(cfg, classes.num_classes, data.channels)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile_encoders()
    model = session.prepare_model(model)
    steps_per_epoch = data.size("train") // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise InputError(f"data.batch_size: {cfg.data.batch_size} exceeds the {data.size('train')} training images")
    optimizer, scheduler = build_optimizer(model, cfg.optim, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp(cfg, device) and cfg.amp_dtype == "float16")

    state = session.load_checkpoint()
    start_epoch = 0 if state is None else restore_training(state, cfg, classes, unwrap(model), optimizer,
                                                           scheduler, scaler)
    tensorboard, ray_metrics = session.telemetry()
    metrics_log = None
    if session.rank == 0:
        session.write_run_file(CONFIG, config_yaml(cfg.to_dict()))
        metrics_log = MetricsLog(session, start_epoch)
        logger.info(start_line(cfg, data, session, start_epoch, steps_per_epoch))
    for epoch in range(start_epoch, cfg.optim.epochs):
        progress = Progress(cfg.progress_every_s if session.rank == 0 else 0, epoch, cfg.optim.epochs,
                            steps_per_epoch, session.label)
        stats = train_one_epoch(cfg, model, loaders, optimizer, scheduler, scaler, log_prior, epoch,
                                steps_per_epoch, session.rank, kill_plan, progress)
        val = evaluate_split(model, loaders, "val", classes, device)
        val_per_class = val.pop("per_class")
        metrics = epoch_metrics(cfg, model, optimizer, epoch, stats, val)
        if ray_metrics is not None:  # Ray gauges from every worker, each with its own throughput
            ray_metrics.record({**metrics, "images_per_s": stats.local_images / stats.elapsed})
        if tensorboard is not None:
            tensorboard.log(metrics, val_per_class, classes)
        full_state = None
        if session.rank == 0:
            logger.info(epoch_line(metrics, cfg.optim.epochs, session.label))
            metrics_log.append(metrics)
            full_state = training_state(cfg, classes, epoch + 1, unwrap(model), optimizer, scheduler, scaler, metrics)
        if tensorboard is not None:
            tensorboard.flush()  # this epoch's scalars and figure on disk before the report
        session.report(metrics, full_state)
    if tensorboard is not None:
        tensorboard.close()


def start_line(cfg: TrainConfig, data: PreparedDataset, session, start_epoch: int, steps: int) -> str:
    where = f"resuming at epoch {start_epoch + 1}" if start_epoch else "starting"
    first = "; FFCV compiles its pipelines on the first batch" if cfg.data.loader == "ffcv" else ""
    return labelled(session.label, f"{cfg.loss}: {where}, {data.size('train')} training images of "
                    f"{data.classes.num_classes} classes, {session.world_size} worker(s) on {session.device.type}, "
                    f"{steps} steps per epoch{first}")


def use_amp(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp and device.type == "cuda"


NONFINITE_CHECK_EVERY = 50  # steps between the host's looks at the non-finite flags (one sync each)


def train_one_epoch(cfg: TrainConfig, model, loaders, optimizer, scheduler, scaler, log_prior: torch.Tensor,
                    epoch: int, steps_per_epoch: int, rank: int, kill_plan: KillPlan | None = None,
                    progress: Progress | None = None) -> EpochStats:
    """One pass over this rank's shard of the training split. A step whose loss or gradients are
    not finite on any rank is skipped on every rank, on the device, and leaves no trace (weights,
    optimizer state, key encoder, queue and, with ``skip_nonfinite``, BatchNorm statistics as
    before it); the host looks at the flags every NONFINITE_CHECK_EVERY steps and at the end, and
    stops with an error naming the first such step unless ``skip_nonfinite``. No per-step host
    sync: bookkeeping stays on the device."""
    device = log_prior.device
    amp_dtype, amp = getattr(torch, cfg.amp_dtype), use_amp(cfg, device)
    model.train()
    started = time.perf_counter()
    loss_sum, images = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros(loaders.data.size("train"), dtype=torch.int32, device=device)
    flags: list[torch.Tensor] = []  # per step: 1 when the loss or a gradient was not finite on some rank
    losses: list[torch.Tensor] = []
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    params = [p for p in model.parameters() if p.requires_grad]
    batch_norm = BatchNormState(model) if cfg.skip_nonfinite else None
    for x_q, x_k, labels, index in loaders.train(epoch):
        if kill_plan is not None:
            kill_plan.maybe_kill(rank, epoch * steps_per_epoch + len(flags) + 1)
        x_q, labels = loaders.normalize(x_q), labels.to(device, non_blocking=True)
        x_k = loaders.normalize(x_k) if cfg.contrastive else None
        if batch_norm is not None:
            batch_norm.save()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            out = model(x_q, x_k, labels)
            loss = compute_loss(cfg.loss, out, labels, log_prior, cfg.paco)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        # every rank takes the same decision; with a GradScaler (float16) it judges the gradients
        bad = nonfinite_flag(loss, params, check_gradients=not scaler.is_enabled())
        flags.append(bad)
        losses.append(loss.detach().float())
        if not cfg.skip_nonfinite and len(flags) % NONFINITE_CHECK_EVERY == 0:
            check_finite(flags, losses, epoch, steps_per_epoch)
        skip_next_step_if(optimizer, bad)
        scaler.step(optimizer)
        scaler.update()
        ok = 1 - bad
        unwrap(model).end_step(out, labels, ok)  # momentum update and enqueue, only for a step taken
        if batch_norm is not None:
            batch_norm.restore_if(bad)
        scheduler.step()  # the schedule counts batches, skipped ones included
        loss_sum += torch.where(bad.bool(), 0.0, losses[-1])
        seen.index_add_(0, index.to(device, non_blocking=True), ok.expand(index.numel()))
        images += ok * labels.numel()
        if progress is not None:
            progress.step(len(flags), len(flags) * labels.numel() * world_size, losses[-1],
                          optimizer.param_groups[0]["lr"])
    if not cfg.skip_nonfinite:
        check_finite(flags, losses, epoch, steps_per_epoch)
    skipped = skipped_steps(flags, epoch, steps_per_epoch)
    return EpochStats(loss=all_reduce_sum(loss_sum / (len(flags) - len(skipped))).item() / world_size,
                      elapsed=time.perf_counter() - started, seen=all_reduce_sum(seen),
                      local_images=int(images.item()), skipped=len(skipped))


def skipped_steps(flags: list[torch.Tensor], epoch: int, steps_per_epoch: int) -> list[int]:
    """The epoch's skipped steps, each with a warning line; an epoch with no step taken is an error."""
    skipped = nonfinite_steps(flags)
    for step in skipped:
        logging.getLogger(LOGGER).warning(f"warning: skipped a step with a non-finite loss or gradient at "
                                          f"{where(epoch, step, steps_per_epoch)}")
    if len(skipped) == len(flags):
        raise FloatingPointError(f"every step of epoch {epoch + 1} had a non-finite loss or gradient "
                                 f"({len(skipped)} skipped)")
    return skipped


def nonfinite_steps(flags: list[torch.Tensor]) -> list[int]:
    """The 1-based steps flagged non-finite (one host sync for all of them)."""
    return (torch.stack(flags).cpu().nonzero().flatten() + 1).tolist() if flags else []


def where(epoch: int, step: int, steps_per_epoch: int) -> str:
    return f"epoch {epoch + 1}, step {step} (global step {epoch * steps_per_epoch + step})"


def check_finite(flags: list[torch.Tensor], losses: list[torch.Tensor], epoch: int, steps_per_epoch: int) -> None:
    """Stop, naming the first step whose loss (or, with a finite loss, a gradient) was not finite
    on some rank."""
    steps = nonfinite_steps(flags)
    if steps:
        value = losses[steps[0] - 1].item()
        what = f"non-finite loss ({value})" if not math.isfinite(value) else f"non-finite gradient (loss {value:.4g})"
        raise FloatingPointError(f"{what} at {where(epoch, steps[0], steps_per_epoch)}; "
                                 "set skip_nonfinite: true to skip such steps")


def epoch_metrics(cfg: TrainConfig, model, optimizer, epoch: int, stats: EpochStats,
                  val: dict[str, float]) -> dict[str, Any]:
    """What every epoch reports (to Ray, Tune, TensorBoard and the checkpoint)."""
    metrics = {
        "epoch": epoch + 1,
        "train_loss": stats.loss,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": int(stats.seen.sum().item()) / stats.elapsed,
        "epoch_time_s": stats.elapsed,
        "train_samples": int((stats.seen > 0).sum().item()),
        "train_duplicate_samples": int((stats.seen > 1).sum().item()),
        "skipped_steps": stats.skipped,
        **{f"val_{k}": v for k, v in val.items()},
    }
    if cfg.contrastive:
        metrics["queue_fill"] = unwrap(model).queue.filled().item() / cfg.paco.queue_size
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    cfg = TrainConfig.from_dict(config)
    # Ray Train logs every report at INFO through a logger outside ray.train; obey log_level
    logging.getLogger().setLevel(cfg.log_level)
    train(cfg, RaySession(), KillPlan.from_env(os.environ))


# ----------------------------------------------------------------------------- the command


def fit(cfg: TrainConfig, autoscaling: bool = False):
    """Run ``cfg`` (its ``data.path`` prepared and checked by the command, before Ray started) as a
    Ray Train TorchTrainer under ``storage_path/run_name``; re-running the same name resumes from
    its last checkpoint. ``autoscaling``: the workers may wait for the autoscaler's nodes."""
    from .driver import run_trainer

    return run_trainer(train_loop_per_worker, cfg, name=cfg.run_name, storage_path=cfg.storage_path,
                       keep=cfg.keep_checkpoints, autoscaling=autoscaling)


def main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, train_overrides(args))
        if args.print_config:
            sys.stdout.write(config_yaml(cfg.to_dict()))
            return 0
        KillPlan.from_env(os.environ)  # a malformed drill fails here, not after Ray has started
        return run(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(cfg: TrainConfig) -> int:
    """The command after its config is read: prepare the data, train on Ray, evaluate the best checkpoint."""
    from pipelines.default_data import with_prepared_data

    from .driver import check_fits_cluster, check_gpu_request, start_ray
    from .evaluate import format_table

    started = time.perf_counter()
    cfg = with_prepared_data(cfg)  # once, here in the driver
    check_dataset(cfg.data.path)  # bad data and impossible requests fail before Ray starts
    check_gpu_request(cfg.use_gpu)
    start_ray()
    capacity = check_fits_cluster(cfg)
    code, table, path = train_and_evaluate(cfg, capacity.autoscaling)
    if code:
        return code
    print(f"\n{cfg.run_name}: loss={cfg.loss}, {cfg.optim.epochs} epochs, {cfg.workers} workers, "
          f"{time.perf_counter() - started:.0f} s")
    print(f"best checkpoint (val balanced accuracy): {path}")
    print(format_table(table))
    return 0


def train_and_evaluate(cfg: TrainConfig, autoscaling: bool = False) -> tuple[int, dict | None, str | None]:
    """Fit ``cfg`` on Ray, pick its best checkpoint by validation balanced accuracy, evaluate it on
    the validation and test splits on a node of the run's kind, and write the run folder's
    results.json: (exit code, the table, the checkpoint). A failed run prints one line and gives
    1, or 2 when a worker refused its input (a checkpoint trained with other settings, bad data)."""
    import ray.train

    from .checkpoint import CheckpointError
    from .best_checkpoint import best_checkpoint, result_checkpoints
    from .driver import evaluate_on_cluster, failure_line
    from .storage import filesystem, to_uri, write_text

    try:
        result = fit(cfg, autoscaling)
    except ray.train.TrainingFailedError as err:
        print(f"error: training failed (max_failures: {cfg.max_failures}): {failure_line(err, cfg)}", file=sys.stderr)
        bad_input = any(isinstance(e, InputError) for e in getattr(err, "worker_failures", {}).values())
        return (2 if bad_input else 1), None, None
    path = best_checkpoint(result_checkpoints(result), cfg.storage_path)
    if path is None:
        raise CheckpointError(f"run {result.path!r} reported no checkpoint")
    uri = to_uri(cfg.storage_path, path)
    table, _ = evaluate_on_cluster(uri, cfg)
    write_text(*filesystem(to_uri(cfg.storage_path, f"{result.path}/{RESULTS}")),
               to_json({"best_checkpoint": uri, "metric": "val_balanced_acc", "splits": table}))
    return 0, table, uri


if __name__ == "__main__":
    # Re-enter through the package so Ray pickles train_loop_per_worker by reference.
    from paco_ray.train import main as package_main

    sys.exit(package_main())
