"""paco_loss forward+backward time and peak memory vs the straightforward formulation (all contrast
features concatenated with the centers into one full masked (B, C+2B+K) logit matrix, as in the
reference implementation), at the same inputs and the same results.

python benchmarks/loss.py [--repeats 20] [--device cpu|cuda]

Two sizes: ImageNet-LT (B=128, K=8192, C=1000, D=128) and CIFAR-LT (B=64, K=1024, C=100, D=32).
Times are medians over --repeats, the two formulations interleaved; peak memory is what one
forward+backward allocates at most on top of the inputs (CPU: the profiler's memory timeline;
CUDA: the allocator's max_memory_allocated).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.losses import paco_loss  # noqa: E402
from timing import device_args, timed  # noqa: E402

SIZES = {"imagenet_lt": dict(B=128, K=8192, C=1000, D=128), "cifar_lt": dict(B=64, K=1024, C=100, D=32)}
HYPER = dict(alpha=0.05, beta=1.0, gamma=1.0, temperature=0.2)


def reference_paco(q, k, queue, labels, queue_labels, center_logits, log_prior, *, alpha, beta, gamma, temperature):
    """The straightforward formulation: one (B, C+N) logit matrix with explicit masks."""
    batch, num_classes = center_logits.shape
    features = torch.cat([q, k, queue.detach()], dim=0)
    contrast_labels = torch.cat([labels, labels, queue_labels])
    feature_logits = q @ features.T / temperature
    valid = (contrast_labels >= 0).float().unsqueeze(0).expand(batch, -1).clone()
    valid[:, :batch] -= torch.eye(batch, device=q.device)                   # q_i is not its own contrast
    same = torch.eq(labels.unsqueeze(1), contrast_labels.unsqueeze(0)).float() * valid
    logits = torch.cat([center_logits + log_prior, feature_logits], dim=1)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    den_weights = torch.cat([torch.ones(batch, num_classes, device=q.device), gamma * valid], dim=1)
    log_prob = logits - torch.log((torch.exp(logits) * den_weights).sum(1, keepdim=True))
    pos_weights = torch.cat([beta * F.one_hot(labels, num_classes).float(), alpha * same], dim=1)
    return -((pos_weights * log_prob).sum(1) / pos_weights.sum(1)).mean()


def make_inputs(B, K, C, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    labels = torch.randint(0, C, (B,), generator=g)
    queue_labels = torch.randint(0, C, (K,), generator=g)
    counts = torch.bincount(torch.randint(0, C, (50 * C,), generator=g), minlength=C).float() + 1
    inputs = dict(q=norm(B, D), k=norm(B, D), queue=norm(K, D), labels=labels, queue_labels=queue_labels,
                  center_logits=torch.randn(B, C, generator=g), log_prior=(counts / counts.sum()).log())
    return {name: t.to(device) for name, t in inputs.items()}


def fwd_bwd(fn, inputs):
    q = inputs["q"].detach().requires_grad_()
    center = inputs["center_logits"].detach().requires_grad_()
    loss = fn(q, inputs["k"], inputs["queue"], inputs["labels"], inputs["queue_labels"], center,
              inputs["log_prior"], **HYPER)
    loss.backward()
    return loss.detach(), q.grad, center.grad


def peak_mib(fn, inputs, device) -> float:
    """Peak memory allocated during one forward+backward, above what existed before it. CUDA: the
    caching allocator's statistics; CPU: the profiler's memory timeline (what export_memory_timeline uses)."""
    fwd_bwd(fn, inputs)  # gradients of a previous call are not part of the peak
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, inputs)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fwd_bwd(fn, inputs)
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak / 2**20


def main() -> None:
    args, device = device_args(__doc__.split("\n\n")[0], repeats=20)
    headline = None
    for name, size in SIZES.items():
        inputs = make_inputs(**size, device=device)
        ours, ref = fwd_bwd(paco_loss, inputs), fwd_bwd(reference_paco, inputs)
        diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
        times = {"paco_loss": [], "reference": []}
        for _ in range(2):  # warm-up
            timed(lambda: fwd_bwd(paco_loss, inputs), device), timed(lambda: fwd_bwd(reference_paco, inputs), device)
        for _ in range(args.repeats):
            times["paco_loss"].append(timed(lambda: fwd_bwd(paco_loss, inputs), device))
            times["reference"].append(timed(lambda: fwd_bwd(reference_paco, inputs), device))
        fast, slow = statistics.median(times["paco_loss"]), statistics.median(times["reference"])
        peaks = {"paco_loss": peak_mib(paco_loss, inputs, device), "reference": peak_mib(reference_paco, inputs, device)}
        shape = ", ".join(f"{k}={v}" for k, v in size.items())
        print(f"{name} ({shape}) max_abs_diff (loss and gradients): {diff:.2e}")
        print(f"{name} paco_loss fwd+bwd ms: {1000 * fast:.2f}")
        print(f"{name} reference fwd+bwd ms: {1000 * slow:.2f}")
        print(f"{name} paco_loss peak MiB: {peaks['paco_loss']:.1f}")
        print(f"{name} reference peak MiB: {peaks['reference']:.1f}")
        print(f"{name} memory ratio (reference / paco_loss): {peaks['reference'] / max(peaks['paco_loss'], 1e-9):.2f}x")
        print(f"{name} speedup (reference / paco_loss): {slow / fast:.2f}x")
        headline = headline or (slow / fast, diff)
    print(f"speedup at B=128, K=8192, C=1000, D=128 (goal >= 2x, diff <= 1e-5): {headline[0]:.2f}x, "
          f"max_abs_diff {headline[1]:.1e}")


if __name__ == "__main__":
    main()
