#!/usr/bin/env python
"""Reference SSM: build, train, evaluate and report (``python examples/ssm_reference.py``).

With no arguments it trains the full SSM (MoE CLIP encoder, temporal heads, TSP prompts, DPM,
cosine heads) from a random-init tiny CLIP on the synthetic FACS video benchmark in a few minutes
on 2 CPU cores, evaluates it on held-out test data (model selection on a validation split carved
from the training data), writes a run folder and prints a summary table. With arguments it runs the
paper's setup (ViT-B/16 weights, BP4D/DISFA + DFEW/FERV39K/MAFW). See ``docs/reference.md``.

Distributed: ``torchrun --nproc_per_node=N examples/ssm_reference.py ...`` (gloo on CPU, nccl on
GPU; DistributedDataParallel, never DataParallel).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "0" if os.environ.get("SSM_ALLOW_DOWNLOAD") else "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import ssm_builders as B  # noqa: E402
from facelayers import facs  # noqa: E402
from facelayers.ops.grouped_experts import BACKENDS as MOE_BACKENDS  # noqa: E402

# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

PAPER_LR_VISUAL = 1e-6
PAPER_LR = 1e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssm_reference.py",
        description="Train and evaluate the reference SSM (STL / Baseline / SSM) on synthetic or real data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<mode>-<task>-seed<seed>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick", action="store_true", help="smoke run (< 1 min on CPU): tiny data, 1 epoch")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if present")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: 1 for the tiny backbone on CPU, whose small "
                        "matmuls gain little from threads and lose a lot when cores are shared)")
    g = p.add_argument_group("model")
    g.add_argument("--mode", choices=B.MODES, default="ssm", help="stl: one task, plain CLIP + linear head; "
                   "baseline: joint MoE + linear heads (Table V row 1); ssm: full model")
    g.add_argument("--task", choices=("exp", "au"), default="exp", help="task of --mode stl")
    g.add_argument("--backbone", default="tiny", help="'tiny' (random init) or an open_clip name, e.g. ViT-B-16")
    g.add_argument("--pretrained", default=None, help="local checkpoint file or open_clip tag (e.g. openai)")
    g.add_argument("--tiny", default=None, metavar="IMG,PATCH,WIDTH,LAYERS",
                   help="shape of the tiny backbone, e.g. 32,8,64,2 (default: ssm_builders.TINY_CLIP)")
    g.add_argument("--frames", type=int, default=None, help="frames per clip T (default 4 tiny / 16 otherwise)")
    g.add_argument("--moe-blocks", default=None, help="'last:6' | 'all' | '0,3' | 'none' (default all tiny / last:6)")
    g.add_argument("--num-experts", type=int, default=4)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--moe-hidden", type=int, default=None, help="private expert hidden size (default 2/3 width: 512 for ViT-B)")
    g.add_argument("--temporal-heads", type=int, default=None, help="(default 8; 4 for tiny)")
    g.add_argument("--au-select", choices=("center", "all"), default="center",
                   help="supervise the centre frame (paper eq. 5) or all frames (released code)")
    g.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing of vision blocks")
    g.add_argument("--vision-passes", type=int, choices=(1, 2), default=1,
                   help="1: ONE concatenated vision pass for both tasks; 2: one pass per task (the released "
                        "code's execution; same results)")
    g.add_argument("--moe-backend", choices=MOE_BACKENDS, default="auto",
                   help="grouped-expert backend of every MoE layer (auto: Triton on CUDA, torch on CPU)")
    g.add_argument("--no-text-cache", action="store_true",
                   help="re-encode the prompts on every eval forward (the released code's behaviour; same results)")
    g = p.add_argument_group("text side (mode ssm)")
    g.add_argument("--no-tsp", action="store_true", help="linear heads instead of text prototypes (= baseline)")
    g.add_argument("--no-dpm", action="store_true", help="TSP without the mapping (Table V row 2)")
    g.add_argument("--mapping", choices=("dpm", "linear", "mlp"), default="dpm", help="Table VII siblings")
    g.add_argument("--dpm-init", choices=("prior", "random"), default="prior")
    g.add_argument("--no-dual", action="store_true", help="tie B = A^T (Table VI)")
    g.add_argument("--freeze-dpm", action="store_true", help="non-learnable maps (Table VII 'Frozen')")
    g.add_argument("--dpm-variant", choices=("paper", "ssm_release"), default="paper")
    g.add_argument("--prior-source", choices=("table_s4", "ssm_release"), default=None,
                   help="prior matrix (default: table_s4 for variant paper, ssm_release for ssm_release)")
    g.add_argument("--desc-style", choices=facs.DESCRIPTION_STYLES, default="compound", help="Table VIII")
    g.add_argument("--n-ctx", type=int, default=8, help="learnable context tokens (Table IX)")
    g.add_argument("--alpha", type=float, default=0.1, help="initial alpha (Table S3)")
    g.add_argument("--beta", type=float, default=0.1, help="initial beta (Table S3)")
    g.add_argument("--tau", type=float, default=0.01, help="cosine-head temperature")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    g.add_argument("--au-dataset", choices=("bp4d", "disfa"), default="bp4d")
    g.add_argument("--au-root", default=None)
    g.add_argument("--au-manifest", default=None, help="training manifest (real data)")
    g.add_argument("--au-test-manifest", default=None)
    g.add_argument("--exp-dataset", choices=("dfew", "ferv39k", "mafw"), default="dfew")
    g.add_argument("--exp-root", default=None)
    g.add_argument("--exp-manifest", default=None, help="training manifest (real data)")
    g.add_argument("--exp-test-manifest", default=None)
    g.add_argument("--fold", type=int, default=1, help="fold number (real data: names in the manifests; synthetic: 1..3)")
    g.add_argument("--val-fraction", type=float, default=0.15, help="validation split carved from training data")
    g.add_argument("--exp-fraction", type=float, default=1.0, help="fraction of expression training data (Table S1)")
    g.add_argument("--au-fraction", type=float, default=1.0, help="fraction of AU training data (Table S2)")
    g.add_argument("--synthetic-size", type=float, default=1.0, help="scale of the synthetic benchmark")
    g.add_argument("--synthetic-balance", choices=("uniform", "dfew"), default="uniform",
                   help="class balance of the synthetic expression clips (dfew: DFEW-like imbalance)")
    g.add_argument("--synthetic-nuisance", type=float, default=0.5,
                   help="pose / lighting / clutter strength of the synthetic wild clips (the dataset's own default "
                        "is 1.0; 0.5 lets the random-init tiny CLIP learn the task in the default run's budget)")
    g.add_argument("--data-seed", type=int, default=0,
                   help="synthetic benchmark seed (fixed across --seed so seeds measure training variance)")
    g.add_argument("--workers", type=int, default=0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="(default 14 tiny / 30 paper)")
    g.add_argument("--batch-exp", type=int, default=None, help="expression clips per step (paper 12)")
    g.add_argument("--batch-au", type=int, default=None, help="AU clips per step (paper 128)")
    g.add_argument("--lr", type=float, default=None, help=f"lr of new parts (paper {PAPER_LR:g}; tiny default 1e-3)")
    g.add_argument("--lr-visual", type=float, default=None,
                   help=f"lr of the pretrained vision weights (paper {PAPER_LR_VISUAL:g}; tiny random-init default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs where lr *= gamma (paper 10 20)")
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--lam", type=float, default=2.0, help="task balance lambda (eq. 14)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on GPU")
    g.add_argument("--ddp-find-unused", action="store_true",
                   help="DDP find_unused_parameters=True instead of the zero-contribution trick")
    g.add_argument("--max-steps", type=int, default=None, help="cap optimizer steps per epoch (debugging)")
    g = p.add_argument_group("diagnostics")
    g.add_argument("--check-replicas", action="store_true",
                   help="after training, verify that all DDP ranks hold identical parameters (writes ddp_check.json)")
    g.add_argument("--debug-drop-expert", default=None, metavar="RANK:EXPERT",
                   help="on that rank, routers never pick that private expert (tests DDP with an expert "
                        "that receives no tokens on one rank)")
    return p


@dataclass
class Defaults:
    frames: int
    moe_blocks: str
    temporal_heads: int
    epochs: int
    batch_exp: int
    batch_au: int
    lr: float
    lr_visual: float
    milestones: list[int]


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the backbone-dependent defaults (tiny random-init vs pretrained paper config)."""
    if args.backbone == "tiny":
        d = Defaults(frames=4, moe_blocks="all", temporal_heads=4, epochs=14, batch_exp=16, batch_au=16,
                     lr=1e-3, lr_visual=1e-3, milestones=[11])
        if args.quick:
            d = Defaults(frames=4, moe_blocks="all", temporal_heads=4, epochs=1, batch_exp=8, batch_au=8,
                         lr=1e-3, lr_visual=1e-3, milestones=[])
    else:
        d = Defaults(frames=16, moe_blocks="last:6", temporal_heads=8, epochs=30, batch_exp=12, batch_au=128,
                     lr=PAPER_LR, lr_visual=PAPER_LR_VISUAL, milestones=[10, 20])
        if args.quick:
            d.epochs, d.batch_exp, d.batch_au, d.milestones = 1, 2, 2, []
    for k, v in vars(d).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.out is None:
        tag = args.mode if args.mode != "stl" else f"stl-{args.task}"
        args.out = os.path.join("runs", f"{tag}-seed{args.seed}" + ("-quick" if args.quick else ""))
    return args


def model_config(args: argparse.Namespace, expressions: Sequence[str], aus: Sequence[int]) -> B.ModelConfig:
    tasks = (args.task,) if args.mode == "stl" else ("exp", "au")
    mapping = "none" if args.no_dpm else args.mapping
    return B.ModelConfig(
        mode=args.mode, tasks=tasks, expressions=tuple(expressions), aus=tuple(int(a) for a in aus),
        backbone=args.backbone, num_frames=args.frames,
        clip_kwargs=B.tiny_clip_kwargs(*[int(v) for v in args.tiny.split(",")]) if args.tiny else None,
        moe=args.mode != "stl", moe_blocks=args.moe_blocks, num_experts=args.num_experts, top_k=args.top_k,
        moe_hidden=args.moe_hidden, temporal_heads=args.temporal_heads, au_select=args.au_select,
        tsp=not args.no_tsp, mapping=mapping, desc_style=args.desc_style, n_ctx=args.n_ctx, tau=args.tau,
        alpha=args.alpha, beta=args.beta, dpm_init=args.dpm_init, dual=not args.no_dual,
        freeze_dpm=args.freeze_dpm, dpm_variant=args.dpm_variant, prior_source=args.prior_source,
        grad_checkpoint=args.grad_checkpoint, vision_passes=args.vision_passes, moe_backend=args.moe_backend,
        cache_in_eval=not args.no_text_cache,
    )


# ----------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        dev = torch.device(args.device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def gather_cat(t: Tensor, dd: Dist) -> Tensor:
    """Concatenate a CPU tensor over ranks (variable first dimension; works on gloo and nccl)."""
    if not dd.enabled:
        return t
    out: list[Any] = [None] * dd.world
    dist.all_gather_object(out, t.cpu())
    return torch.cat(out)


def broadcast_bool(flag: bool, dd: Dist) -> bool:
    if not dd.enabled:
        return flag
    obj = [flag]
    dist.broadcast_object_list(obj, src=0)
    return bool(obj[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def zero_contribution(model: nn.Module) -> Tensor:
    """``0 * sum(p)`` over trainable parameters.

    Added to the loss under DDP so every trainable parameter takes part in every backward even when
    it did not contribute on this rank (an expert bank slice, a router, a mapping matrix that a
    step happened not to use). DDP then all-reduces a (zero) gradient for it on every rank and the
    replicas stay identical, without ``find_unused_parameters=True``'s per-step graph traversal.
    """
    terms = [p.reshape(-1)[:1].sum() for p in model.parameters() if p.requires_grad]
    return torch.stack(terms).sum() * 0.0 if terms else torch.zeros(())


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def build_data(args: argparse.Namespace, dd: Dist) -> Any:
    """Datasets for train / val / test of both tasks (see ssm_builders.build_datasets)."""
    return B.build_datasets(
        data=args.data, frames=args.frames, image_size=args.image_size, seed=args.seed, data_seed=args.data_seed,
        class_balance=args.synthetic_balance, nuisance=args.synthetic_nuisance, fold=args.fold,
        quick=args.quick, size=args.synthetic_size, val_fraction=args.val_fraction,
        exp_fraction=args.exp_fraction, au_fraction=args.au_fraction,
        au_dataset=args.au_dataset, au_root=args.au_root, au_manifest=args.au_manifest,
        au_test_manifest=args.au_test_manifest, exp_dataset=args.exp_dataset, exp_root=args.exp_root,
        exp_manifest=args.exp_manifest, exp_test_manifest=args.exp_test_manifest,
        au_select=args.au_select, tasks=(args.task,) if args.mode == "stl" else ("exp", "au"),
    )


def make_train_loader(ds: Any, batch: int, dd: Dist, seed: int, workers: int) -> tuple[Any, Any]:
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if dd.enabled:
        sampler = DistributedSampler(ds, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=seed, drop_last=True)
    else:
        g = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(ds, generator=g)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    return loader, sampler


def make_eval_loader(ds: Any, batch: int, dd: Dist, workers: int) -> Any:
    """Rank r evaluates items r, r+W, ... (no padding duplicates; results are gathered)."""
    from torch.utils.data import DataLoader, Subset

    if ds is None:
        return None
    if dd.enabled:
        ds = Subset(ds, list(range(dd.rank, len(ds), dd.world)))
    return DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)


# ----------------------------------------------------------------------------------------------
# train / eval
# ----------------------------------------------------------------------------------------------


def compute_losses(out: dict[str, Tensor], eb: dict | None, ab: dict | None, lam: float) -> dict[str, Tensor]:
    from facelayers.losses import au_loss, expression_loss, joint_loss

    l_exp = l_au = None
    if eb is not None and "exp_logits" in out:
        l_exp = expression_loss(out["exp_logits"].float(), eb["label"])
    if ab is not None and "au_logits" in out:
        logits = out["au_logits"].float()
        labels = ab["labels"].float()
        mask = ab.get("mask")
        if logits.dim() == 3:  # all frames: mask [B, T] True = labelled frame
            l_au = au_loss(logits, labels, mask=mask)
        else:
            if labels.dim() == 3:  # [B, T, M] labels with centre supervision
                labels = labels[:, labels.shape[1] // 2]
            valid = None
            if mask is not None and mask.dim() == 2:
                valid = mask[:, mask.shape[1] // 2]
            l_au = au_loss(logits, labels, mask=valid)
    # a single-task model (STL) trains its loss unweighted; a joint model keeps eq. 14's weights
    total = joint_loss(l_exp, l_au, lam=lam, renormalize_missing=(l_exp is None) != (l_au is None))
    res = {"loss": total}
    if l_exp is not None:
        res["loss_exp"] = l_exp
    if l_au is not None:
        res["loss_au"] = l_au
    return res


def to_device(batch: dict | None, device: torch.device) -> dict | None:
    if batch is None:
        return None
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class SingleTaskPairs:
    """STL counterpart of HeterogeneousLoader: ``(batch, None)`` or ``(None, batch)`` per step."""

    def __init__(self, task: str, loader: Any) -> None:
        self.task, self.loader, self.epoch = task, loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for obj in (getattr(self.loader, "sampler", None), getattr(self.loader, "dataset", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def __iter__(self) -> Any:
        for b in self.loader:
            yield (b, None) if self.task == "exp" else (None, b)


def make_pairs(loaders: dict[str, Any], args: argparse.Namespace) -> Any:
    """One batch of each task per step (epoch = longer loader; facelayers' HeterogeneousLoader,
    which also applies ``--exp-fraction`` / ``--au-fraction``)."""
    if len(loaders) == 1:
        (task, loader), = loaders.items()
        return SingleTaskPairs(task, loader)
    from facelayers.data import HeterogeneousLoader

    return HeterogeneousLoader(loaders["exp"], loaders["au"], exp_fraction=args.exp_fraction,
                               au_fraction=args.au_fraction, seed=args.seed)


def train_one_epoch(model: nn.Module, core: B.SSMModel, pairs: Any, optimizer: torch.optim.Optimizer,
                    args: argparse.Namespace, device: torch.device, dd: Dist, epoch: int) -> dict[str, float]:
    from tqdm.auto import tqdm

    model.train()
    sums: dict[str, float] = {}
    n = 0
    pairs.set_epoch(epoch)
    steps_per_epoch = len(pairs)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=args.no_progress or not dd.main, dynamic_ncols=True)
    amp = device.type == "cuda" and not args.no_amp
    for step, (eb, ab) in enumerate(pairs):
        if step >= steps_per_epoch:
            break
        eb, ab = to_device(eb, device), to_device(ab, device)
        exp_clips = eb["clip"] if eb is not None else None
        au_clips = ab["clip"] if ab is not None else None
        n_exp = exp_clips.shape[0] if exp_clips is not None else 0
        n_au = au_clips.shape[0] if au_clips is not None else 0
        t = (exp_clips if exp_clips is not None else au_clips).shape[1]
        if exp_clips is not None and au_clips is not None and au_clips.shape[1] != t:
            raise ValueError(f"expression clips have {t} frames, AU clips {au_clips.shape[1]}; use the same --frames")
        optimizer.zero_grad(set_to_none=True)
        # per-sample task routing of the concatenated pass (the forward would set it up by itself;
        # activation checkpointing carries the task ids into its recomputation, see ssm_builders)
        with core.routing(n_exp, n_au, t, device):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(exp_clips, au_clips)
            losses = compute_losses(out, eb, ab, args.lam)
            loss = losses["loss"]
            if dd.enabled and not args.ddp_find_unused:
                loss = loss + zero_contribution(core)
            loss.backward()
        if args.clip_grad and args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], args.clip_grad)
        optimizer.step()
        n += 1
        for k, v in losses.items():  # device tensors: no host sync per step
            sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        if n % 10 == 0 or n == steps_per_epoch:  # one host sync every 10 steps
            shown = {k: float(v) / n for k, v in sums.items()}
            if not all(math.isfinite(v) for v in shown.values()):
                raise FloatingPointError(f"non-finite loss {shown} by epoch {epoch + 1} step {step + 1}")
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        bar.update(1)
    bar.close()
    keys = sorted(sums)
    t = torch.stack([sums[k] for k in keys]).double() / max(n, 1) if keys else torch.zeros(0, dtype=torch.float64)
    if dd.enabled:
        dist.all_reduce(t)  # on the training device: nccl needs CUDA tensors
        t = t / dd.world
    res = {k: float(v) for k, v in zip(keys, t.cpu())}
    res["steps"] = n
    return res


@torch.no_grad()
def predict(core: B.SSMModel, loader: Any, task: str, device: torch.device, dd: Dist, amp: bool) -> dict[str, Tensor]:
    """Run one task over a loader shard; returns gathered CPU tensors (scores, targets)."""
    core.eval()
    scores, targets, masks = [], [], []
    if loader is not None:
        for batch in loader:
            batch = to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = core(batch["clip"], None) if task == "exp" else core(None, batch["clip"])
            if task == "exp":
                scores.append(out["exp_logits"].float().softmax(-1).cpu())
                targets.append(batch["label"].cpu())
            else:
                logits = out["au_logits"].float()
                labels = batch["labels"].float()
                mask = batch.get("mask")
                if logits.dim() == 3:
                    m = mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
                    scores.append(logits.sigmoid()[m].cpu())
                    targets.append(labels[m].cpu())
                else:
                    if labels.dim() == 3:
                        labels = labels[:, labels.shape[1] // 2]
                    keep = mask[:, mask.shape[1] // 2].bool() if mask is not None and mask.dim() == 2 else None
                    p = logits.sigmoid()
                    if keep is not None:
                        p, labels = p[keep], labels[keep]
                    scores.append(p.cpu())
                    targets.append(labels.cpu())
    if scores:
        s, y = torch.cat(scores), torch.cat(targets)
    else:
        s = torch.zeros(0)
        y = torch.zeros(0, dtype=torch.long)
    return {"scores": gather_cat(s, dd), "targets": gather_cat(y, dd)}


def exp_metrics(scores: Tensor, targets: Tensor, num_classes: int) -> dict[str, Any]:
    from facelayers.metrics import confusion_matrix, uar, war

    pred = scores.argmax(-1)
    return {
        "uar": float(uar(pred, targets, num_classes)),
        "war": float(war(pred, targets)),
        "confusion_matrix": confusion_matrix(pred, targets, num_classes).tolist(),
        "n": int(targets.numel()),
    }


def au_metrics(scores: Tensor, targets: Tensor, aus: Sequence[int]) -> dict[str, Any]:
    from facelayers.metrics import au_auc, au_f1

    f1 = au_f1(scores, targets, threshold=0.5)
    try:
        auc = au_auc(scores, targets)
    except ValueError:
        auc = None
    per = [None if (v != v) else float(v) for v in torch.as_tensor(f1["per_au"]).tolist()]
    res = {
        "f1_mean": float(f1["mean"]),
        "f1_per_au": {facs.au_label(a): v for a, v in zip(aus, per)},
        "n": int(targets.shape[0]),
    }
    if auc is not None:
        if isinstance(auc, dict):
            res["auc_mean"] = float(auc["mean"])
            res["auc_per_au"] = {facs.au_label(a): (None if v != v else float(v))
                                 for a, v in zip(aus, torch.as_tensor(auc["per_au"]).tolist())}
        else:
            res["auc_mean"] = float(auc)
    return res


def evaluate(core: B.SSMModel, loaders: dict[str, Any], device: torch.device, dd: Dist, args: argparse.Namespace) -> dict[str, Any]:
    amp = device.type == "cuda" and not args.no_amp
    res: dict[str, Any] = {}
    if "exp" in core.cfg.tasks and loaders.get("exp") is not None:
        r = predict(core, loaders["exp"], "exp", device, dd, amp)
        res["exp"] = exp_metrics(r["scores"], r["targets"], len(core.cfg.expressions))
    if "au" in core.cfg.tasks and loaders.get("au") is not None:
        r = predict(core, loaders["au"], "au", device, dd, amp)
        res["au"] = au_metrics(r["scores"], r["targets"], core.cfg.aus)
    return res


def selection_score(metrics: dict[str, Any]) -> float:
    """Validation score for model selection: mean of AU F1 (mean) and expression UAR."""
    vals = []
    if "au" in metrics:
        vals.append(metrics["au"]["f1_mean"])
    if "exp" in metrics:
        vals.append(metrics["exp"]["uar"])
    return float(sum(vals) / len(vals)) if vals else float("nan")


def flat_metrics(prefix: str, m: dict[str, Any]) -> dict[str, float]:
    out = {}
    if "exp" in m:
        out[f"{prefix}/uar"] = m["exp"]["uar"]
        out[f"{prefix}/war"] = m["exp"]["war"]
    if "au" in m:
        out[f"{prefix}/au_f1"] = m["au"]["f1_mean"]
        if "auc_mean" in m["au"]:
            out[f"{prefix}/au_auc"] = m["au"]["auc_mean"]
    return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def chance_levels(data: Any, cfg: B.ModelConfig) -> dict[str, float]:
    """Chance references on the test data: UAR of a constant/random guess = 1/K; AU F1 of
    predicting every AU active = mean over AUs of 2p/(1+p) (p = positive rate)."""
    res = {"uar": 1.0 / len(cfg.expressions)}
    rates = getattr(data, "au_test_positive_rate", None)
    if rates is not None:
        p = torch.as_tensor(rates, dtype=torch.float64)
        res["au_f1_all_positive"] = float((2 * p / (1 + p)).mean())
    return res


def summary_table(test: dict[str, Any], chance: dict[str, float], cfg: B.ModelConfig, seconds: float) -> str:
    lines = []
    title = f"SSM reference | mode={cfg.mode}" + (f" task={cfg.tasks[0]}" if cfg.mode == "stl" else "") + \
        f" | backbone={cfg.backbone} | {seconds / 60:.1f} min"
    lines.append(title)
    lines.append("-" * max(len(title), 48))
    lines.append(f"{'metric':<28}{'test':>10}{'chance':>10}")
    if "exp" in test:
        lines.append(f"{'expression UAR':<28}{100 * test['exp']['uar']:>10.2f}{100 * chance['uar']:>10.2f}")
        lines.append(f"{'expression WAR':<28}{100 * test['exp']['war']:>10.2f}{'':>10}")
    if "au" in test:
        ch = chance.get("au_f1_all_positive")
        lines.append(f"{'AU F1@0.5 (mean)':<28}{100 * test['au']['f1_mean']:>10.2f}"
                     + (f"{100 * ch:>10.2f}" if ch is not None else f"{'':>10}"))
        if "auc_mean" in test["au"]:
            lines.append(f"{'AU AUC (mean)':<28}{100 * test['au']['auc_mean']:>10.2f}{50.0:>10.2f}")
        for k, v in test["au"]["f1_per_au"].items():
            lines.append(f"{'  F1 ' + k:<28}{('%10.2f' % (100 * v)) if v is not None else '       n/a'}")
    lines.append("(chance: UAR = 1/K; AU F1 = predicting every AU active; AUC = 50)")
    return "\n".join(lines)


def write_plots(run: str, core: B.SSMModel, history: list[dict], test: dict[str, Any], maps_before: Any) -> list[str]:
    from facelayers import viz

    paths = []
    try:
        if history:
            viz.plot_training_curves(history, path=os.path.join(run, "training_curves.png"), title="training")
            paths.append("training_curves.png")
        if "exp" in test:
            viz.plot_confusion_matrix(torch.tensor(test["exp"]["confusion_matrix"]), list(core.cfg.expressions),
                                      path=os.path.join(run, "confusion_matrix.png"), title="test confusion matrix")
            paths.append("confusion_matrix.png")
        if maps_before is not None and core.mapping is not None and hasattr(core.mapping, "maps"):
            with torch.no_grad():
                after = tuple(m.detach().float().cpu() for m in core.mapping.maps())
            viz.plot_dpm_maps({"initial": maps_before, "learned": after}, list(core.cfg.expressions),
                              list(core.cfg.aus), path=os.path.join(run, "dpm_maps.png"),
                              title="DPM maps before / after training (cf. paper Fig. 7)")
            paths.append("dpm_maps.png")
    except ImportError as err:
        print(f"warning: plots skipped ({err})", file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


class ExpertDropper:
    """Debug aid: with ``drop=True`` every MoE router on this rank skips one private expert (top-k
    over the other experts, gates recomputed from the same softmax); always counts the tokens each
    expert receives."""

    def __init__(self, core: nn.Module, expert: int, drop: bool = True) -> None:
        from facelayers.moe import MoEFFN

        self.layers = [m for m in core.modules() if isinstance(m, MoEFFN)]
        if not self.layers:
            raise ValueError("--debug-drop-expert needs a model with MoE layers (mode baseline or ssm)")
        e = self.layers[0].num_experts
        if not 0 <= expert < e:
            raise ValueError(f"--debug-drop-expert: expert must be in [0, {e}), got {expert}")
        self.expert = expert
        self.drop = drop
        self.counts = torch.zeros(e, dtype=torch.long)
        self.initial = [m.w1[:, expert].detach().clone() for m in self.layers]
        for m in self.layers:
            m._route = self._wrap(m, m._route)  # noqa: SLF001 - debug instrumentation only

    def _wrap(self, layer: nn.Module, orig: Any) -> Any:
        def route(tokens: Tensor, tok_task: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
            top_i, top_p, probs = orig(tokens, tok_task)
            e = layer.num_experts
            if not self.drop:
                self.counts += torch.bincount((top_i % e).reshape(-1).cpu(), minlength=e)
                return top_i, top_p, probs
            masked = probs.masked_fill(torch.arange(e, device=probs.device) == self.expert, -1.0)
            _, top_i = masked.topk(layer.top_k, dim=-1)
            top_p = probs.gather(1, top_i)
            if layer.renormalize:
                top_p = top_p / top_p.sum(dim=-1, keepdim=True)
            self.counts += torch.bincount(top_i.reshape(-1).cpu(), minlength=e)
            if tok_task is not None and layer.num_tasks > 1:
                top_i = top_i + (tok_task * e).unsqueeze(1)
            return top_i, top_p, probs

        return route


def check_replicas(core: nn.Module, dd: Dist, dropper: ExpertDropper | None, run_dir: str) -> dict[str, Any]:
    """All-gather every parameter and report the largest difference between ranks."""
    vec = torch.cat([p.detach().float().reshape(-1).cpu() for p in core.parameters()])
    gathered: list[Any] = [None] * dd.world
    dist.all_gather_object(gathered, vec)
    diffs = [float((g - gathered[0]).abs().max()) for g in gathered]
    names_diff = []
    if max(diffs) > 0:
        off = 0
        for name, p in core.named_parameters():
            n = p.numel()
            if any(float((g[off:off + n] - gathered[0][off:off + n]).abs().max()) > 0 for g in gathered):
                names_diff.append(name)
            off += n
    info: dict[str, Any] = {"world_size": dd.world, "max_abs_diff": max(diffs), "identical": max(diffs) == 0.0,
                            "differing_parameters": names_diff[:20]}
    counts: list[Any] = [None] * dd.world
    dist.all_gather_object(counts, None if dropper is None else dropper.counts.tolist())
    drops: list[Any] = [None] * dd.world
    dist.all_gather_object(drops, None if dropper is None else dropper.drop)
    info["expert_dropped_on_rank"] = drops
    info["expert_token_counts_per_rank"] = counts
    if dropper is not None:
        moved = [float((m.w1[:, dropper.expert].detach() - w0).abs().max()) for m, w0 in zip(dropper.layers, dropper.initial)]
        info["dropped_expert"] = dropper.expert
        info["dropped_expert_weight_change"] = max(moved)
    if dd.main:
        with open(os.path.join(run_dir, "ddp_check.json"), "w") as f:
            json.dump(info, f, indent=2)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, train, evaluate and report one configuration; returns the metrics dict."""
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, sweeps) keep their setting


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    args = resolve_defaults(args)
    device = pick_device(args)
    dd = setup_distributed(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and args.backbone == "tiny":
        torch.set_num_threads(1)
    elif dd.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dd.world))
    seed_everything(args.seed)

    # backbone first: it fixes the image size the data must be rendered at
    clip_kwargs = B.tiny_clip_kwargs(*[int(v) for v in args.tiny.split(",")]) if args.tiny else None
    clip = B.build_backbone(args.backbone, args.pretrained, clip_kwargs=clip_kwargs)
    if args.backbone != "tiny" and not args.pretrained and dd.main:
        print(f"warning: --backbone {args.backbone} without --pretrained: random init (pass a checkpoint file "
              "or an open_clip tag to reproduce the paper)", file=sys.stderr)
    img = clip.visual.image_size
    args.image_size = int(img[0] if isinstance(img, (tuple, list)) else img)
    t_data = time.time()
    data = build_data(args, dd)
    t_data = time.time() - t_data
    cfg = model_config(args, data.expressions, data.aus)
    seed_everything(args.seed)  # model init independent of how much randomness data building used
    core = B.build_model(cfg, clip=clip).to(device)
    maps_before = None
    if core.mapping is not None and hasattr(core.mapping, "maps"):
        with torch.no_grad():
            maps_before = tuple(m.detach().float().cpu() for m in core.mapping.maps())
    optimizer = B.build_optimizer(core, lr=args.lr, lr_visual=args.lr_visual, weight_decay=args.weight_decay)
    scheduler = B.build_scheduler(optimizer, milestones=args.milestones, gamma=args.gamma)

    run_dir = args.out
    ckpt = os.path.join(run_dir, "checkpoint")
    if dd.main:
        os.makedirs(ckpt, exist_ok=True)
    start_epoch, history, best = 0, [], {"score": -math.inf, "epoch": -1}
    if args.resume and os.path.isfile(os.path.join(ckpt, "trainer.json")):
        B.load_weights(core, ckpt, "last")
        meta = B.load_optimizer(optimizer, ckpt)
        start_epoch = int(meta["epoch"]) + 1
        history = meta.get("history", [])
        best = meta.get("best", best)
        scheduler.load_state_dict(meta["scheduler"])
        rng = meta.get("rng")
        if rng is not None:
            from safetensors.torch import load_file

            st = load_file(os.path.join(ckpt, "rng.safetensors"))
            torch.set_rng_state(st["torch"])
            ver, internal, gauss = json.loads(rng)
            random.setstate((ver, tuple(internal), gauss))
        if dd.main:
            print(f"resumed from {ckpt} at epoch {start_epoch + 1}", file=sys.stderr)
        maps_meta = meta.get("maps_before")
        if maps_meta is not None:
            maps_before = tuple(torch.tensor(m) for m in maps_meta)

    dropper = None
    if args.debug_drop_expert:
        r, e = (int(v) for v in args.debug_drop_expert.split(":"))
        dropper = ExpertDropper(core, e, drop=r == dd.rank)  # other ranks only count tokens

    model: nn.Module = core
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=args.ddp_find_unused)

    train_loaders = {}
    for task in cfg.tasks:
        ds = data.train[task]
        frac = args.exp_fraction if task == "exp" else args.au_fraction
        if len(cfg.tasks) == 1 and frac < 1.0:  # STL: subsample here (HeterogeneousLoader does it otherwise)
            from facelayers.data import fraction_subset

            ds = fraction_subset(ds, frac, args.seed)
            frac = 1.0
        batch = args.batch_exp if task == "exp" else args.batch_au
        batch = min(batch, max(1, int(len(ds) * frac) // dd.world))
        train_loaders[task], _ = make_train_loader(ds, batch, dd, args.seed, args.workers)
    pairs = make_pairs(train_loaders, args)
    eval_batch = max(args.batch_exp, args.batch_au)
    val_loaders = {t: make_eval_loader(data.val[t], eval_batch, dd, args.workers) for t in cfg.tasks}
    test_loaders = {t: make_eval_loader(data.test[t], eval_batch, dd, args.workers) for t in cfg.tasks}

    if dd.main:
        n_train = {t: len(data.train[t]) for t in cfg.tasks}
        n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)
        print(f"[ssm] mode={cfg.mode} tasks={cfg.tasks} backbone={cfg.backbone} frames={cfg.num_frames} "
              f"image={cfg.image_size} train={n_train} trainable={n_params / 1e6:.2f}M device={device} "
              f"world={dd.world} data_built_in={t_data:.1f}s out={run_dir}", file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        t_ep = time.time()
        lr_used = optimizer.param_groups[-1]["lr"]
        tr = train_one_epoch(model, core, pairs, optimizer, args, device, dd, epoch)
        scheduler.step()
        t_ev = time.time()
        val = evaluate(core, val_loaders, device, dd, args)
        tr["train_s"], tr["eval_s"] = t_ev - t_ep, time.time() - t_ev
        score = selection_score(val)
        rec = {"epoch": epoch + 1, **{k: v for k, v in tr.items() if k not in ("steps", "train_s", "eval_s")},
               **flat_metrics("val", val),
               "val/score": score, "lr": lr_used}
        history.append(rec)
        improved = score > best["score"] or best["epoch"] < 0
        if improved:
            best = {"score": score, "epoch": epoch + 1}
        if dd.main:
            print("[ssm] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
                  + f" ({tr['steps']} steps {tr['train_s']:.0f}s, eval {tr['eval_s']:.0f}s)", file=sys.stderr)
            if improved:
                B.save_model(core, ckpt, {"epoch": epoch + 1, "val": val, "args": _args_json(args)}, name="best")
            B.save_model(core, ckpt, {"epoch": epoch + 1, "args": _args_json(args)}, name="last")
            from safetensors.torch import save_file

            save_file({"torch": torch.get_rng_state()}, os.path.join(ckpt, "rng.safetensors"))
            B.save_optimizer(optimizer, ckpt, {
                "epoch": epoch, "history": history, "best": best, "scheduler": scheduler.state_dict(),
                "rng": json.dumps(random.getstate()),
                "maps_before": [m.tolist() for m in maps_before] if maps_before is not None else None,
            })
        if dd.enabled:
            dist.barrier()

    replica_info = check_replicas(core, dd, dropper, run_dir) if (args.check_replicas and dd.enabled) else None

    # model selection: the best validation epoch; the test split is only touched here
    if os.path.isfile(os.path.join(ckpt, "best.safetensors")):
        B.load_weights(core, ckpt, "best")
    test = evaluate(core, test_loaders, device, dd, args)
    seconds = time.time() - t0
    chance = chance_levels(data, cfg)
    result = {
        "config": cfg.to_json(), "args": _args_json(args), "best_epoch": best["epoch"], "val_score": best["score"],
        "test": test, "chance": chance, "history": history, "seconds": seconds, "world_size": dd.world,
    }
    if replica_info is not None:
        result["ddp_check"] = replica_info
    if core.mapping is not None and hasattr(core.mapping, "maps"):
        with torch.no_grad():
            result["dpm_maps"] = {"A": core.mapping.maps()[0].float().cpu().tolist(),
                                  "B": core.mapping.maps()[1].float().cpu().tolist()}
    if dd.main:
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        if not args.no_plots:
            result["plots"] = write_plots(run_dir, core, history, test, maps_before)
        table = summary_table(test, chance, cfg, seconds)
        with open(os.path.join(run_dir, "summary.txt"), "w") as f:
            f.write(table + "\n")
        print(table)
    if dd.enabled:
        dist.barrier()
    return result


def _args_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except B.BackboneUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except B.DataUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
