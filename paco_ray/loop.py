"""The training loop each worker runs, top to bottom: ``train(cfg, session)`` builds data, model and
optimizer; resumes if the session holds a checkpoint; then per epoch ``train_one_epoch``, evaluates
on the validation split and reports metrics with the full state. The session decides where it
runs: in this process (``session.LocalSession``) or as a Ray Train worker (``train_loop_per_worker``).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import TrainingState
from .config import TrainConfig
from .cpu_allocator import keep_freed_memory
from .data.loaders import build_loaders
from .data.longtail import ClassInfo
from .data.prepared import DatasetError, PreparedDataset
from .data.staging import local_dataset
from .errors import InputError
from .faults import KillPlan
from .losses import compute_loss
from .metrics import EpochStats, epoch_metrics, evaluate_split
from .model import PaCoModel
from .nonfinite import BatchNormState, all_reduce_sum, check_finite, nonfinite_flag, skipped_steps
from .optim import build_optimizer, skip_next_step_if
from .progress import EpochProgress, epoch_line, labelled, setup_logging
from .run_folder import CONFIG, MetricsLog, config_yaml
from .session import RaySession

NONFINITE_CHECK_EVERY = 50  # steps between the host's looks at the non-finite flags (one sync each)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    cfg = TrainConfig.from_dict(config)
    # Ray Train logs every report at INFO through a logger outside ray.train; obey log_level
    logging.getLogger().setLevel(cfg.log_level)
    train(cfg, RaySession(), KillPlan.from_env(os.environ))


def train(cfg: TrainConfig, session, kill_plan: KillPlan | None = None) -> None:
    """Train ``cfg`` on this worker; every epoch report validation metrics and the full state.
    ``kill_plan`` is a fault-injection drill (paco_ray.faults): this worker may SIGKILL itself once."""
    device = session.device
    logger = setup_logging()
    setup_process(cfg, device)
    data = open_dataset(cfg)
    classes = data.classes
    loaders = build_loaders(data, cfg.data, rank=session.rank, world_size=session.world_size, seed=cfg.seed,
                            device=device)
    log_prior = log_class_prior(classes, device)
    state = build_training_state(cfg, data, session)
    checkpoint = session.load_checkpoint()
    start_epoch = 0 if checkpoint is None else state.restore(checkpoint, cfg, classes)
    tensorboard, ray_metrics = session.telemetry()
    metrics_log = None
    if session.rank == 0:
        session.write_run_file(CONFIG, config_yaml(cfg.to_dict()))
        metrics_log = MetricsLog(session, start_epoch)
        logger.info(start_line(cfg, data, session, start_epoch))
    for epoch in range(start_epoch, cfg.optim.epochs):
        progress = EpochProgress(cfg.progress_every_s if session.rank == 0 else 0, epoch, cfg.optim.epochs,
                                 steps_per_epoch(cfg, data), session.trial_id)
        stats = train_one_epoch(cfg, state, loaders, log_prior, epoch, kill_plan=kill_plan, progress=progress)
        val = evaluate_split(state.model, loaders, "val", classes, device)
        val_per_class = val.pop("per_class")
        metrics = epoch_metrics(epoch, stats, val, queue_fill(cfg, state))
        if ray_metrics is not None:  # Ray gauges from every worker, each with its own throughput
            ray_metrics.record({**metrics, "images_per_s": stats.local_images / stats.elapsed})
        if tensorboard is not None:
            tensorboard.log(metrics, val_per_class, classes)
        full_state = None
        if session.rank == 0:
            logger.info(epoch_line(metrics, cfg.optim.epochs, session.trial_id))
            metrics_log.append(metrics)
            full_state = state.to_checkpoint(cfg, classes, epoch + 1, metrics)
        if tensorboard is not None:
            tensorboard.flush()  # this epoch's scalars and figure on disk before the report
        session.report(metrics, full_state)
    if tensorboard is not None:
        tensorboard.close()


def setup_process(cfg: TrainConfig, device: torch.device) -> None:
    """Threads, allocator, determinism and the seed of this worker's process."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        keep_freed_memory()  # no page faults for each step's activations
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank


def open_dataset(cfg: TrainConfig) -> PreparedDataset:
    """The prepared dataset of ``cfg``; one in object storage is staged into this node's cache first."""
    if not cfg.data.path:
        raise DatasetError("data.path: empty; prepare a dataset with python -m pipelines... (python -m "
                           "paco_ray.train prepares the embedded default itself)")
    return PreparedDataset.open(local_dataset(cfg.data.path, cfg.data.stage_dir))


def steps_per_epoch(cfg: TrainConfig, data: PreparedDataset) -> int:
    """Full global batches per epoch (the last partial one is dropped)."""
    steps = data.size("train") // cfg.data.batch_size
    if steps == 0:
        raise InputError(f"data.batch_size: {cfg.data.batch_size} exceeds the {data.size('train')} training images")
    return steps


def build_training_state(cfg: TrainConfig, data: PreparedDataset, session) -> TrainingState:
    """The model (on the session's device, DDP-wrapped by a Ray session), its optimizer, schedule
    and gradient scaler, freshly initialised."""
    device = session.device
    model = PaCoModel.from_config(cfg, data.classes.num_classes, data.channels)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile_encoders()
    model = session.prepare_model(model)
    optimizer, scheduler = build_optimizer(model, cfg.optim, steps_per_epoch(cfg, data))
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp(cfg, device) and cfg.amp_dtype == "float16")
    return TrainingState(model, optimizer, scheduler, scaler)


def queue_fill(cfg: TrainConfig, state: TrainingState) -> float | None:
    """The share of the key queue holding keys; None for a loss without one."""
    return state.module.queue.filled().item() / cfg.paco.queue_size if cfg.contrastive else None


def log_class_prior(classes: ClassInfo, device: torch.device) -> torch.Tensor:
    counts = torch.tensor(classes.train_counts, dtype=torch.float, device=device)
    return (counts / counts.sum()).log()


def use_amp(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp and device.type == "cuda"


def start_line(cfg: TrainConfig, data: PreparedDataset, session, start_epoch: int) -> str:
    where = f"resuming at epoch {start_epoch + 1}" if start_epoch else "starting"
    first = "; FFCV compiles its pipelines on the first batch" if cfg.data.loader == "ffcv" else ""
    return labelled(session.trial_id, f"{cfg.loss}: {where}, {data.size('train')} training images of "
                    f"{data.classes.num_classes} classes, {session.world_size} worker(s) on {session.device.type}, "
                    f"{steps_per_epoch(cfg, data)} steps per epoch{first}")


def train_one_epoch(cfg: TrainConfig, state: TrainingState, loaders, log_prior: torch.Tensor, epoch: int, *,
                    kill_plan: KillPlan | None = None, progress: EpochProgress | None = None) -> EpochStats:
    """One pass over this rank's shard of the training split. A step whose loss or gradients are
    not finite on any rank is skipped on every rank, on the device, and leaves no trace (weights,
    optimizer state, key encoder, queue and, with ``skip_nonfinite``, BatchNorm statistics as
    before it); the host looks at the flags every NONFINITE_CHECK_EVERY steps and at the end, and
    stops with an error naming the first such step unless ``skip_nonfinite``. No per-step host
    sync: bookkeeping stays on the device."""
    device, steps = log_prior.device, steps_per_epoch(cfg, loaders.data)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    state.model.train()
    started = time.perf_counter()
    loss_sum, images = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros(loaders.data.size("train"), dtype=torch.int32, device=device)
    flags: list[torch.Tensor] = []  # per step: 1 when the loss or a gradient was not finite on some rank
    losses: list[torch.Tensor] = []
    params = [p for p in state.model.parameters() if p.requires_grad]
    batch_norm = BatchNormState(state.model) if cfg.skip_nonfinite else None
    for x_q, x_k, labels, index in loaders.train(epoch):
        if kill_plan is not None:
            kill_plan.maybe_kill(rank, epoch * steps + len(flags) + 1)
        x_q, labels = loaders.normalize(x_q), labels.to(device, non_blocking=True)
        x_k = loaders.normalize(x_k) if cfg.contrastive else None
        bad, loss = train_step(cfg, state, x_q, x_k, labels, log_prior, params, batch_norm)
        flags.append(bad)
        losses.append(loss)
        if not cfg.skip_nonfinite and len(flags) % NONFINITE_CHECK_EVERY == 0:
            check_finite(flags, losses, epoch, steps)
        ok = 1 - bad
        loss_sum += torch.where(bad.bool(), 0.0, loss)
        seen.index_add_(0, index.to(device, non_blocking=True), ok.expand(index.numel()))
        images += ok * labels.numel()
        if progress is not None:
            progress.step(len(flags), len(flags) * labels.numel() * world_size, loss, state.lr)
    if not cfg.skip_nonfinite:
        check_finite(flags, losses, epoch, steps)
    skipped = skipped_steps(flags, epoch, steps)
    return EpochStats(loss=all_reduce_sum(loss_sum / (len(flags) - len(skipped))).item() / world_size,
                      elapsed=time.perf_counter() - started, seen=all_reduce_sum(seen),
                      local_images=int(images.item()), skipped=len(skipped), lr=state.lr)


def train_step(cfg: TrainConfig, state: TrainingState, x_q: torch.Tensor, x_k: torch.Tensor | None,
               labels: torch.Tensor, log_prior: torch.Tensor, params: list[torch.Tensor],
               batch_norm: BatchNormState | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward and the optimizer step of one batch, taken only when the loss and
    gradients are finite on every rank: (the step's 0/1 non-finite flag, its loss), both on the device."""
    device = labels.device
    if batch_norm is not None:
        batch_norm.save()
    with torch.autocast(device.type, dtype=getattr(torch, cfg.amp_dtype), enabled=use_amp(cfg, device)):
        out = state.model(x_q, x_k, labels)
        loss = compute_loss(cfg.loss, out, labels, log_prior, cfg.paco)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    # every rank takes the same decision; with a GradScaler (float16) it judges the gradients
    bad = nonfinite_flag(loss, params, check_gradients=not state.scaler.is_enabled())
    skip_next_step_if(state.optimizer, bad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.module.end_step(out, labels, 1 - bad)  # momentum update and enqueue, only for a step taken
    if batch_norm is not None:
        batch_norm.restore_if(bad)
    state.scheduler.step()  # the schedule counts batches, skipped ones included
    return bad, loss.detach().float()
