"""Metrics from per-class counts against a direct computation on predictions."""
import math

import torch

from paco_ray.data.longtail import ClassInfo
from paco_ray.model import PaCoOutput
from paco_ray.evaluate import format_table, metrics_from_counts, per_class_counts


class FixedLogits(torch.nn.Module):
    """A model whose output (a PaCoOutput, as PaCoModel's) is a fixed logit row per input index."""

    def __init__(self, logits):
        super().__init__()
        self.table = logits

    def forward(self, index):
        return PaCoOutput(self.table[index.view(-1).long()])


def test_metrics_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    n, c = 400, 7
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c - 1, (n,), generator=g)  # class 6 absent from the split
    logits[torch.arange(n), labels] += torch.rand(n, generator=g) * 2
    batches = [(torch.arange(i, i + 50).float(), labels[i:i + 50]) for i in range(0, n, 50)]
    classes = ClassInfo(tuple("abcdefg"), (900, 500, 300, 150, 60, 30, 5), many_threshold=400, few_threshold=100)
    counts = per_class_counts(FixedLogits(logits), batches, lambda x: x, c, torch.device("cpu"))
    m = metrics_from_counts(counts, classes)

    pred = logits.argmax(1)
    assert math.isclose(m["top1"], 100 * (pred == labels).float().mean().item(), rel_tol=1e-6)
    top5 = logits.topk(5, 1).indices
    assert math.isclose(m["top5"], 100 * (top5 == labels[:, None]).any(1).float().mean().item(), rel_tol=1e-6)
    per_class = [((pred == labels) & (labels == k)).sum().item() / (labels == k).sum().item() for k in range(6)]
    assert math.isclose(m["balanced_acc"], 100 * sum(per_class) / 6, rel_tol=1e-6)
    assert math.isclose(m["many"], 100 * (per_class[0] + per_class[1]) / 2, rel_tol=1e-6)
    assert math.isclose(m["medium"], 100 * (per_class[2] + per_class[3]) / 2, rel_tol=1e-6)
    assert math.isclose(m["few"], 100 * (per_class[4] + per_class[5]) / 2, rel_tol=1e-6)  # class 6 left out
    assert math.isnan(m["per_class"][6])
    table = format_table({"test": m})
    assert "balanced_acc" in table and f"{m['top1']:.2f}" in table
