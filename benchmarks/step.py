"""One full training step of PaCo (and GPaCo, Balanced Softmax) vs cross-entropy: same backbone,
same batch, same optimizer. A PaCo step is: query encoder forward, momentum update of the key
encoder (torch._foreach), key encoder forward, enqueue, loss, backward, SGD step.

python benchmarks/step.py [--repeats 15] [--device cpu|cuda] [--threads N] [--default-malloc]

On CUDA a third setup runs too: ResNet-50 at 224 px, batch 128, 1000 classes, K 8192, bf16.

Times are medians over --repeats steps after warm-up, the losses interleaved step by step. The
share of the key encoder's forward pass is measured on its own for scale.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.config import load_config  # noqa: E402
from paco_ray.cpu_allocator import keep_freed_memory  # noqa: E402
from paco_ray.losses import compute_loss  # noqa: E402
from paco_ray.model import PaCoModel  # noqa: E402
from timing import device_args, timed  # noqa: E402

SETUPS = {  # name -> (backbone, channels, image size, classes, batch, proj_dim, queue)
    "fashion_mnist_lt resnet_small28": ("resnet_small28", 1, 28, 10, 128, 64, 1024),
    "cifar100_lt resnet32": ("resnet32", 3, 32, 100, 128, 32, 1024),
}
GPU_SETUPS = {  # on CUDA only (bf16 autocast, channels_last): the ImageNet-LT scale
    "imagenet_lt resnet50 224px": ("resnet50", 3, 224, 1000, 128, 128, 8192),
}
LOSSES = ("ce", "balanced_softmax", "paco", "gpaco")


def make_step(loss, backbone, channels, size, classes, batch, proj_dim, queue, device, compile_encoders=False):
    cfg = load_config(None, [f"loss={loss}", f"model.backbone={backbone}", f"model.proj_dim={proj_dim}",
                             f"paco.queue_size={queue}", "paco.alpha=0.05"])
    torch.manual_seed(0)
    model = PaCoModel.from_config(cfg, classes, channels).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile_encoders:
        model.compile_encoders()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x_q = torch.randn(batch, channels, size, size, generator=g).to(device)
    x_k = torch.randn(batch, channels, size, size, generator=g).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    log_prior = torch.log(torch.linspace(1, 0.01, classes)).to(device)
    log_prior -= log_prior.logsumexp(0)
    use_amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x_q, x_k if cfg.contrastive else None, labels)
            value = compute_loss(cfg.loss, out, labels, log_prior, cfg.paco)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        model.end_step(out, labels)  # the momentum update and the enqueue (PaCo, GPaCo)

    def key_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            model.key_projector(model.key_encoder(x_k))

    return step, (key_forward if loss == "paco" else None)


def main() -> None:
    args, device = device_args(__doc__.split("\n\n")[0], repeats=15, extra=[(
        "--default-malloc", dict(action="store_true", help="leave glibc's malloc as it is (paco_ray.train "
                                 "makes it keep freed memory on the CPU)"))])
    if not args.default_malloc:
        keep_freed_memory()  # as paco_ray.train does on the CPU
    headline = None
    setups = {**SETUPS, **(GPU_SETUPS if device.type == "cuda" else {})}
    for name, setup in setups.items():
        steps = {loss: make_step(loss, *setup, device) for loss in LOSSES}
        for _ in range(3):  # warm-up (and fill the queue)
            for step, _ in steps.values():
                step()
        times = {loss: [] for loss in LOSSES}
        key_times = []
        for _ in range(args.repeats):
            for loss, (step, key_forward) in steps.items():
                times[loss].append(timed(step, device))
                if key_forward is not None:
                    key_times.append(timed(key_forward, device))
        median = {loss: statistics.median(t) for loss, t in times.items()}
        print(f"{name} batch {setup[4]}:")
        for loss in LOSSES:
            print(f"{name} {loss} step ms: {1000 * median[loss]:.1f}")
        print(f"{name} key encoder forward ms: {1000 * statistics.median(key_times):.1f} "
              f"({statistics.median(key_times) / median['paco']:.0%} of the PaCo step)")
        for loss in ("balanced_softmax", "gpaco", "paco"):
            print(f"{name} {loss} / ce: {median[loss] / median['ce']:.2f}x")
        headline = headline or median["paco"] / median["ce"]
    print(f"PaCo step / CE step, {next(iter(SETUPS))} (goal <= 1.4x): {headline:.2f}x")


if __name__ == "__main__":
    main()
