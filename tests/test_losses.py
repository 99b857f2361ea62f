"""paco_loss against an independent loop over the PaCo formula (the official PaCoLoss, anchor by
anchor), and gpaco_loss against the official GPaCo loss (GPaCo/LT/losses.py) transcribed as its
masked-matrix computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from paco_ray.losses import balanced_softmax, cross_entropy, gpaco_loss, paco_loss


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


def official_gpaco(q, k, queue, labels, queue_labels, logits_q, logits_k, prior, alpha, beta, gamma, temperature,
                   smooth):
    """GPaCo/LT/losses.py PaCoLoss.forward with its builder's inputs (features = cat(q, k, queue),
    target = cat(labels, labels, queue labels), sup_logits = cat(logits_q, logits_k)), in float64."""
    features = torch.cat([q, k, queue])
    target = torch.cat([labels, labels, queue_labels]).view(-1, 1)
    sup_logits = torch.cat([logits_q, logits_k])
    num_classes = sup_logits.shape[1]
    batch_size = features.shape[0] - queue.shape[0]  # 2B anchors
    mask = torch.eq(target[:batch_size], target.T).double()
    anchor_dot_contrast = features[:batch_size] @ features.T / temperature
    anchor_dot_contrast = torch.cat([sup_logits + torch.log(prior + 1e-9), anchor_dot_contrast], dim=1)
    logits = anchor_dot_contrast - anchor_dot_contrast.max(dim=1, keepdim=True).values.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size).view(-1, 1), 0)
    mask = mask * logits_mask
    one_hot = F.one_hot(target[:batch_size].view(-1), num_classes).double()
    one_hot = smooth / (num_classes - 1) * (1 - one_hot) + (1 - smooth) * one_hot
    mask = torch.cat([one_hot * beta, mask * alpha], dim=1)
    logits_mask = torch.cat([torch.ones(batch_size, num_classes, dtype=torch.double), gamma * logits_mask], dim=1)
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True) + 1e-12)
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize("alpha,gamma,temperature,smooth", [(0.05, 1.0, 0.2, 0.0), (0.5, 0.5, 0.07, 0.0),
                                                            (0.045, 1.0, 0.2, 0.1)])
def test_gpaco_matches_the_official_gpaco_loss_in_value_and_gradients(alpha, gamma, temperature, smooth):
    q, k, queue, labels, queue_labels, logits_q, log_prior = random_inputs(filled=7)  # the official queue is full
    logits_k = logits_q.flip(0) * 0.7 + 0.3  # the key view's own center logits
    prior = log_prior.exp()
    mine = [t.clone().requires_grad_(True) for t in (q, k, logits_q, logits_k)]
    got = gpaco_loss(mine[0], mine[1], queue, labels, queue_labels, mine[2], mine[3], prior.log(),
                     alpha=alpha, beta=1.0, gamma=gamma, temperature=temperature, smooth=smooth)
    got.backward()
    theirs = [t.double().clone().requires_grad_(True) for t in (q, k, logits_q, logits_k)]
    ref = official_gpaco(theirs[0], theirs[1], queue.double(), labels, queue_labels, theirs[2], theirs[3],
                         prior.double(), alpha, 1.0, gamma, temperature, smooth)
    ref.backward()
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for a, b in zip(mine, theirs):  # both views' features and both views' center logits
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4)
    # what the previous GPaCo (keys without gradient, query anchors only) computed is not it
    assert abs(paco_loss(q, k, queue, labels, queue_labels, logits_q, log_prior, alpha=alpha, gamma=gamma,
                         temperature=temperature, smooth=smooth).item() - ref.item()) > 1e-3
