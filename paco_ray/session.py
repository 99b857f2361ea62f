"""Where a training loop runs: in this process (``LocalSession``) or as a Ray Train worker
(``RaySession``). The loop talks to its session only: rank, device, DDP wrapping, the checkpoint
to resume from, telemetry, per-epoch reports and the run folder's own files (config.yaml,
metrics.jsonl)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_state, save_state
from .run_folder import checkpoint_dir_name, trial_id_of
from .storage import exists, filesystem, read_text, write_text
from .telemetry import RayMetrics, TensorBoard


class LocalSession:
    """One in-process worker: checkpoints go to ``out_dir/checkpoint_epoch_NNNN``; metrics are kept in a list;
    TensorBoard files (unless ``tensorboard=False``) in ``out_dir/tensorboard``."""

    def __init__(self, out_dir: str | os.PathLike, resume_from: str | os.PathLike | None = None,
                 device: str = "cpu", tensorboard: bool = True):
        self.rank, self.world_size, self.device, self.trial_id = 0, 1, torch.device(device), ""
        self.out_dir, self.resume_from, self.tensorboard = Path(out_dir), resume_from, tensorboard
        self.reports: list[dict[str, Any]] = []

    def telemetry(self) -> tuple[TensorBoard | None, RayMetrics | None]:
        if not self.tensorboard:
            return None, None
        return TensorBoard(*filesystem(str(self.out_dir / "tensorboard"))), None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def write_run_file(self, name: str, text: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text(*filesystem(str(self.out_dir / name)), text)

    def read_run_file(self, name: str) -> str | None:
        path = self.out_dir / name
        return path.read_text() if path.is_file() else None

    def load_checkpoint(self) -> dict | None:
        return load_state(self.resume_from) if self.resume_from else None

    def report(self, metrics: dict[str, Any], state: dict | None) -> None:
        if state is not None:
            path = save_state(self.out_dir / checkpoint_dir_name(metrics["epoch"]), state).parent
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

    @property
    def trial_id(self) -> str:
        """The Tune trial this worker trains for; "" for a plain run."""
        import ray.train

        return trial_id_of(ray.train.get_context().get_experiment_name())

    def _run_path(self, name: str):
        import ray.train

        storage = ray.train.get_context().get_storage()
        return storage.storage_filesystem, f"{storage.experiment_fs_path}/{name}"

    def write_run_file(self, name: str, text: str) -> None:
        write_text(*self._run_path(name), text)

    def read_run_file(self, name: str) -> str | None:
        fs, path = self._run_path(name)
        return read_text(fs, path) if exists(fs, path) else None

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
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=checkpoint_dir_name(metrics["epoch"]))
