"""Full training state on disk: one ``state.pt`` per checkpoint directory, written atomically and
read back with ``torch.load(weights_only=True)``; and the checks that decide whether a run may
resume from one (``restore_training``)."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import resume_conflict
from .errors import InputError
from .schema import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data.longtail import ClassInfo

STATE_FILE = "state.pt"
REQUIRED_KEYS = ("config", "classes", "epoch", "model")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng")  # beyond what every checkpoint has


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the file."""


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


def training_state(cfg: "TrainConfig", classes: "ClassInfo", epoch: int, model: torch.nn.Module, optimizer,
                   scheduler, scaler, metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything a run needs to continue bit-identically after ``epoch`` (``model`` unwrapped)."""
    return {"config": cfg.to_dict(), "classes": classes.to_dict(), "epoch": epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_states(), "metrics": metrics}


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], cfg: "TrainConfig", num_classes: int) -> None:
    """``state["model"]`` into ``model`` (unwrapped), or a one-line CheckpointError saying why not."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint does not fit this model ({cfg.model.backbone}, "
                              f"{num_classes} classes): {first}") from None


def restore_training(state: dict[str, Any], cfg: "TrainConfig", classes: "ClassInfo", model: torch.nn.Module,
                     optimizer, scheduler, scaler) -> int:
    """Check that ``state`` continues the run ``cfg`` describes, load it into model (unwrapped),
    optimizer, scheduler, scaler and the RNGs, and return the epoch to start from."""
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
    load_model_weights(model, state, cfg, classes.num_classes)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return state["epoch"]
