"""Worker for the 2-process gloo test of the streaming meters (tests/test_metrics.py).

Kept in its own light module so that spawned children import only torch and facelayers.metrics
(not numpy/scikit-learn/hypothesis), which keeps the test fast.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from facelayers.metrics import AUMeter, ExpressionMeter


def ddp_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic AU probabilities/labels (with ties and an all-negative AU) and class logits/labels."""
    g = torch.Generator().manual_seed(123)
    probs = torch.randint(0, 9, (37, 4), generator=g).float() / 8
    target = torch.rand(37, 4, generator=g) < probs * 0.8 + 0.1
    target[:, 0] = False
    logits = torch.randn(29, 5, generator=g)
    y = torch.randint(0, 5, (29,), generator=g)
    y[y == 3] = 4  # class 3 absent from the targets
    return probs, target, logits, y


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probs, target, logits, y = ddp_inputs()
        au, ex = AUMeter(probs.shape[1]), ExpressionMeter(logits.shape[1])
        cut_au, cut_ex = 25, 10  # uneven shards; rank 0 updates the AU meter in two batches
        if rank == 0:
            au.update(probs[:10], target[:10])
            au.update(probs[10:cut_au], target[10:cut_au])
            ex.update(logits[:cut_ex], y[:cut_ex])
        else:
            au.update(probs[cut_au:], target[cut_au:])
            ex.update(logits[cut_ex:], y[cut_ex:])
        ra, re = au.compute(), ex.compute()
        out = {
            "f1_per_au": ra["f1_per_au"].tolist(),
            "auc_per_au": ra["auc_per_au"].tolist(),
            "n_au": ra["num_samples"],
            "uar": re["uar"],
            "war": re["war"],
            "cm": re["confusion_matrix"].tolist(),
            "n_ex": re["num_samples"],
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()
