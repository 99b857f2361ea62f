"""Models released with the official code (dvlab-research/Parametric-Contrastive-Learning) as
paco_ray checkpoints: ``paco-import OFFICIAL.pth --config CONFIG.yaml --out CKPT``.

The official files are DDP ``state_dict``s of its MoCo builder (inside ``{"state_dict": ...}``, keys
prefixed ``module.``): ``encoder_q`` (the backbone, its ``fc`` replaced by the projector),
``encoder_k`` (PaCo's momentum copy; GPaCo has none), ``linear`` (the classifier on the pooled
feature), ``linear_k`` (unused), the queue ``queue``/``queue_l``/``queue_ptr``. They map one to
one onto PaCoModel: ``encoder_q.<trunk>`` -> ``encoder.<trunk>``, ``encoder_q.fc.<i>`` ->
``projector.<i>`` (the same Sequential indices for the PaCo head, Linear-BN-ReLU-Linear, and the
GPaCo head, Linear-ReLU-Linear-ReLU-Linear), ``encoder_k`` -> ``key_encoder``/``key_projector``,
``linear`` -> ``classifier``, the queue -> ``queue.keys``/``labels``/``ptr``. The config names the
architecture (backbone, loss, proj_dim, projector, queue size) and the prepared dataset (its
classes); every tensor of the model must be found with its shape, or the import is refused in one
line. The result is a checkpoint ``paco-eval`` evaluates and ``model.pretrained`` starts from.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import InputError

PREFIXES = (("encoder_q.fc.", "projector."), ("encoder_k.fc.", "key_projector."), ("encoder_q.", "encoder."),
            ("encoder_k.", "key_encoder."), ("linear.", "classifier."))
QUEUE = {"queue": "queue.keys", "queue_l": "queue.labels", "queue_ptr": "queue.ptr"}
DROPPED = ("linear_k.",)  # the official key-side classifier: never used in its forward


def official_weights(raw: Any, source: str = "the file") -> dict:
    """The official state dict inside a loaded file: ``{"state_dict": ...}`` or the dict itself,
    without DDP's ``module.`` prefix."""
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{source}: not an official PaCo/GPaCo checkpoint (no state dict)")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("encoder_q.") for k in state):
        raise InputError(f"{source}: not an official PaCo/GPaCo checkpoint (no encoder_q.* tensors)")
    return state


def convert(official: dict) -> dict:
    """The official tensors under paco_ray's names (module docstring)."""
    import torch

    out = {}
    for key, value in official.items():
        if key.startswith(DROPPED):
            continue
        if key in QUEUE:
            out[QUEUE[key]] = value.reshape(()) if key == "queue_ptr" else value
            continue
        for theirs, ours in PREFIXES:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            out[key] = value
    if "queue.labels" in out:
        out["queue.labels"] = out["queue.labels"].to(torch.long)
    return out


def load_into(model, official: dict, source: str) -> None:
    """Every tensor of ``model`` from the converted official weights, or a one-line InputError."""
    converted = convert(official)
    own = model.state_dict()
    missing = [k for k in own if k not in converted]
    if missing:
        raise InputError(f"{source}: has no tensor for {missing[0]} (and {len(missing) - 1} more): another "
                         "backbone, loss or projector than the config's?")
    wrong = [k for k in own if tuple(converted[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise InputError(f"{source}: {wrong[0]} is {tuple(converted[wrong[0]].shape)} in the file but "
                         f"{tuple(own[wrong[0]].shape)} in the config's model (classes, proj_dim or queue size?)")
    model.load_state_dict({k: converted[k] for k in own})


def import_official(source: str, cfg, out: str) -> str:
    """Convert the official checkpoint ``source`` for the model and dataset of ``cfg``; write it to
    ``out`` (a paco_ray checkpoint directory) and return its path."""
    import torch

    from .checkpoint import save_state
    from .data.prepared import PreparedDataset
    from .data.staging import local_dataset
    from .model import PaCoModel

    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{source} does not exist") from None
    except Exception as err:
        raise InputError(f"{source}: unreadable ({type(err).__name__})") from None
    data = PreparedDataset.open(local_dataset(cfg.data.path, cfg.data.stage_dir))
    model = PaCoModel.from_config(cfg, data.classes.num_classes, data.channels)
    load_into(model, official_weights(raw, source), source)
    state = {"config": cfg.to_dict(), "classes": data.classes.to_dict(), "epoch": int(raw.get("epoch", 0))
             if isinstance(raw, dict) else 0, "model": model.state_dict(), "metrics": {"imported_from": source}}
    return str(save_state(out, state).parent)


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    parser = argparse.ArgumentParser(prog="paco-import", description=__doc__.split("\n\n")[0])
    parser.add_argument("official", help="a model file released with the official code (.pth / .pth.tar)")
    parser.add_argument("--config", required=True, help="the training config of its architecture and dataset "
                                                       "(e.g. configs/imagenet_lt.yaml with data.path set)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (paco-eval reads it)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if not cfg.data.path:
            raise InputError("data.path: the prepared dataset the model was trained on is needed (its classes)")
        print(import_official(args.official, cfg, args.out))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
