"""paco_loss against an independent loop over the formula of DESIGN.md section 2."""
import math

import pytest
import torch
import torch.nn.functional as F

from paco_ray.losses import balanced_softmax, cross_entropy, paco_loss


def naive_paco(q, k, queue, labels, queue_labels, center_logits, log_prior, alpha, beta, gamma, temperature):
    """Anchor by anchor, term by term, in float64; empty queue slots (label -1) are skipped."""
    losses = []
    B, C = center_logits.shape
    for i in range(B):
        terms = []  # (logit, positive weight, denominator weight)
        for c in range(C):
            logit = center_logits[i, c] + log_prior[c]
            terms.append((logit, beta if c == labels[i] else 0.0, 1.0))
        contrast = [(q[j], labels[j]) for j in range(B) if j != i]
        contrast += [(k[j], labels[j]) for j in range(B)]
        contrast += [(queue[j], queue_labels[j]) for j in range(len(queue_labels)) if queue_labels[j] >= 0]
        for v, y in contrast:
            terms.append((torch.dot(q[i], v) / temperature, alpha if y == labels[i] else 0.0, gamma))
        log_den = torch.log(sum(w * torch.exp(l) for l, _, w in terms))
        total_weight = sum(w for _, w, _ in terms)
        losses.append(-sum(w * (l - log_den) for l, w, _ in terms) / total_weight)
    return torch.stack(losses).mean()


def random_inputs(B=6, C=5, D=8, K=7, filled=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1)
    k = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1)
    queue = F.normalize(torch.randn(K, D, generator=g, dtype=dtype), dim=1)
    labels = torch.tensor([0, 2, 2, 1, 0, 2])[:B]  # duplicates; classes 3 and 4 absent from the batch
    queue_labels = torch.full((K,), -1)
    queue_labels[:filled] = torch.tensor([2, 4, 0, 2, 1, 3, 3])[:filled]  # partly filled queue
    center = torch.randn(B, C, generator=g, dtype=dtype) * 2
    counts = torch.tensor([50.0, 20, 10, 5, 2])[:C]
    log_prior = (counts / counts.sum()).log().to(dtype)
    return q, k, queue, labels, queue_labels, center, log_prior


@pytest.mark.parametrize("alpha,beta,gamma,temperature", [
    (0.05, 1.0, 1.0, 0.2), (0.5, 1.0, 1.0, 0.07), (1.0, 0.5, 0.3, 1.0), (0.2, 1.0, 0.0, 0.5)])
@pytest.mark.parametrize("filled", [0, 4, 7])
def test_value_and_gradient_match_naive_loop(alpha, beta, gamma, temperature, filled):
    inputs = random_inputs(filled=filled)
    q, k, queue, labels, queue_labels, center, log_prior = [t.clone() for t in inputs]
    for t in (q, k, center):
        t.requires_grad_(True)
    fast = paco_loss(q, k, queue, labels, queue_labels, center, log_prior,
                     alpha=alpha, beta=beta, gamma=gamma, temperature=temperature)
    fast.backward()

    ref_inputs = [t.double().clone() for t in inputs]
    ref_inputs[3], ref_inputs[4] = labels, queue_labels
    rq, rk, rqueue, _, _, rcenter, rprior = ref_inputs
    for t in (rq, rk, rcenter):
        t.requires_grad_(True)
    ref = naive_paco(rq, rk, rqueue, labels, queue_labels, rcenter, rprior, alpha, beta, gamma, temperature)
    ref.backward()

    assert abs(fast.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for mine, theirs in ((q, rq), (k, rk), (center, rcenter)):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=1e-5, rtol=1e-4)


def test_reduces_to_balanced_softmax_when_alpha_and_gamma_are_zero():
    q, k, queue, labels, queue_labels, center, log_prior = random_inputs()
    loss = paco_loss(q, k, queue, labels, queue_labels, center, log_prior,
                     alpha=0.0, beta=1.0, gamma=0.0, temperature=0.1)
    torch.testing.assert_close(loss, balanced_softmax(center, labels, log_prior))
    # and Balanced Softmax itself is cross-entropy on prior-shifted logits
    torch.testing.assert_close(balanced_softmax(center, labels, log_prior), cross_entropy(center + log_prior, labels))


def test_queue_larger_than_batch_and_not_a_multiple():
    inputs = random_inputs(B=6, K=13, filled=0)
    q, k, queue, labels, queue_labels, center, log_prior = inputs
    queue_labels = torch.randint(0, 5, (13,), generator=torch.Generator().manual_seed(1))
    got = paco_loss(q, k, queue, labels, queue_labels, center, log_prior, alpha=0.1, gamma=1.0, temperature=0.2)
    ref = naive_paco(q.double(), k.double(), queue.double(), labels, queue_labels, center.double(),
                     log_prior.double(), 0.1, 1.0, 1.0, 0.2)
    assert abs(got.item() - ref.item()) < 1e-5


def test_stable_with_small_temperature_and_large_logits():
    q, k, queue, labels, queue_labels, center, log_prior = random_inputs(filled=7)
    loss = paco_loss(q, k, queue, labels, queue_labels, center * 1000, log_prior,
                     alpha=0.05, temperature=0.001)
    assert math.isfinite(loss.item())


def test_autocast_bfloat16_on_cpu_is_close_to_fp32():
    q, k, queue, labels, queue_labels, center, log_prior = random_inputs(filled=7)
    ref = paco_loss(q, k, queue, labels, queue_labels, center, log_prior, alpha=0.05, temperature=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = paco_loss(q.bfloat16(), k.bfloat16(), queue.bfloat16(), labels, queue_labels, center.bfloat16(),
                        log_prior, alpha=0.05, temperature=0.2)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 0.05 * abs(ref.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    inputs = random_inputs(filled=5)
    ref = paco_loss(*inputs, alpha=0.05, temperature=0.2)
    got = paco_loss(*[t.cuda() for t in inputs], alpha=0.05, temperature=0.2)
    assert abs(got.item() - ref.item()) < 1e-5
