"""Full training state on disk: one ``state.pt`` per checkpoint directory, written atomically and
read back with ``torch.load(weights_only=True)``; and the resume policy, the checks that decide
whether a run may resume from one (``RESUME_MAY_CHANGE``, ``resume_conflict``, ``TrainingState.restore``)."""
from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import DefaultDataConfig, TrainConfig
from .errors import CheckpointError
from .run_folder import STATE_FILE
from .schema import ConfigError, differences

if TYPE_CHECKING:
    from .data.longtail import ClassInfo

__all__ = ["CheckpointError", "STATE_FILE", "TrainingState", "save_state", "load_state", "load_model_weights",
           "resume_conflict", "RESUME_MAY_CHANGE"]

REQUIRED_KEYS = ("config", "classes", "epoch", "model")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng")  # beyond what every checkpoint has
# What may change between a checkpoint and the run that resumes from it: resources, I/O, logging.
RESUME_MAY_CHANGE = {"workers", "cpus_per_worker", "use_gpu", "amp", "amp_dtype", "storage_path", "name",
                     "keep_checkpoints", "max_failures", "node_wait_s", "node_infeasible_s", "node_types", "log_level", "placement_strategy",
                     "skip_nonfinite", "compile", "progress_every_s",
                     "resume_override", "data.num_workers", "data.eval_batch_size", "data.stage_dir",
                     *(f"default_data.{f.name}" for f in dataclasses.fields(DefaultDataConfig))}


def resume_conflict(saved: dict[str, Any], cfg: TrainConfig) -> str | None:
    """The first training setting in which ``cfg`` differs from a checkpoint's config, as
    ``key (checkpoint value vs this run's)``; None when resuming would continue the same run."""
    theirs = TrainConfig.from_dict(saved).to_dict()
    for key, mine, saved_value in differences(cfg.to_dict(), theirs):
        if key not in RESUME_MAY_CHANGE:
            return f"{key} ({saved_value!r} in the checkpoint vs {mine!r})"
    return None


def save_state(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically: into a temporary file, flushed to disk,
    then renamed over the old one. A crash at any point leaves the old file or the new one, whole."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / STATE_FILE
    for stale in directory.glob(f".{STATE_FILE}.tmp-*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)  # the rename itself survives a power loss
    return final


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


def error_reason(error: BaseException) -> str:
    """What an error says, in one short line: the line with the unpickler's complaint when there is
    one (torch's weights-only refusals explain the option first), else the first line; terminal
    colour codes removed, cut after the first sentence. Its type when it says nothing."""
    lines = [" ".join(ANSI_CODE.sub("", line).split()) for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    line = next((line for line in lines if "Unpickler error:" in line), lines[0])
    return line.split(". ", 1)[0].rstrip(".")


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state saved by :func:`save_state` (a directory or the file itself); an unreadable
    file is one line naming it, the error's type and torch's (or pickle's) reason."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(file)!r} does not exist")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        reason = error_reason(err)
        detail = "" if reason == type(err).__name__ else f": {reason}"
        raise CheckpointError(f"checkpoint {str(file)!r} is unreadable ({type(err).__name__}){detail}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(file)!r} lacks {', '.join(missing)}")
    return state


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], cfg: TrainConfig, num_classes: int) -> None:
    """``state["model"]`` into ``model`` (unwrapped), or a one-line CheckpointError saying why not."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint does not fit this model ({cfg.model.backbone}, "
                              f"{num_classes} classes): {first}") from None


@dataclass
class TrainingState:
    """What a training step changes and a checkpoint saves, travelling together: the model (DDP-
    wrapped on Ray workers), its optimizer, the learning-rate schedule and the gradient scaler."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler

    @property
    def module(self) -> torch.nn.Module:
        """The model without its DDP wrapper."""
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def to_checkpoint(self, cfg: TrainConfig, classes: "ClassInfo", epoch: int,
                      metrics: dict[str, Any]) -> dict[str, Any]:
        """Everything a run needs to continue bit-identically after ``epoch``."""
        return {"config": cfg.to_dict(), "classes": classes.to_dict(), "epoch": epoch,
                "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_states(),
                "metrics": metrics}

    def restore(self, state: dict[str, Any], cfg: TrainConfig, classes: "ClassInfo") -> int:
        """Check that ``state`` continues the run ``cfg`` describes, load it (and the RNGs), and
        return the epoch to start from."""
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
        load_model_weights(self.module, state, cfg, classes.num_classes)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        return state["epoch"]
