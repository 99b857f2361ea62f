"""GPU check of the pure-PyTorch path, for a bare machine (no Ray, no FFCV, no dataset package):

PYTHONPATH=. python benchmarks/gpu_check.py [--epochs 2]

1. paco_loss on CUDA (inside bf16 autocast, as the training step calls it) against the same
   inputs on CPU: values and gradients.
2. The training loop in-process (``train(cfg, LocalSession)``, torch loader, bf16 autocast,
   channels_last) for a few epochs on a Fashion-MNIST-shaped dataset generated here (real IDX
   files through the real pipeline; FFCV's .beton files are placeholders when FFCV is absent,
   since the torch loader reads the manifest's sources), then exact resume from epoch 1.

Prints one table: check, result, figure.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.checkpoint import load_state  # noqa: E402
from paco_ray.config import load_config  # noqa: E402
from paco_ray.data.idx import write_idx  # noqa: E402
from paco_ray.losses import paco_loss  # noqa: E402
from paco_ray.session import LocalSession  # noqa: E402
from paco_ray.train import train  # noqa: E402


def loss_agreement(device: torch.device) -> tuple[bool, str]:
    """paco_loss and its gradient on ``device`` under bf16 autocast vs float32 on CPU."""
    g = torch.Generator().manual_seed(0)
    b, k, c, d = 128, 8192, 1000, 128
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    labels, queue_labels = torch.randint(0, c, (b,), generator=g), torch.randint(-1, c, (k,), generator=g)
    logits, log_prior = torch.randn(b, c, generator=g), torch.log_softmax(torch.randn(c, generator=g), 0)

    def run(dev, autocast):
        q_ = q.detach().clone().to(dev).requires_grad_()
        z = logits.detach().clone().to(dev).requires_grad_()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            value = paco_loss(q_, keys.to(dev), queue.to(dev), labels.to(dev), queue_labels.to(dev), z,
                              log_prior.to(dev), alpha=0.05, temperature=0.2)
        value.backward()
        return value.detach().cpu(), q_.grad.cpu(), z.grad.cpu()

    cpu, gpu = run(torch.device("cpu"), False), run(device, True)
    worst = max((a - b_).abs().max().item() for a, b_ in zip(cpu, gpu))
    return worst <= 1e-4, f"max |cpu - {device.type}| over loss and grads {worst:.1e}"


def make_dataset(root: Path) -> Path:
    """A 10-class 28x28 dataset in Fashion-MNIST's IDX layout (class = brightness), prepared."""
    import pipelines.writer as writer
    from pipelines.fashion_mnist import prepare

    if importlib.util.find_spec("ffcv") is None:  # the torch loader never opens the .beton files
        writer.write_beton = lambda path, samples, **_: Path(path).touch()
    rng = np.random.default_rng(0)
    raw = root / "raw"
    raw.mkdir(parents=True)
    for prefix, per_class in (("train", 600), ("t10k", 50)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = (labels[:, None, None] * 25 + rng.integers(0, 8, (len(labels), 28, 28))).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return prepare(raw, root / "prepared", imbalance_factor=10, max_per_class=500, val_per_class=50)


def loop_check(device: torch.device, epochs: int, root: Path) -> list[tuple[str, bool, str]]:
    data = make_dataset(root)
    cfg = load_config(None, [f"data.path={data}", "data.loader=torch", "workers=1", "deterministic=false",
                             f"optim.epochs={epochs}", "use_gpu=true", f"storage_path={root / 'runs'}"])
    rows = []
    started = time.perf_counter()
    straight = LocalSession(root / "straight", device=device.type, tensorboard=False)
    train(cfg, straight)
    wall = time.perf_counter() - started
    last = straight.reports[-1]
    rows.append((f"{epochs} epochs in-process (torch loader, bf16, channels_last)",
                 last["val_balanced_acc"] > 50 and all(np.isfinite(r["train_loss"]) for r in straight.reports),
                 f"val balanced {last['val_balanced_acc']:.1f}, {wall:.1f} s, "
                 f"{last['images_per_s']:.0f} img/s (last epoch)"))
    resumed = LocalSession(root / "resumed", resume_from=straight.reports[0]["checkpoint_path"], device=device.type,
                           tensorboard=False)
    train(cfg, resumed)
    a, b = (load_state(s.reports[-1]["checkpoint_path"])["model"] for s in (straight, resumed))
    worst = max((a[n].float() - b[n].float()).abs().max().item() for n in a if a[n].is_floating_point())
    rows.append(("resume from epoch 1 on the GPU", [r["epoch"] for r in resumed.reports] == list(range(2, epochs + 1)),
                 f"max weight difference to the uninterrupted run {worst:.1e} (cuDNN is not bit-deterministic)"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    rows = [("paco_loss on CUDA in bf16 autocast vs CPU", *loss_agreement(device))]
    with tempfile.TemporaryDirectory() as tmp:
        rows += loop_check(device, args.epochs, Path(tmp))
    width = max(len(r[0]) for r in rows)
    for name, ok, figure in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {figure}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
