"""Learnability of the synthetic benchmark: a tiny CNN learns it in CPU-minutes; shuffled labels do not.

Lab AU domain: AU mean F1 on held-out subjects; wild expression domain: UAR on held-out clips.
The same training with shuffled training labels must stay near chance (the benchmark has no
label leak that a network could exploit without seeing the faces). Budgets are fixed epoch counts
(deterministic), sized to train in about 30 s (AU) and 50 s (expressions) on one CPU thread.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facelayers import facs
from facelayers.data.synthetic import SyntheticAUDataset, SyntheticExpressionDataset

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
AU_EPOCHS = 20
EXP_EPOCHS = 45


class _PerImageNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-3)


def tiny_cnn(num_outputs: int, pool: int) -> nn.Sequential:
    """3 stride-2 convs; ``pool`` x ``pool`` average pooling keeps coarse position (AUs need it)."""
    return nn.Sequential(
        _PerImageNorm(),
        nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 96, 3, 2, 1), nn.BatchNorm2d(96), nn.ReLU(),
        nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Dropout(0.2), nn.Linear(96 * pool * pool, num_outputs),
    )


def mean_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    tp = (pred * target).sum(0)
    return float((2 * tp / (pred.sum(0) + target.sum(0)).clamp_min(1)).mean())


def uar(pred: torch.Tensor, target: torch.Tensor, k: int) -> float:
    global LAST_RECALL
    LAST_RECALL = [round(float(((pred == c) & (target == c)).sum() / (target == c).sum().clamp_min(1)), 2) for c in range(k)]
    rec = [float(((pred == c) & (target == c)).sum() / (target == c).sum()) for c in range(k) if (target == c).any()]
    return sum(rec) / len(rec)


def _step(opt, sched, loss: torch.Tensor) -> None:
    """One optimiser + one-cycle scheduler step on ``loss``."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _train_au(x, y, x_test, y_test, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    m = tiny_cnn(y.shape[1], pool=4)
    opt = torch.optim.AdamW(m.parameters(), 3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps, pct_start=0.2)
    pos = y.mean(0).clamp(1e-3, 1 - 1e-3)
    pw = ((1 - pos) / pos).clamp(max=5)
    for _ in range(epochs):
        m.train()
        perm = torch.randperm(len(x))
        for b in range(0, len(x), 64):
            i = perm[b : b + 64]
            _step(opt, sched, F.binary_cross_entropy_with_logits(m(x[i].float() / 255), y[i], pos_weight=pw))
    m.eval()
    with torch.no_grad():
        pred = (m(x_test.float() / 255) > 0).float()
    global LAST_PER_AU
    tp = (pred * y_test).sum(0)
    LAST_PER_AU = (2 * tp / (pred.sum(0) + y_test.sum(0)).clamp_min(1)).tolist()
    return mean_f1(pred, y_test)


def _train_exp(frames, y, frames_test, y_test, k: int, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    m = tiny_cnn(k, pool=1)
    opt = torch.optim.AdamW(m.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=4e-3, total_steps=epochs * -(-len(frames) // 32), pct_start=0.2
    )
    cnt = torch.bincount(y, minlength=k).float()
    w = cnt.sum() / cnt.clamp_min(1) / k
    n, T = frames.shape[:2]
    for _ in range(epochs):
        m.train()
        perm = torch.randperm(n)
        t_pick = torch.randint(T // 2, T, (n,))  # one frame of the clip's second half per clip and epoch
        for b in range(0, n, 32):
            i = perm[b : b + 32]
            x = frames[i, t_pick[i]].float() / 255
            flip = torch.rand(len(i)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            _step(opt, sched, F.cross_entropy(m(x), y[i], weight=w))
    m.eval()
    with torch.no_grad():
        B, T = frames_test.shape[:2]
        logits = m(frames_test.flatten(0, 1).float() / 255).view(B, T, -1).mean(1)  # temporal mean
    return uar(logits.argmax(1), y_test, k)


def test_tiny_cnn_learns_both_domains_and_not_shuffled_labels():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.time()
        au_kw = dict(aus=facs.BP4D_AUS, num_subjects=24, num_frames=1, image_size=IMAGE_SIZE, stride=1, seed=0)
        au_train = SyntheticAUDataset(split="train", **au_kw)
        au_test = SyntheticAUDataset(split="test", **au_kw)
        ex_kw = dict(expressions=facs.EXPRESSIONS_7, num_clips=3500, num_frames=4, image_size=IMAGE_SIZE, seed=0)
        ex_train = SyntheticExpressionDataset(split="train", **ex_kw)
        ex_test = SyntheticExpressionDataset(split="test", **ex_kw)
        t_gen = time.time() - t0

        xa, ya = au_train.frames, au_train.frame_labels
        xat, yat = au_test.frames, au_test.frame_labels
        xe, ye = ex_train.frames, ex_train.labels
        xet, yet = ex_test.frames, ex_test.labels
        assert not set(au_train.subjects) & set(au_test.subjects)

        t1 = time.time()
        f1 = _train_au(xa, ya, xat, yat, AU_EPOCHS, seed=0)
        t_au = time.time() - t1
        t1 = time.time()
        war = _train_exp(xe, ye, xet, yet, 7, EXP_EPOCHS, seed=0)
        t_exp = time.time() - t1

        g = torch.Generator().manual_seed(1)
        f1_shuf = _train_au(xa, ya[torch.randperm(len(ya), generator=g)], xat, yat, AU_EPOCHS, seed=0)
        uar_shuf = _train_exp(xe, ye[torch.randperm(len(ye), generator=g)], xet, yet, 7, EXP_EPOCHS, seed=0)
    finally:
        torch.set_num_threads(threads)
    # chance: F1 of an all-positive / random detector at the AU base rate; UAR 1/7
    base = float(yat.mean())
    chance_f1 = 2 * base / (1 + base)
    print(
        f"\nsynthetic learnability: gen {t_gen:.1f}s | AU F1 {f1:.3f} ({t_au:.1f}s) shuffled {f1_shuf:.3f} "
        f"(chance ~{chance_f1:.3f}) | expression UAR {war:.3f} ({t_exp:.1f}s) shuffled {uar_shuf:.3f} (chance 0.143)"
    )
    assert f1 >= 0.8, f"AU mean F1 on held-out subjects {f1:.3f} < 0.8"
    assert war >= 0.8, f"expression UAR on held-out clips {war:.3f} < 0.8"
    assert f1_shuf < chance_f1 + 0.1, f"shuffled-label AU F1 {f1_shuf:.3f} not near chance {chance_f1:.3f}"
    assert uar_shuf < 1 / 7 + 0.12, f"shuffled-label UAR {uar_shuf:.3f} not near chance 0.143"
