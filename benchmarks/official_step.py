"""The official PaCo training step against paco_ray's, side by side in one run, from the same
weights, the same queue and the same synthetic inputs: images/s (medians, interleaved) and the
loss values of the first steps.

python benchmarks/official_step.py --official-repo PATH [--device cuda] [--steps 20] [--precision default bf16]

PATH is a checkout of dvlab-research/Parametric-Contrastive-Learning that you supply: its
PaCo/LT/moco/builder.py (MoCo) and PaCo/LT/losses.py (PaCoLoss) are imported from there; nothing
of it is in this repository. Both take ResNet-50 at 224 px, batch 128, 1000 classes, K 8192,
dim 128 by default (--arch, --size, --batch, --classes, --queue, --dim for smaller runs) and SGD
(lr 0.02, momentum 0.9, wd 5e-4). Precision: ``default`` is each side's own (the official fp32,
paco_ray's bf16 autocast on CUDA), ``bf16`` both in bf16 autocast. The official code runs under
a one-process DDP group, which its queue's all-gather needs; it hard-codes CUDA in places, which
on CPU (to try the script) are made no-ops.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.config import load_config  # noqa: E402
from paco_ray.losses import compute_loss  # noqa: E402
from paco_ray.model import PaCoModel  # noqa: E402
from paco_ray.official import load_into, official_weights  # noqa: E402
from timing import timed  # noqa: E402


def import_official(repo: Path):
    """(MoCo, PaCoLoss) of the checkout at ``repo``."""
    code = repo / "PaCo" / "LT"
    if not (code / "moco" / "builder.py").is_file() or not (code / "losses.py").is_file():
        raise SystemExit(f"error: --official-repo {repo}: no PaCo/LT/moco/builder.py and PaCo/LT/losses.py there")
    sys.path.insert(0, str(code))
    import moco.builder
    from losses import PaCoLoss

    return moco.builder.MoCo, PaCoLoss


@contextlib.contextmanager
def cuda_calls_stay_on(device: torch.device):
    """On CPU, the official code's hard-coded ``.cuda()`` and ``torch.device('cuda')`` moves are no-ops."""
    if device.type == "cuda":
        yield
        return
    saved = torch.Tensor.cuda, torch.Tensor.to
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.to = lambda self, *a, **k: self if a and isinstance(a[0], torch.device) and a[0].type == "cuda" \
        else saved[1](self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = saved


def process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        init = Path(tempfile.mkdtemp(prefix="official_step_")) / "init"
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init}",
                                rank=0, world_size=1)


def build(args, device, MoCo, PaCoLoss, counts):
    """The official model and loss, and paco_ray's model with the official weights and queue."""
    import torchvision

    torch.manual_seed(0)
    official = MoCo(getattr(torchvision.models, args.arch), args.dim, args.queue, 0.999, 0.2, True,
                    {"resnet18": 512, "resnet34": 512}.get(args.arch, 2048), num_classes=args.classes).to(device)
    criterion = PaCoLoss(alpha=0.05, beta=1.0, gamma=1.0, temperature=0.2, K=args.queue, num_classes=args.classes)
    with cuda_calls_stay_on(device):
        criterion.cal_weight_for_classes(counts.tolist())
    criterion.weight = criterion.weight.to(device)
    official = torch.nn.parallel.DistributedDataParallel(  # as paco_lt.py wraps it
        official, device_ids=[device.index or 0] if device.type == "cuda" else None, find_unused_parameters=True)
    cfg = load_config(None, ["loss=paco", f"model.backbone={args.arch}", f"model.proj_dim={args.dim}",
                             "model.projector=mlp_bn", f"paco.queue_size={args.queue}", "paco.alpha=0.05",
                             "paco.temperature=0.2", "paco.momentum=0.999"])
    ours = PaCoModel.from_config(cfg, args.classes, 3)
    load_into(ours, official_weights({"state_dict": official.state_dict()}), "the official model")
    return official, criterion, ours.to(device), cfg


def steps(args, device, official, criterion, ours, cfg, counts, bf16_official: bool):
    """(official step, paco_ray step) closures over one fixed batch; each returns the loss."""
    g = torch.Generator().manual_seed(1)
    x_q, x_k = (torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device) for _ in range(2))
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    log_prior = (counts / counts.sum()).log().to(device)
    sgd = dict(lr=0.02, momentum=0.9, weight_decay=5e-4)
    official_opt = torch.optim.SGD([p for p in official.parameters() if p.requires_grad], **sgd)
    our_opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], **sgd)
    cuda = device.type == "cuda"

    def official_step():
        with cuda_calls_stay_on(device), torch.autocast(device.type, torch.bfloat16, enabled=cuda and bf16_official):
            features, target, logits = official(im_q=x_q, im_k=x_k, labels=labels)
            loss = criterion(features, target, logits)
        official_opt.zero_grad()
        loss.backward()
        official_opt.step()
        return loss.detach()

    def our_step():
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            out = ours(x_q, x_k, labels)
            loss = compute_loss("paco", out, labels, log_prior, cfg.paco)
        our_opt.zero_grad(set_to_none=True)
        loss.backward()
        our_opt.step()
        ours.end_step(out, labels)
        return loss.detach()

    return official_step, our_step


def compare(args, device, precision: str) -> dict:
    MoCo, PaCoLoss = import_official(Path(args.official_repo))
    counts = torch.logspace(3, 1, args.classes).round()  # a long-tailed class profile
    official, criterion, ours, cfg = build(args, device, MoCo, PaCoLoss, counts)
    official_step, our_step = steps(args, device, official, criterion, ours, cfg, counts, precision == "bf16")
    first = [(float(official_step()), float(our_step())) for _ in range(args.first)]  # the same weights: equal losses
    times = {"official": [], "paco_ray": []}
    for _ in range(args.steps):
        times["official"].append(timed(official_step, device))
        times["paco_ray"].append(timed(our_step, device))
    rate = {side: args.batch / statistics.median(t) for side, t in times.items()}
    return {"precision": precision, "first_losses": first, "images_per_s": rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--first", type=int, default=3, help="first steps whose losses are compared")
    parser.add_argument("--precision", nargs="+", choices=("default", "bf16"), default=["default", "bf16"])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--queue", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.arch} {args.size} px, batch {args.batch}, {args.classes} classes, K {args.queue}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    process_group(device)
    for precision in args.precision:
        result = compare(args, device, precision)
        losses = "; ".join(f"{a:.4f} vs {b:.4f}" for a, b in result["first_losses"])
        rate = result["images_per_s"]
        print(f"{precision}: first losses (official vs paco_ray): {losses}")
        print(f"{precision}: images/s official {rate['official']:.1f}, paco_ray {rate['paco_ray']:.1f}, "
              f"ratio {rate['paco_ray'] / rate['official']:.2f}x (goal >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
