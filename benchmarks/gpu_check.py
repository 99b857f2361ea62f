"""GPU check of the pure-PyTorch path, for a bare machine (no Ray, no FFCV, no timm, no dataset
package), in a few minutes:

PYTHONPATH=. python benchmarks/gpu_check.py [--epochs 2]

1. paco_loss on CUDA (inside bf16 autocast, as the training step calls it) against the same
   inputs on CPU: values and gradients.
2. PaCo vs CE training step, ResNet-50 at 224 px, batch 128, bf16, channels_last (synthetic).
3. The batched photometric ops on the device against the per-sample loop (on the device's
   tensors, and on the CPU as a loader process would run it), images/s; timm's RandAugment
   views only batched (their per-sample reference needs timm and PIL).
4. Augmenting batches and training steps (``train_one_epoch``) under
   ``torch.cuda.set_sync_debug_mode("error")``: nothing in them may wait for the device.
5. The training loop in-process (``train(cfg, LocalSession)``, torch loader, bf16 autocast,
   channels_last) for a few epochs on a Fashion-MNIST-shaped dataset generated here (real IDX
   files through the real pipeline; FFCV's .beton files are placeholders when FFCV is absent,
   since the torch loader reads the manifest's sources), then exact resume from epoch 1.

Prints one table: check, result, figure.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.checkpoint import load_state  # noqa: E402
from paco_ray.config import DataConfig, load_config  # noqa: E402
from paco_ray.data.augment import batched_photometric  # noqa: E402
from paco_ray.data.reference_augment import photometric  # noqa: E402
from paco_ray.data.loaders import build_loaders  # noqa: E402
from paco_ray.data.prepared import PreparedDataset  # noqa: E402
from paco_ray.data.idx import write_idx  # noqa: E402
from paco_ray.losses import paco_loss  # noqa: E402
from paco_ray.session import LocalSession  # noqa: E402
from paco_ray.checkpoint import TrainingState  # noqa: E402
from paco_ray.loop import log_class_prior, train, train_one_epoch  # noqa: E402
from paco_ray.model import PaCoModel  # noqa: E402
from paco_ray.optim import build_optimizer  # noqa: E402
from augment import images as random_images, rate  # noqa: E402
from step import GPU_SETUPS, make_step  # noqa: E402
from timing import timed  # noqa: E402

FILL = (124, 116, 104)


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


def step_ratio(device: torch.device, setup=GPU_SETUPS["imagenet_lt resnet50 224px"], repeats: int = 10):
    """Median PaCo and CE step times, interleaved, after warm-up."""
    steps = {loss: make_step(loss, *setup, device)[0] for loss in ("paco", "ce")}
    for _ in range(3):
        for step in steps.values():
            step()
    times = {loss: [] for loss in steps}
    for _ in range(repeats):
        for loss, step in steps.items():
            times[loss].append(timed(step, device))
    paco, ce = (statistics.median(times[loss]) for loss in ("paco", "ce"))
    batch = setup[4]
    return paco / ce <= 1.4, (f"PaCo {1000 * paco:.1f} ms ({batch / paco:,.0f} img/s), CE {1000 * ce:.1f} ms, "
                              f"PaCo / CE {paco / ce:.2f}x (goal <= 1.4x)")


def has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


AUGMENT_CASES = [("sim", 224), ("autoaugment_cutout", 32), ("randcls", 224), ("randaugment", 224)]


def augment_rates(device: torch.device, batch: int = 128, repeats: int = 5) -> list[tuple[str, bool, str]]:
    """Images/s of each view's photometric ops: batched on the device vs image by image."""
    cfg = DataConfig(randaugment_ops=2, randaugment_magnitude=10, randaugment_std=0.5, cutout=16)
    timm = has_module("timm")  # the per-sample RandAugment reference
    rows = []
    for view, size in AUGMENT_CASES:
        generator = torch.Generator().manual_seed(0)
        batched = batched_photometric(view, cfg, FILL)
        x = random_images(batch, size, device)
        fast = rate(lambda b: batched(b, generator), x, repeats, device)
        figure = f"batched {fast:,.0f} img/s"
        if view in ("sim", "autoaugment_cutout") or timm:
            reference = torch.nn.Sequential(*photometric(view, cfg, FILL))
            on_device = rate(lambda b: torch.stack([reference(i) for i in b]), x, 1, device)
            on_cpu = rate(lambda b: torch.stack([reference(i) for i in b.cpu()]).to(device), x, 1, device)
            figure += (f"; per sample on {device.type} {on_device:,.0f} img/s ({fast / on_device:.1f}x), "
                       f"on cpu {on_cpu:,.0f} img/s ({fast / on_cpu:.1f}x)")
        rows.append((f"batched {view} {size}px, batch {batch}", True, figure))
    return rows


@contextlib.contextmanager
def sync_debug_error(device: torch.device):
    """Any call that waits for the device raises (CUDA only; a no-op on CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


class WatchedLoaders:
    """The real loaders, with every training batch (loading, moving, augmenting) and the step
    consuming it run under sync_debug_error; the epoch's end (which reads its figures) outside."""

    def __init__(self, loaders, device: torch.device):
        self.loaders, self.device, self.batches = loaders, device, 0

    def __getattr__(self, name):
        return getattr(self.loaders, name)

    def train(self, epoch: int):
        batches = self.loaders.train(epoch)
        with sync_debug_error(self.device):
            for batch in batches:
                self.batches += 1
                yield batch


def no_sync_check(device: torch.device, data_path: Path) -> tuple[bool, str]:
    """One epoch of warm-up, then a full epoch of ``train_one_epoch`` (torch loader, the published
    ImageNet-LT views randcls/sim, bf16 autocast) whose every batch and step runs under sync
    debug mode "error"."""
    cfg = load_config(None, [f"data.path={data_path}", "data.loader=torch", "data.query_view=randcls",
                             "data.key_view=sim", "data.randaugment_ops=2", "data.batch_size=64",
                             "workers=1", "use_gpu=true", "optim.epochs=2", "optim.warmup_epochs=0",
                             "skip_nonfinite=true"])  # no periodic look at the flags: every step sync-free
    data = PreparedDataset.open(data_path)
    loaders = WatchedLoaders(build_loaders(data, cfg.data, rank=0, world_size=1, seed=0, device=device), device)
    torch.manual_seed(0)
    model = PaCoModel.from_config(cfg, data.classes.num_classes, data.channels).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = data.size("train") // cfg.data.batch_size
    optimizer, scheduler = build_optimizer(model, cfg.optim, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    prior = log_class_prior(data.classes, device)
    state = TrainingState(model, optimizer, scheduler, scaler)
    train_one_epoch(cfg, state, loaders.loaders, prior, 0)  # warm-up
    try:
        stats = train_one_epoch(cfg, state, loaders, prior, 1)
    except RuntimeError as err:
        return False, f"a sync in step {loaders.batches}: {str(err).splitlines()[0]}"
    mode = "sync debug mode 'error'" if device.type == "cuda" else "(no CUDA: not checked)"
    return loaders.batches == steps, (f"{loaders.batches} batches and steps under {mode}, "
                                      f"loss {stats.loss:.3f}, {stats.local_images / stats.elapsed:,.0f} img/s")


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
    rows = [("augmentation and steps never wait for the device", *no_sync_check(device, data))]
    cfg = load_config(None, [f"data.path={data}", "data.loader=torch", "workers=1", "deterministic=false",
                             f"optim.epochs={epochs}", "use_gpu=true", f"storage_path={root / 'runs'}"])
    started = time.perf_counter()
    straight = LocalSession(root / "straight", device=device.type, tensorboard=False)
    train(cfg, straight)
    wall = time.perf_counter() - started
    last = straight.reports[-1]
    rows.append((f"{epochs} epochs in-process (torch loader, bf16, channels_last)",
                 last["val_balanced_acc"] > 30 and all(np.isfinite(r["train_loss"]) for r in straight.reports),
                 f"val balanced {last['val_balanced_acc']:.1f} (chance 10), {wall:.1f} s, "
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
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    rows = [("paco_loss on CUDA in bf16 autocast vs CPU", *loss_agreement(device))]
    rows.append(("PaCo vs CE step, ResNet-50 224px, batch 128, bf16", *step_ratio(device)))
    rows += augment_rates(device)
    with tempfile.TemporaryDirectory() as tmp:
        rows += loop_check(device, args.epochs, Path(tmp))
    width = max(len(r[0]) for r in rows)
    for name, ok, figure in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {figure}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
