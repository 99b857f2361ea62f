"""benchmarks/official_step.py on CPU against a stand-in for the official checkout: a MoCo builder
and a PaCoLoss with the official interfaces, written here from the official algorithm (the real
checkout is the user's; nothing of it is in this repository). The first steps' losses agree from
the same weights, queue and batch, and both sides' images/s are printed."""
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUILDER = '''
import torch, torch.nn as nn

class MoCo(nn.Module):
    """The official interface: MoCo(base_encoder, dim, K, m, T, mlp, feat_dim, num_classes=...)."""
    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.2, mlp=False, feat_dim=2048, normalize=False,
                 num_classes=1000):
        super().__init__()
        self.K, self.m = K, m
        self.encoder_q, self.encoder_k = base_encoder(num_classes=dim), base_encoder(num_classes=dim)
        self.linear, self.linear_k = nn.Linear(feat_dim, num_classes), nn.Linear(feat_dim, num_classes)
        hidden = self.encoder_q.fc.weight.shape[1]
        for enc in (self.encoder_q, self.encoder_k):
            enc.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), enc.fc)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.linear_k.load_state_dict(self.linear.state_dict())
        for p in [*self.encoder_k.parameters(), *self.linear_k.parameters()]:
            p.requires_grad = False
        self.register_buffer("queue", nn.functional.normalize(torch.randn(K, dim), dim=0))
        self.register_buffer("queue_l", torch.randint(0, num_classes, (K,)))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.pooled = None
        self.encoder_q.avgpool.register_forward_hook(lambda _, __, out: setattr(self, "pooled", out.flatten(1)))

    def forward(self, im_q, im_k=None, labels=None):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        logits = self.linear(self.pooled)
        with torch.no_grad():
            for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                pk.data = pk.data * self.m + pq.data * (1 - self.m)
            perm = torch.randperm(im_k.shape[0]).cuda()
            k = nn.functional.normalize(self.encoder_k(im_k[perm]), dim=1)[torch.argsort(perm)]
        features = torch.cat([q, k, self.queue.clone()])
        target = torch.cat([labels, labels, self.queue_l.clone()])
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + k.shape[0]] = k
        self.queue_l[ptr:ptr + k.shape[0]] = labels
        self.queue_ptr[0] = (ptr + k.shape[0]) % self.K
        return features, target, logits
'''

LOSSES = '''
import torch, torch.nn as nn, torch.nn.functional as F

class PaCoLoss(nn.Module):
    """The official interface and formula: anchors the B queries, masks, log(weight + 1e-9)."""
    def __init__(self, alpha, beta=1.0, gamma=1.0, supt=1.0, temperature=1.0, base_temperature=None, K=128,
                 num_classes=1000):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.T, self.K, self.C = alpha, beta, gamma, temperature, K, num_classes

    def cal_weight_for_classes(self, cls_num_list):
        counts = torch.Tensor(cls_num_list).view(1, self.C)
        self.weight = (counts / counts.sum()).to(torch.device("cuda"))

    def forward(self, features, labels=None, sup_logits=None):
        B = (features.shape[0] - self.K) // 2
        labels = labels.view(-1, 1)
        mask = torch.eq(labels[:B], labels.T).float()
        logits = torch.cat([sup_logits + torch.log(self.weight + 1e-9), features[:B] @ features.T / self.T], dim=1)
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        self_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(B).view(-1, 1), 0)
        mask = torch.cat([F.one_hot(labels[:B].view(-1), self.C).float() * self.beta, mask * self_mask * self.alpha], 1)
        den = torch.cat([torch.ones(B, self.C), self.gamma * self_mask], dim=1)
        log_prob = logits - torch.log((torch.exp(logits) * den).sum(1, keepdim=True) + 1e-12)
        return -((mask * log_prob).sum(1) / mask.sum(1)).mean()
'''


def test_official_step_runs_both_sides_from_the_same_weights_with_equal_losses(tmp_path):
    code = tmp_path / "checkout" / "PaCo" / "LT"
    (code / "moco").mkdir(parents=True)
    (code / "moco" / "__init__.py").write_text("")
    (code / "moco" / "builder.py").write_text(textwrap.dedent(BUILDER))
    (code / "losses.py").write_text(textwrap.dedent(LOSSES))
    done = subprocess.run([sys.executable, "benchmarks/official_step.py", "--official-repo", str(tmp_path / "checkout"),
                           "--device", "cpu", "--arch", "resnet18", "--size", "32", "--batch", "8", "--classes", "5",
                           "--queue", "32", "--dim", "16", "--steps", "2", "--first", "3", "--precision", "default"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses_line = next(line for line in done.stdout.splitlines() if "first losses" in line)
    pairs = [tuple(float(x) for x in pair.split(" vs ")) for pair in losses_line.split(": ", 2)[2].split("; ")]
    assert len(pairs) == 3 and all(abs(a - b) < 1e-3 for a, b in pairs), losses_line
    assert "images/s official" in done.stdout and "ratio" in done.stdout
    missing = subprocess.run([sys.executable, "benchmarks/official_step.py", "--official-repo", str(tmp_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no PaCo/LT/moco/builder.py" in missing.stderr
