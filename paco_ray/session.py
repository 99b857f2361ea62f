"""Where a training loop runs: in this process (``LocalSession``) or as a Ray Train worker
(``RaySession``). The loop talks to its session only: rank, device, DDP wrapping, the checkpoint
to resume from, telemetry and per-epoch reports."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_state, save_state
from .storage import filesystem
from .telemetry import RayMetrics, TensorBoard


class LocalSession:
    """One in-process worker: checkpoints go to ``out_dir/epoch_NNNN``; metrics are kept in a list;
    TensorBoard files (unless ``tensorboard=False``) in ``out_dir/tensorboard``."""

    def __init__(self, out_dir: str | os.PathLike, resume_from: str | os.PathLike | None = None,
                 device: str = "cpu", tensorboard: bool = True):
        self.rank, self.world_size, self.device = 0, 1, torch.device(device)
        self.out_dir, self.resume_from, self.tensorboard = Path(out_dir), resume_from, tensorboard
        self.reports: list[dict[str, Any]] = []

    def telemetry(self) -> tuple[TensorBoard | None, RayMetrics | None]:
        if not self.tensorboard:
            return None, None
        return TensorBoard(*filesystem(str(self.out_dir / "tensorboard"))), None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def load_checkpoint(self) -> dict | None:
        return load_state(self.resume_from) if self.resume_from else None

    def report(self, metrics: dict[str, Any], state: dict | None) -> None:
        if state is not None:
            path = save_state(self.out_dir / f"epoch_{metrics['epoch']:04d}", state).parent
            metrics = {**metrics, "checkpoint_path": str(path)}
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
