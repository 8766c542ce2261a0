#!/usr/bin/env python
"""Reference SSM: build, train, evaluate and report (``python examples/ssm_reference.py``).

With no arguments it trains the full SSM (MoE CLIP encoder, temporal heads, TSP prompts, DPM,
cosine heads) on the shipped tiny CLIP pretrained on synthetic FACS captions (``--backbone tiny``:
the same shape from random init) on the synthetic FACS video benchmark in a few minutes
on 2 CPU cores, evaluates it on held-out test data (model selection on a validation split carved
from the training data), writes a run folder and prints a summary table. With arguments it runs the
paper's setup (ViT-B/16 weights, BP4D/DISFA + DFEW/FERV39K/MAFW). See ``docs/reference.md``.
``--recipe ssm_release`` trains the released code's model and training recipe instead (its loss,
optimizer groups, schedule, EMA, clip mixup, router noise; ``docs/release.md`` ("Training recipe")).

The model is the library's (``facelayers.models.ssm``); this script is the recipe around it (CLI,
data, training loop, evaluation, report). The model is assembled from its parts like this
(:func:`assemble_model` below; ``facelayers.models.ssm.build_model`` does the same)::

    clip = build_backbone("tiny")                        # open_clip CLIP (vision + text towers)
    visual = build_vision_encoder(clip, cfg)             # MoE FFNs injected, routed per task
    text = build_text_side(clip, cfg)                    # TSP prompts on the frozen text tower
    mapping = build_mapping(cfg)                         # DPM between expression and AU prototypes
    exp_temporal, au_temporal = build_temporal_heads(cfg, dim)
    exp_head, au_head = build_heads(cfg, dim)            # cosine heads against the prototypes
    model = SSMModel(visual, exp_temporal, au_temporal, exp_head, au_head, text=text, mapping=mapping)

Distributed: ``torchrun --nproc_per_node=N examples/ssm_reference.py ...`` (gloo on CPU, nccl on
GPU; DistributedDataParallel, never DataParallel). Every argument is checked before any data or
model is built; a bad one prints ``error: ... (expected ..., got ...)`` and exits with code 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from facelayers import facs  # noqa: E402
from facelayers.io import load_optimizer, save_optimizer  # noqa: E402
from facelayers.models import cli  # noqa: E402
from facelayers.models.ssm import (  # noqa: E402
    MODES,
    TINY_CLIP,
    ModelConfig,
    SSMModel,
    build_backbone,
    build_heads,
    build_mapping,
    build_optimizer,
    build_scheduler,
    build_temporal_heads,
    build_text_side,
    build_vision_encoder,
    load_weights,
    save_model,
    tiny_clip_kwargs,
)
from facelayers.models.ssm import data as ssm_data  # noqa: E402
from facelayers.moe import TaskTopKRouter  # noqa: E402
from facelayers.ops.grouped_experts import BACKENDS as MOE_BACKENDS  # noqa: E402


def assemble_model(cfg: ModelConfig, clip: nn.Module, router_layer: Any = None) -> SSMModel:
    """The reference SSM from its parts (the order fixes the initial weights for a seed)."""
    cfg.validate()
    visual = build_vision_encoder(clip, cfg, router_layer=router_layer)  # clip.visual + MoE FFNs
    text = build_text_side(clip, cfg)  # None without TSP
    mapping = build_mapping(cfg)  # None without DPM / a sibling
    dim = int(visual.output_dim)
    exp_temporal, au_temporal = build_temporal_heads(cfg, dim)
    exp_head, au_head = build_heads(cfg, dim)
    return SSMModel(visual, exp_temporal, au_temporal, exp_head, au_head, text=text, mapping=mapping, config=cfg)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

PAPER_LR_VISUAL = 1e-6
PAPER_LR = 1e-4
#: The tiny backbones (default tiny shape, CPU-sized defaults): random init and the shipped FACS-pretrained one.
TINY_BACKBONES = ("tiny", "tiny-facs")
#: the main job's backbone: the tiny CLIP pretrained on synthetic FACS captions (facelayers.assets)
DEFAULT_BACKBONE = "tiny-facs"
#: tiny-facs' vision lr, chosen on validation (docs/reference.md, "The default backbone and its learning rates")
TINY_FACS_LR_VISUAL = 1e-3


def tiny_spec(text: str) -> str:
    """``--tiny IMG,PATCH,WIDTH,LAYERS``, checked (argparse ``type=``)."""
    parts = text.split(",")
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        vals = []
    if len(parts) != 4 or len(vals) != 4:
        raise argparse.ArgumentTypeError(f"expected IMG,PATCH,WIDTH,LAYERS (four integers, e.g. 32,8,64,2), got {text!r}")
    try:
        tiny_clip_kwargs(*vals)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def tiny_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """``open_clip.CLIP`` kwargs of ``--tiny`` (``None``: the default tiny CLIP or a named backbone)."""
    return tiny_clip_kwargs(*[int(v) for v in args.tiny.split(",")]) if args.tiny else None


def rank_expert(text: str) -> str:
    """``--debug-drop-expert RANK:EXPERT``, checked (argparse ``type=``)."""
    parts = text.split(":")
    try:
        rank, expert = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:EXPERT (two integers >= 0, e.g. 0:1), got {text!r}") from None
    if rank < 0 or expert < 0:
        raise argparse.ArgumentTypeError(f"expected RANK:EXPERT with both >= 0, got {text!r}")
    return text


def rank_expert_values(text: str) -> tuple[int, int]:
    """``"RANK:EXPERT"`` (checked by :func:`rank_expert`) -> ``(rank, expert)``."""
    rank, expert = (int(v) for v in text.split(":"))
    return rank, expert


def build_parser() -> argparse.ArgumentParser:
    p = cli.ScriptArgumentParser(
        prog="ssm_reference.py",
        description="Train and evaluate the reference SSM (STL / Baseline / SSM) on synthetic or real data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pos_int, nonneg_int, pos_float, nonneg_float = cli.positive_int, cli.nonnegative_int, cli.positive_float, cli.nonnegative_float
    g = p.add_argument_group("run")
    g.add_argument("--out", type=cli.output_folder, default=None, help="run folder (default runs/<mode>-<task>-seed<seed>)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--quick", action="store_true", help="smoke run (< 1 min on CPU): tiny data, 1 epoch")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if present")
    g.add_argument("--device", type=cli.device_arg, default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    g.add_argument("--threads", type=pos_int, default=None,
                   help="torch CPU threads per process (default: 1 for the tiny backbone on CPU, whose small "
                        "matmuls gain little from threads and lose a lot when cores are shared)")
    g.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    g = p.add_argument_group("model")
    g.add_argument("--mode", choices=MODES, default="ssm", help="stl: one task, plain CLIP + linear head; "
                   "baseline: joint MoE + linear heads (Table V row 1); ssm: full model")
    g.add_argument("--task", choices=("exp", "au"), default="exp", help="task of --mode stl")
    g.add_argument("--backbone", default=None, help=f"'{DEFAULT_BACKBONE}' (default: the tiny CLIP pretrained on "
                   "synthetic FACS captions, shipped with facelayers), 'tiny' (the same shape, random init; the "
                   "default with --tiny) or an open_clip name, e.g. ViT-B-16")
    g.add_argument("--pretrained", default=None, help="local checkpoint file or open_clip tag (e.g. openai)")
    g.add_argument("--tiny", type=tiny_spec, default=None, metavar="IMG,PATCH,WIDTH,LAYERS",
                   help="shape of the tiny backbone, e.g. 32,8,64,2 (default: facelayers.models.ssm.TINY_CLIP)")
    g.add_argument("--frames", type=pos_int, default=None, help="frames per clip T (default 4 tiny / 16 otherwise)")
    g.add_argument("--moe-blocks", default=None, help="'last:6' | 'all' | '0,3' | 'none' (default all tiny / last:6)")
    g.add_argument("--num-experts", type=pos_int, default=4)
    g.add_argument("--top-k", type=pos_int, default=2)
    g.add_argument("--moe-hidden", type=pos_int, default=None, help="private expert hidden size (default 2/3 width: 512 for ViT-B)")
    g.add_argument("--temporal-heads", type=pos_int, default=None, help="(default 8; 4 for tiny)")
    g.add_argument("--au-select", choices=("center", "all"), default=None,
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
    g.add_argument("--n-ctx", type=pos_int, default=8, help="learnable context tokens (Table IX)")
    g.add_argument("--alpha", type=cli.finite_float, default=0.1, help="initial alpha (Table S3)")
    g.add_argument("--beta", type=cli.finite_float, default=0.1, help="initial beta (Table S3)")
    g.add_argument("--tau", type=pos_float, default=0.01, help="cosine-head temperature")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    g.add_argument("--au-dataset", choices=("bp4d", "disfa"), default="bp4d")
    g.add_argument("--au-root", type=cli.existing_folder, default=None)
    g.add_argument("--au-manifest", type=cli.existing_file, default=None, help="training manifest (real data)")
    g.add_argument("--au-test-manifest", type=cli.existing_file, default=None)
    g.add_argument("--exp-dataset", choices=("dfew", "ferv39k", "mafw"), default="dfew")
    g.add_argument("--exp-root", type=cli.existing_folder, default=None)
    g.add_argument("--exp-manifest", type=cli.existing_file, default=None, help="training manifest (real data)")
    g.add_argument("--exp-test-manifest", type=cli.existing_file, default=None)
    g.add_argument("--fold", type=pos_int, default=1, help="fold number (real data: names in the manifests; synthetic: 1..3)")
    g.add_argument("--val-fraction", type=cli.open_unit_float, default=0.15, help="validation split carved from training data")
    g.add_argument("--exp-fraction", type=cli.unit_float, default=1.0, help="fraction of expression training data (Table S1)")
    g.add_argument("--au-fraction", type=cli.unit_float, default=1.0, help="fraction of AU training data (Table S2)")
    g.add_argument("--synthetic-size", type=pos_float, default=1.0, help="scale of the synthetic benchmark")
    g.add_argument("--synthetic-balance", choices=("uniform", "dfew"), default="uniform",
                   help="class balance of the synthetic expression clips (dfew: DFEW-like imbalance)")
    g.add_argument("--synthetic-nuisance", type=nonneg_float, default=0.5,
                   help="pose / lighting / clutter strength of the synthetic wild clips (the dataset's own default "
                        "is 1.0; 0.5 lets the random-init tiny CLIP learn the task in the default run's budget)")
    g.add_argument("--data-seed", type=nonneg_int, default=0,
                   help="synthetic benchmark seed (fixed across --seed so seeds measure training variance)")
    g.add_argument("--au-train-windows", choices=ssm_data.AU_TRAIN_WINDOWS, default=None,
                   help="AU training windows: padded (every frame, short runs / run ends edge-padded; default) or "
                        "full (the released code's: whole T-frame windows every T frames, short runs and run tails "
                        "dropped; ssm_release). Evaluation covers every labelled frame either way")
    g.add_argument("--exp-sampling", choices=ssm_data.EXP_SAMPLING, default=None,
                   help="expression frames of a clip (real data): segments (equal segments over every frame; default) "
                        "or release (the released code's sampler; ssm_release)")
    g.add_argument("--erase-p", type=cli.probability, default=None,
                   help="random-erasing probability of the real-data training transform (default 0.3, ssm_release 0; "
                        "the synthetic training transform never erases)")
    g.add_argument("--workers", type=nonneg_int, default=0)
    g = p.add_argument_group("transfer settings (docs/reference.md, section Transfer settings)")
    g.add_argument("--exp-shots", type=pos_int, default=None, metavar="K",
                   help="few-shot expressions: K training clips per (seen) class, drawn from the training split with "
                        "--data-seed (validation and test unchanged)")
    g.add_argument("--unseen-classes", default=None, metavar="NAME,NAME",
                   help="unseen expression classes: their clips are dropped from training and validation, the test "
                        "split keeps every class; e.g. --exp-dataset mafw --unseen-classes "
                        "contempt,anxiety,helplessness,disappointment (metrics report them separately: exp_unseen)")
    g.add_argument("--unseen-loss", choices=("seen", "all"), default=None,
                   help="with --unseen-classes: the training softmax runs over the seen classes only (seen, default: "
                        "the unseen logits get no training signal) or over every class (all: every step pushes the "
                        "never-trained classes' logits down; docs/reference.md, Transfer settings)")
    g.add_argument("--freeze-visual", action="store_true",
                   help="freeze the backbone's vision weights (MoE shared experts included; the new MoE parts, "
                        "temporal heads, prompts, mapping and heads still train)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=pos_int, default=None, help="(default 14 tiny / 30 paper)")
    g.add_argument("--batch-exp", type=pos_int, default=None, help="expression clips per step (paper 12)")
    g.add_argument("--batch-au", type=pos_int, default=None, help="AU clips per step (paper 128)")
    g.add_argument("--lr", type=pos_float, default=None, help=f"lr of new parts (paper {PAPER_LR:g}; tiny default 1e-3)")
    g.add_argument("--lr-visual", type=pos_float, default=None,
                   help=f"lr of the pretrained vision weights (paper {PAPER_LR_VISUAL:g}; tiny and tiny-facs default 1e-3, "
                        "tiny-facs' chosen on validation: docs/reference.md)")
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    g.add_argument("--milestones", type=pos_int, nargs="*", default=None, help="epochs where lr *= gamma (paper 10 20)")
    g.add_argument("--gamma", type=pos_float, default=0.1)
    g.add_argument("--lam", type=nonneg_float, default=2.0, help="task balance lambda (eq. 14)")
    g.add_argument("--clip-grad", type=nonneg_float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on GPU")
    g.add_argument("--ddp-find-unused", action="store_true",
                   help="DDP find_unused_parameters=True instead of the zero-contribution trick")
    g.add_argument("--max-steps", type=pos_int, default=None, help="cap optimizer steps per epoch (debugging)")
    g = p.add_argument_group("training recipe (docs/release.md, section Training recipe)")
    g.add_argument("--recipe", choices=("paper", "ssm_release"), default="paper",
                   help="paper: the paper's training (default); ssm_release: the released code's model (release "
                        "preset from the backbone's weights) and training (its loss, optimizer groups, schedule, "
                        "EMA, AU clip mixup, router noise)")
    g.add_argument("--ema-decay", type=cli.ema_decay, default=None,
                   help="EMA of the weights, used for validation and the saved best checkpoint (0 = off; default "
                        "0, ssm_release 0.99)")
    g.add_argument("--mixup-alpha", type=nonneg_float, default=None,
                   help="AU clip mixup, lam ~ Beta(a, a) per batch, seeded by --seed (0 = off; default 0, ssm_release 0.4)")
    g.add_argument("--loss-balance", choices=("none", "moving_mean"), default=None,
                   help="divide each loss term by its moving mean (0.95), restarted every epoch (default none, "
                        "ssm_release moving_mean)")
    g.add_argument("--router-noise", type=nonneg_float, default=None,
                   help="std of the MoE router logit noise in training, seeded by --seed (0 = off; default: the "
                        "model's, 0 for the paper model; ssm_release 0.01)")
    g.add_argument("--lr-delta", type=pos_float, default=None, help="ssm_release: lr of the two DPM delta maps (1e-2)")
    g.add_argument("--tuned-au-f1", choices=("on", "off"), default=None,
                   help="also report au_f1_tuned_release (optimistic): the released code's AU F1, threshold and "
                        "segment-safe vote tuned on the test labels, beside F1@0.5 (default off, ssm_release on)")
    g.add_argument("--select-on", choices=("val", "test"), default="val",
                   help="model selection split: val (carved from training data, default) or test (the release's "
                        "protocol: every selected number is marked optimistic)")
    g = p.add_argument_group("diagnostics")
    g.add_argument("--check-replicas", action="store_true",
                   help="after training, verify that all DDP ranks hold identical parameters (writes ddp_check.json)")
    g.add_argument("--debug-drop-expert", type=rank_expert, default=None, metavar="RANK:EXPERT",
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


#: the tiny backbones' defaults (CPU, synthetic benchmark). tiny: random init, every part at lr 1e-3.
#: tiny-facs: pretrained; its vision lr (the paper's second optimiser group) was chosen on the
#: validation split: every value below the new parts' 1e-3 scored lower (docs/reference.md, "The
#: default backbone and its learning rates").
_TINY = Defaults(frames=4, moe_blocks="all", temporal_heads=4, epochs=14, batch_exp=16, batch_au=16, lr=1e-3,
                 lr_visual=1e-3, milestones=[11])
TINY_DEFAULTS: dict[str, Defaults] = {
    "tiny": _TINY,
    "tiny-facs": dataclasses.replace(_TINY, lr_visual=TINY_FACS_LR_VISUAL),
}


def resolve_backbone(args: argparse.Namespace) -> argparse.Namespace:
    """``--backbone`` left out: the shipped pretrained tiny CLIP, or the random-init ``tiny`` when
    ``--tiny`` asks for another shape (the pretrained weights exist for the default shape only)."""
    if getattr(args, "backbone", None) is None:
        args.backbone = "tiny" if getattr(args, "tiny", None) else DEFAULT_BACKBONE
    return args


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the backbone-dependent defaults (tiny random-init vs pretrained paper config)."""
    resolve_backbone(args)
    if args.backbone in TINY_BACKBONES:
        base = TINY_DEFAULTS[args.backbone]
        d = dataclasses.replace(base, milestones=list(base.milestones))  # args never share the table's list
        if args.quick:
            d = dataclasses.replace(d, epochs=1, batch_exp=8, batch_au=8, milestones=[])
    else:
        d = Defaults(frames=16, moe_blocks="last:6", temporal_heads=8, epochs=30, batch_exp=12, batch_au=128,
                     lr=PAPER_LR, lr_visual=PAPER_LR_VISUAL, milestones=[10, 20])
        if args.quick:
            d.epochs, d.batch_exp, d.batch_au, d.milestones = 1, 2, 2, []
    release = getattr(args, "recipe", "paper") == "ssm_release"
    if release and args.backbone not in TINY_BACKBONES:  # the release's schedule and batches (configs/*.json)
        d.batch_au = 8 if not args.quick else d.batch_au
        d.milestones = [15, 25] if not args.quick else d.milestones
    for k, v in vars(d).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    # the release recipe's pieces: its values under --recipe ssm_release, off otherwise
    for k, on, off in (("ema_decay", 0.99, 0.0), ("mixup_alpha", 0.4, 0.0), ("loss_balance", "moving_mean", "none"),
                       ("au_select", "all", "center"), ("lr_delta", 1e-2, 1e-2), ("router_noise", 0.01, None),
                       ("select_on", "val", "val"), ("recipe", "paper", "paper"),
                       ("au_train_windows", "full", "padded"), ("exp_sampling", "release", "segments"),
                       ("erase_p", 0.0, 0.3), ("tuned_au_f1", "on", "off")):
        if getattr(args, k, None) is None:
            setattr(args, k, on if release else off)
    if args.out is None:
        tag = args.mode if args.mode != "stl" else f"stl-{args.task}"
        args.out = os.path.join("runs", f"{tag}-seed{args.seed}" + ("-quick" if args.quick else ""))
    return args


def model_config(args: argparse.Namespace, expressions: Sequence[str], aus: Sequence[int]) -> ModelConfig:
    tasks = (args.task,) if args.mode == "stl" else ("exp", "au")
    mapping = "none" if args.no_dpm else args.mapping
    return ModelConfig(
        mode=args.mode, tasks=tasks, expressions=tuple(expressions), aus=tuple(int(a) for a in aus),
        backbone=args.backbone, num_frames=args.frames,
        clip_kwargs=tiny_kwargs(args),
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


#: ``{key: DataBundle}`` when :func:`enable_dataset_cache` was called (sweeps reuse datasets).
_DATASET_CACHE: dict[str, Any] | None = None


def enable_dataset_cache() -> None:
    """Reuse datasets between in-process runs that ask for the same data (the training seed does not
    change the synthetic benchmark); used by ``ssm_sweep.py``."""
    global _DATASET_CACHE
    if _DATASET_CACHE is None:
        _DATASET_CACHE = {}


def build_data(args: argparse.Namespace, dd: Dist) -> Any:
    """Datasets for train / val / test of both tasks (see facelayers.models.ssm.data.build_datasets)."""
    kw = dict(
        data=args.data, frames=args.frames, image_size=args.image_size, seed=args.seed, data_seed=args.data_seed,
        class_balance=args.synthetic_balance, nuisance=args.synthetic_nuisance, fold=args.fold,
        quick=args.quick, size=args.synthetic_size, val_fraction=args.val_fraction,
        exp_fraction=args.exp_fraction, au_fraction=args.au_fraction,
        au_dataset=args.au_dataset, au_root=args.au_root, au_manifest=args.au_manifest,
        au_test_manifest=args.au_test_manifest, exp_dataset=args.exp_dataset, exp_root=args.exp_root,
        exp_manifest=args.exp_manifest, exp_test_manifest=args.exp_test_manifest,
        au_select=args.au_select, tasks=(args.task,) if args.mode == "stl" else ("exp", "au"),
        au_train_windows=args.au_train_windows, exp_sampling=args.exp_sampling, erase_p=args.erase_p,
    )
    if _DATASET_CACHE is None:
        return ssm_data.build_datasets(**kw)
    key_kw = {k: v for k, v in kw.items() if not (k == "seed" and kw["data"] == "synthetic")}
    key = json.dumps(key_kw, sort_keys=True, default=str)
    if key not in _DATASET_CACHE:
        _DATASET_CACHE[key] = ssm_data.build_datasets(**kw)
    return _DATASET_CACHE[key]


def unseen_names(args: argparse.Namespace) -> list[str]:
    """The class names of ``--unseen-classes`` (``[]`` without it)."""
    return [n.strip() for n in args.unseen_classes.split(",")] if args.unseen_classes else []


def transfer_data(data: Any, args: argparse.Namespace) -> Any:
    """``--exp-shots`` / ``--unseen-classes`` applied to the expression training (and, for unseen
    classes, validation) data: :func:`facelayers.models.ssm.data.apply_transfer_settings`, the
    shots drawn with ``--data-seed`` (the same shots for every ``--seed``)."""
    if args.exp_shots is None and not args.unseen_classes:
        return data
    try:
        return ssm_data.apply_transfer_settings(data, exp_shots=args.exp_shots, unseen_classes=unseen_names(args),
                                                seed=args.data_seed)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None


def unseen_class_metrics(confusion: Any, expressions: Sequence[str], unseen: Sequence[str]) -> dict[str, Any]:
    """Test metrics of the unseen expression classes, from the test confusion matrix (rows = true
    class): their mean recall (``uar``), the share of their clips classified correctly
    (``accuracy``), per-class recall, the share of their clips given *some* unseen class
    (``predicted_unseen``), the seen classes' UAR and the harmonic mean of both UARs (``h``, the
    usual generalised zero-shot summary). Classes without test clips are left out of the means."""
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    u = [list(expressions).index(n) for n in unseen]
    s_ = [c for c in range(len(expressions)) if c not in u]
    support = cm.sum(1)
    recall = torch.where(support > 0, cm.diagonal() / support.clamp_min(1), torch.full_like(support, float("nan")))

    def mean(ids: list[int]) -> float | None:
        vals = [float(recall[c]) for c in ids if support[c] > 0]
        return sum(vals) / len(vals) if vals else None

    n_u = float(support[u].sum())
    uar_u, uar_s = mean(u), mean(s_)
    return {
        "classes": list(unseen), "n": int(n_u), "uar": uar_u,
        "accuracy": float(cm.diagonal()[u].sum() / n_u) if n_u else None,
        "recall": {expressions[c]: (float(recall[c]) if support[c] > 0 else None) for c in u},
        "predicted_unseen": float(cm[u][:, u].sum() / n_u) if n_u else None,
        "seen_uar": uar_s,
        "h": (None if uar_u is None or uar_s is None
              else 2 * uar_u * uar_s / (uar_u + uar_s) if uar_u + uar_s > 0 else 0.0),
    }


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


def compute_losses(out: dict[str, Tensor], eb: dict | None, ab: dict | None, lam: float,
                   exp_classes: Sequence[int] | None = None) -> dict[str, Tensor]:
    """The step's losses; ``exp_classes``: the classes the expression softmax runs over (the seen
    ones under ``--unseen-classes``; ``None`` = all)."""
    from facelayers.losses import au_loss, expression_loss, joint_loss

    l_exp = l_au = None
    if eb is not None and "exp_logits" in out:
        l_exp = expression_loss(out["exp_logits"].float(), eb["label"], classes=exp_classes)
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


class RecipePieces:
    """The release recipe's pieces in the paper loop: ``--ema-decay``, ``--mixup-alpha``,
    ``--loss-balance moving_mean`` (facelayers.training parts; docs/release.md, "Training recipe")."""

    def __init__(self, args: argparse.Namespace, core: nn.Module, device: torch.device, rank: int = 0) -> None:
        from facelayers.training import ClipMixup, MovingMeanLossBalance, ParameterEMA

        self.ema = ParameterEMA(core, args.ema_decay) if args.ema_decay > 0 else None
        gen = torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)
        self.mixup = ClipMixup(args.mixup_alpha, generator=gen) if args.mixup_alpha > 0 else None
        # one balance per task term, so a step without one task's batch leaves the other's mean alone
        self.balance = ({t: MovingMeanLossBalance(1, device=device) for t in ("exp", "au")}
                        if args.loss_balance == "moving_mean" else None)

    @property
    def active(self) -> bool:
        return self.ema is not None or self.mixup is not None or self.balance is not None

    def new_epoch(self) -> None:
        for b in (self.balance or {}).values():
            b.reset()

    def averaged(self) -> Any:
        return self.ema.average_parameters() if self.ema is not None else contextlib.nullcontext()

    def mix(self, ab: dict | None) -> tuple[dict | None, tuple[Tensor, float] | None]:
        if self.mixup is None or ab is None:
            return ab, None
        clip, perm, lam = self.mixup(ab["clip"])
        return dict(ab, clip=clip), (perm, lam)

    def losses(self, out: dict[str, Tensor], eb: dict | None, ab: dict | None, lam: float,
               mix: tuple[Tensor, float] | None, exp_classes: Sequence[int] | None = None) -> dict[str, Tensor]:
        from facelayers.losses import joint_loss

        res = compute_losses(out, eb, ab, lam, exp_classes)
        if mix is None and self.balance is None:
            return res
        l_exp, l_au = res.get("loss_exp"), res.get("loss_au")
        if mix is not None and l_au is not None:
            perm, m = mix
            ab_b = dict(ab, labels=ab["labels"][perm])  # the partners' targets (and labelled frames)
            if ab.get("mask") is not None:
                ab_b["mask"] = ab["mask"][perm]
            l_au = m * l_au + (1 - m) * compute_losses(out, None, ab_b, lam)["loss_au"]
            res["loss_au"] = l_au
        if self.balance is not None:
            l_exp = self.balance["exp"](l_exp)[0] if l_exp is not None else None
            l_au = self.balance["au"](l_au)[0] if l_au is not None else None
        res["loss"] = joint_loss(l_exp, l_au, lam=lam, renormalize_missing=(l_exp is None) != (l_au is None))
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


def train_one_epoch(model: nn.Module, core: SSMModel, pairs: Any, optimizer: torch.optim.Optimizer,
                    args: argparse.Namespace, device: torch.device, dd: Dist, epoch: int,
                    pieces: RecipePieces | None = None) -> dict[str, float]:
    from tqdm.auto import tqdm

    model.train()
    if pieces is not None:
        pieces.new_epoch()
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
        mix = None
        if pieces is not None:
            ab, mix = pieces.mix(ab)
            au_clips = ab["clip"] if ab is not None else None
        # per-sample task routing of the concatenated pass (the forward would set it up by itself;
        # activation checkpointing carries the task ids into its recomputation, see facelayers.moe)
        with core.routing(n_exp, n_au, t, device):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(exp_clips, au_clips)
            exp_classes = getattr(args, "exp_train_classes", None)
            losses = (pieces.losses(out, eb, ab, args.lam, mix, exp_classes) if pieces is not None
                      else compute_losses(out, eb, ab, args.lam, exp_classes))
            loss = losses["loss"]
            if dd.enabled and not args.ddp_find_unused:
                loss = loss + zero_contribution(core)
            loss.backward()
        if args.clip_grad and args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], args.clip_grad)
        optimizer.step()
        if pieces is not None and pieces.ema is not None:
            pieces.ema.update()
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


def build_release_core(args: argparse.Namespace, clip: nn.Module, data: Any) -> SSMModel:
    """``--recipe ssm_release``: the release preset started from the backbone's weights."""
    from facelayers.models.ssm import moe_block_indices, moe_hidden_default, vision_layers, vision_width
    from facelayers.models.ssm.release_recipe import release_model_from_clip

    core = release_model_from_clip(
        clip, args.au_dataset, args.exp_dataset, num_frames=args.frames,
        moe_blocks=moe_block_indices(args.moe_blocks, vision_layers(clip)), num_experts=args.num_experts,
        top_k=args.top_k, expert_hidden=args.moe_hidden or moe_hidden_default(vision_width(clip)), n_ctx=args.n_ctx)
    r = core.release
    if tuple(r.expressions) != tuple(data.expressions) or tuple(r.aus) != tuple(data.aus):
        raise cli.UsageError(f"--recipe ssm_release: the data's labels do not fit the release model of {args.au_dataset}+{args.exp_dataset} "
                         f"(expected expressions {list(r.expressions)} and AUs {list(r.aus)}, got "
                         f"{list(data.expressions)} and {list(data.aus)})")
    return core


def train_one_epoch_release(core: SSMModel, pairs: Any, recipe: Any, args: argparse.Namespace,
                            device: torch.device, dd: Dist, epoch: int) -> dict[str, float]:
    """One epoch of ``--recipe ssm_release`` (facelayers.models.ssm.release_recipe.ReleaseRecipe)."""
    from tqdm.auto import tqdm

    core.train()
    pairs.set_epoch(epoch)
    recipe.start_epoch(epoch)  # restarts the moving means
    steps_per_epoch = min(len(pairs), args.max_steps) if args.max_steps else len(pairs)
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=args.no_progress or not dd.main, dynamic_ncols=True)
    names = ("loss_exp", "loss_au", "loss_exp_text", "loss_au_text")
    sums: Tensor | None = None
    n = 0
    for step, (eb, ab) in enumerate(pairs):
        if step >= steps_per_epoch:
            break
        if eb is None or ab is None:
            raise ValueError("--recipe ssm_release trains on one expression and one AU batch per step (expected both, "
                             f"got {'no expression' if eb is None else 'no AU'} batch; check --exp-fraction / --au-fraction)")
        eb, ab = to_device(eb, device), to_device(ab, device)
        r = recipe.step(eb["clip"], eb["label"], ab["clip"], ab["labels"].float())
        vals = torch.stack([r.loss.total.float(), *[t.float() for t in r.loss.terms]])
        sums = vals if sums is None else sums + vals  # device tensors: no host sync per step
        n += 1
        if n % 10 == 0 or n == steps_per_epoch:
            shown = (sums / n).tolist()
            if not all(math.isfinite(v) for v in shown):
                raise FloatingPointError(f"non-finite loss {shown} by epoch {epoch + 1} step {step + 1}")
            bar.set_postfix({"loss": f"{shown[0]:.3f}"})
        bar.update(1)
    bar.close()
    res = {k: float(v) / max(n, 1) for k, v in zip(("loss", *names), (sums if sums is not None else torch.zeros(5)).tolist())}
    res["steps"] = n
    return res


def _au_batch(out: dict[str, Tensor], batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    """AU probabilities, labels and the mask of the frames that count (centre or all frames)."""
    logits = out["au_logits"].float()
    labels = batch["labels"].float()
    mask = batch.get("mask")
    if logits.dim() == 3:  # all frames: mask [B, T] True = labelled frame
        return logits.sigmoid(), labels, mask.bool() if mask is not None else None
    if labels.dim() == 3:  # [B, T, M] labels with centre supervision
        labels = labels[:, labels.shape[1] // 2]
    keep = mask[:, mask.shape[1] // 2].bool() if mask is not None and mask.dim() == 2 else None
    return logits.sigmoid(), labels, keep


def _gather(obj: Any, dd: Dist) -> list[Any]:
    """``obj`` of every rank (rank order); ``[obj]`` without DDP."""
    if not dd.enabled:
        return [obj]
    out: list[Any] = [None] * dd.world
    dist.all_gather_object(out, obj)
    return out


def tuned_au_f1_release(dataset: Any, parts: list[tuple[Tensor, ...]], dd: Dist) -> dict[str, Any]:
    """``au_f1_tuned_release (optimistic)``: the released code's reported AU F1 over every evaluated
    frame (gathered over DDP ranks, in frame order per sequence; votes stay inside each continuous
    segment), tuned on these labels (``facelayers.models.ssm.release_recipe.release_tuned_au_f1``)."""
    from facelayers.models.ssm.release_recipe import release_tuned_au_f1

    parts = [p for rank_parts in _gather(parts, dd) for p in rank_parts]
    idx, probs, labels, keep = (torch.cat([p[i] for p in parts]) for i in range(4))
    table = ssm_data.au_frame_table(dataset, idx, probs, labels, keep)
    expected = ssm_data.labelled_frame_count(dataset)
    if len(table["keys"]) != expected:
        raise RuntimeError(f"the tuned AU F1 needs every labelled test frame (expected {expected} frames, got "
                           f"{len(table['keys'])})")
    res = release_tuned_au_f1(table["probs"], table["target"], table["segment_ids"])
    return {"name": "au_f1_tuned_release (optimistic)", "mean": float(res["mean"]),
            "per_au": [float(v) for v in res["per_au"].tolist()], "threshold": float(res["threshold"]),
            "vote_window": int(res["vote_window"]), "vote_count": int(res["vote_count"]),
            "frames": len(table["keys"]), "segments": int(table["segment_ids"].max()) + 1,
            "optimistic": True, "note": res["note"]}


@torch.no_grad()
def evaluate(core: SSMModel, loaders: dict[str, Any], device: torch.device, dd: Dist, args: argparse.Namespace,
             tuned_au: Any = None, among_unseen: bool = False) -> dict[str, Any]:
    """Test / validation metrics with facelayers' streaming meters (reduced over DDP ranks; each
    rank evaluates its own shard of the items). ``tuned_au``: the AU dataset behind ``loaders["au"]``
    to also report the release's tuned AU F1 over its frames (optimistic; beside F1@0.5).
    ``among_unseen`` (the test split under ``--unseen-classes``; validation has no unseen clip): also
    classify the unseen clips among the unseen classes only (``exp.among_unseen``)."""
    from facelayers.metrics import AUMeter, ExpressionMeter, seen_unseen_curve, uar, war

    amp = device.type == "cuda" and not args.no_amp
    core.eval()
    res: dict[str, Any] = {}
    cfg = core.cfg
    for task in ("exp", "au"):
        if task not in core.tasks or loaders.get(task) is None:
            continue
        meter = ExpressionMeter(len(cfg.expressions)) if task == "exp" else AUMeter(len(cfg.aus))
        frames: list[tuple[Tensor, ...]] | None = [] if task == "au" and tuned_au is not None else None
        # unseen-class setting: every clip's logits, for the unseen-only argmax and the seen-unseen curve
        unseen = ([list(cfg.expressions).index(n) for n in unseen_names(args)]
                  if task == "exp" and among_unseen and getattr(args, "unseen_classes", None) else [])
        exp_logits: list[tuple[Tensor, Tensor]] | None = [] if unseen else None
        for batch in loaders[task]:
            batch = to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = core(batch["clip"], None) if task == "exp" else core(None, batch["clip"])
            if task == "exp":
                meter.update(out["exp_logits"].float().softmax(-1), batch["label"])
                if exp_logits is not None:
                    exp_logits.append((out["exp_logits"].float().detach().cpu(), batch["label"].detach().cpu()))
            else:
                probs, labels, keep = _au_batch(out, batch)
                meter.update(probs, labels, keep)
                if frames is not None:
                    keep = keep if keep is not None else torch.ones(probs.shape[:-1], dtype=torch.bool)
                    frames.append(tuple(t.detach().cpu() for t in (batch["index"], probs, labels, keep)))
        m = meter.compute()
        if task == "exp":
            res["exp"] = {"uar": float(m["uar"]), "war": float(m["war"]),
                          "confusion_matrix": m["confusion_matrix"].tolist(), "n": int(m["num_samples"])}
            if exp_logits is not None:
                parts = [p for rank_parts in _gather(exp_logits, dd) for p in rank_parts]
                z, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).long()
                ids = torch.tensor(unseen)
                is_u = torch.isin(y, ids)  # the unseen clips, classified among the unseen classes only
                pred = ids[z[is_u][:, ids].argmax(1)]
                res["exp"]["among_unseen"] = {"uar": uar(pred, y[is_u], len(cfg.expressions)),
                                              "accuracy": war(pred, y[is_u]), "n": int(is_u.sum())}
                curve = seen_unseen_curve(z, y, unseen)
                res["exp"]["seen_unseen"] = {
                    "ausuc": curve["ausuc"], "seen_uar_at_0": curve["seen_uar_at_0"],
                    "unseen_uar_at_0": curve["unseen_uar_at_0"],
                    "unseen_uar": curve["unseen_uar"].tolist(), "seen_uar": curve["seen_uar"].tolist()}
            continue

        def per_au(values: Tensor) -> dict[str, float | None]:
            return {facs.au_label(a): (None if v != v else float(v)) for a, v in zip(cfg.aus, values.tolist())}

        res["au"] = {"f1_mean": float(m["f1"]), "f1_per_au": per_au(m["f1_per_au"]), "n": int(m["num_samples"])}
        if m["auc"] is not None:
            res["au"]["auc_mean"] = float(m["auc"])
            res["au"]["auc_per_au"] = per_au(m["auc_per_au"])
        if frames is not None:
            tuned = tuned_au_f1_release(tuned_au, frames, dd)
            tuned["per_au"] = per_au(torch.tensor(tuned["per_au"]))
            res["au"]["au_f1_tuned_release"] = tuned
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


def chance_levels(data: Any, cfg: ModelConfig) -> dict[str, float]:
    """Chance references on the test data: UAR of a constant/random guess = 1/K; AU F1 of
    predicting every AU active = mean over AUs of 2p/(1+p) (p = positive rate)."""
    res = {"uar": 1.0 / len(cfg.expressions)}
    rates = getattr(data, "au_test_positive_rate", None)
    if rates is not None:
        p = torch.as_tensor(rates, dtype=torch.float64)
        res["au_f1_all_positive"] = float((2 * p / (1 + p)).mean())
    return res


def summary_table(test: dict[str, Any], chance: dict[str, float], cfg: ModelConfig, seconds: float, *,
                  recipe: str = "paper", optimistic: bool = False) -> str:
    lines = []
    tuned = test.get("au", {}).get("au_f1_tuned_release")
    w = 28 if tuned is None else max(28, len(tuned["name"]) + 2)  # the default table is unchanged
    title = f"SSM reference | mode={cfg.mode}" + (f" task={cfg.tasks[0]}" if cfg.mode == "stl" else "") + \
        f" | backbone={cfg.backbone}" + (f" | recipe={recipe}" if recipe != "paper" else "") + f" | {seconds / 60:.1f} min"
    lines.append(title)
    lines.append("-" * max(len(title), 48))
    lines.append(f"{'metric':<{w}}{'test*' if optimistic else 'test':>10}{'chance':>10}")
    if "exp" in test:
        lines.append(f"{'expression UAR':<{w}}{100 * test['exp']['uar']:>10.2f}{100 * chance['uar']:>10.2f}")
        lines.append(f"{'expression WAR':<{w}}{100 * test['exp']['war']:>10.2f}{'':>10}")
    unseen = test.get("exp_unseen")
    if unseen is not None:
        def pct(v: float | None) -> str:
            return f"{100 * v:>10.2f}" if v is not None else f"{'n/a':>10}"

        k = len(cfg.expressions)
        lines.append(f"{'unseen-class UAR':<{w}}{pct(unseen['uar'])}{100 / k:>10.2f}")
        lines.append(f"{'unseen-class accuracy':<{w}}{pct(unseen['accuracy'])}{'':>10}")
        lines.append(f"{'seen-class UAR':<{w}}{pct(unseen['seen_uar'])}{100 / k:>10.2f}")
        if unseen.get("among_unseen_uar") is not None:
            lines.append(f"{'unseen UAR among unseen':<{w}}{pct(unseen['among_unseen_uar'])}"
                         f"{100 / len(unseen['classes']):>10.2f}")
        if unseen.get("ausuc") is not None:
            lines.append(f"{'AUSUC (seen-unseen curve)':<{w}}{pct(unseen['ausuc'])}{'':>10}")
    if "au" in test:
        ch = chance.get("au_f1_all_positive")
        lines.append(f"{'AU F1@0.5 (mean)':<{w}}{100 * test['au']['f1_mean']:>10.2f}"
                     + (f"{100 * ch:>10.2f}" if ch is not None else f"{'':>10}"))
        if tuned is not None:
            lines.append(f"{tuned['name']:<{w}}{100 * tuned['mean']:>10.2f}{'':>10}")
        if "auc_mean" in test["au"]:
            lines.append(f"{'AU AUC (mean)':<{w}}{100 * test['au']['auc_mean']:>10.2f}{50.0:>10.2f}")
        for k, v in test["au"]["f1_per_au"].items():
            lines.append(f"{'  F1 ' + k:<{w}}{('%10.2f' % (100 * v)) if v is not None else '       n/a'}")
    lines.append("(chance: UAR = 1/K; AU F1 = predicting every AU active; AUC = 50)")
    if unseen is not None:
        lines.append(f"unseen classes (no training clip): {', '.join(unseen['classes'])}"
                     + ("; 'among unseen': their clips classified among these classes only (zero-shot naming)"
                        if unseen.get("among_unseen_uar") is not None else ""))
    if tuned is not None:
        lines.append(f"{tuned['name']}: the released code's AU F1, threshold {tuned['threshold']:g} and vote "
                     f"(>= {tuned['vote_count']} of {2 * tuned['vote_window'] + 1} frames, within each of "
                     f"{tuned['segments']} segments) chosen on these test labels; not comparable with F1@0.5")
    if optimistic:
        lines.append("* OPTIMISTIC: the checkpoint was selected on the test split (--select-on test, the released "
                     "code's protocol)")
    return "\n".join(lines)


def write_plots(run: str, core: SSMModel, history: list[dict], test: dict[str, Any], maps_before: Any) -> list[str]:
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


class ExpertDroppingRouter(TaskTopKRouter):
    """Debug aid (``--debug-drop-expert``): a task top-k router that, for its ``dropper`` with
    ``drop=True``, never picks one private expert (top-k over the other experts, gates from the same
    softmax), and always counts the tokens each expert receives. Injected through
    ``inject_moe_(..., router_layer=...)``: nothing is patched."""

    def __init__(self, *args: Any, dropper: ExpertDropper, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropper = dropper

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        d, e = self.dropper, self.num_experts
        if not d.drop:
            top_p, top_i = super().select(probs)
        else:
            masked = probs.masked_fill(torch.arange(e, device=probs.device) == d.expert, -1.0)
            _, top_i = masked.topk(self.top_k, dim=-1)
            top_p = probs.gather(1, top_i)
            if self.renormalize:
                top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        d.counts += torch.bincount(top_i.reshape(-1).cpu(), minlength=e)  # debug only: a host sync per call
        return top_p, top_i


class ExpertDropper:
    """Debug aid: with ``drop=True`` every MoE router on this rank skips one private expert; always
    counts the tokens each expert receives. Pass :attr:`router_layer` to the model's builder, then
    :meth:`attach` the built model."""

    def __init__(self, expert: int, num_experts: int, drop: bool = True) -> None:
        if not 0 <= expert < num_experts:
            raise ValueError(f"--debug-drop-expert: expert must be in [0, {num_experts}), got {expert}")
        self.expert = expert
        self.drop = drop
        self.counts = torch.zeros(num_experts, dtype=torch.long)
        self.layers: list[nn.Module] = []
        self.initial: list[Tensor] = []

    @property
    def router_layer(self) -> Any:
        """Router factory for ``inject_moe_(..., router_layer=...)``."""
        return functools.partial(ExpertDroppingRouter, dropper=self)

    def attach(self, core: nn.Module) -> ExpertDropper:
        """Remember the model's MoE layers and the dropped expert's initial weights."""
        from facelayers.moe import iter_moe_layers

        self.layers = list(iter_moe_layers(core))
        if not self.layers:
            raise ValueError("--debug-drop-expert needs a model with MoE layers (mode baseline or ssm)")
        self.initial = [m.experts.w1[:, self.expert].detach().clone() for m in self.layers]
        return self


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
        moved = [float((m.experts.w1[:, dropper.expert].detach() - w0).abs().max()) for m, w0 in zip(dropper.layers, dropper.initial)]
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
    elif device.type == "cpu" and args.backbone in TINY_BACKBONES:
        torch.set_num_threads(1)
    elif dd.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dd.world))
    seed_everything(args.seed)

    # backbone first: it fixes the image size the data must be rendered at
    clip = build_backbone(args.backbone, args.pretrained, clip_kwargs=tiny_kwargs(args))
    if args.backbone not in TINY_BACKBONES and not args.pretrained and dd.main:
        print(f"warning: --backbone {args.backbone} without --pretrained: random init (pass a checkpoint file "
              "or an open_clip tag to reproduce the paper)", file=sys.stderr)
    img = clip.visual.image_size
    args.image_size = int(img[0] if isinstance(img, (tuple, list)) else img)
    t_data = time.time()
    data = transfer_data(build_data(args, dd), args)
    t_data = time.time() - t_data
    for task, held in data.notes.get("validation", {}).items():  # said, not silent: a small training set
        if held.get("note") and dd.main:
            print(f"note: {task}: {held['note']}", file=sys.stderr)
    cfg = model_config(args, data.expressions, data.aus)
    if args.unseen_classes and (args.unseen_loss or "seen") == "seen":  # the training softmax over seen classes
        unseen = set(unseen_names(args))
        args.exp_train_classes = [i for i, e in enumerate(cfg.expressions) if e not in unseen]
    seed_everything(args.seed)  # model init independent of how much randomness data building used
    if cfg.backbone in TINY_BACKBONES and cfg.clip_kwargs is None:
        cfg.clip_kwargs = copy.deepcopy(TINY_CLIP)
    cfg.image_size = args.image_size
    dropper = None
    if args.debug_drop_expert:  # a router that skips one expert on one rank (other ranks only count tokens)
        r, e = rank_expert_values(args.debug_drop_expert)
        dropper = ExpertDropper(e, cfg.num_experts, drop=r == dd.rank)
    release = args.recipe == "ssm_release"
    if release:
        core = build_release_core(args, clip, data).to(device)
        cfg = core.cfg
    else:
        core = assemble_model(cfg, clip, router_layer=dropper.router_layer if dropper else None).to(device)
    if args.router_noise is not None:
        from facelayers.models.ssm.release_recipe import set_router_noise_

        set_router_noise_(core, args.router_noise)  # drawn from torch's RNG, seeded by --seed
    if dropper is not None:
        dropper.attach(core)
    maps_before = None
    if core.mapping is not None and hasattr(core.mapping, "maps"):
        with torch.no_grad():
            maps_before = tuple(m.detach().float().cpu() for m in core.mapping.maps())
    if args.freeze_visual:  # the pretrained vision weights leave the optimizer (pretrained_and_new skips them)
        for prm in core.param_groups()["visual"]:
            prm.requires_grad_(False)
    recipe, pieces = None, None
    if release:
        from facelayers.models.ssm.release_recipe import ReleaseRecipe, ReleaseRecipeConfig

        recipe = ReleaseRecipe(core, ReleaseRecipeConfig(
            epochs=args.epochs, milestones=tuple(args.milestones), lr_gamma=args.gamma, lr_vision=args.lr_visual,
            lr_delta=args.lr_delta, lr_other=args.lr, weight_decay=args.weight_decay,
            grad_clip=args.clip_grad or None, ema_decay=args.ema_decay or None, mixup_alpha=args.mixup_alpha,
            loss_balance=args.loss_balance, router_noise=None), generator=torch.Generator().manual_seed(args.seed * 1000 + 17))
        optimizer, scheduler = recipe.optimizer, recipe.scheduler
    else:
        optimizer = build_optimizer(core, lr=args.lr, lr_visual=args.lr_visual, weight_decay=args.weight_decay)
        scheduler = build_scheduler(optimizer, milestones=args.milestones, gamma=args.gamma)
        pieces = RecipePieces(args, core, device, dd.rank)
        pieces = pieces if pieces.active else None
    averaged = (recipe.averaged if recipe is not None else pieces.averaged if pieces is not None
                else contextlib.nullcontext)

    run_dir = args.out
    ckpt = os.path.join(run_dir, "checkpoint")
    if dd.main:
        os.makedirs(ckpt, exist_ok=True)
    start_epoch, history, best = 0, [], {"score": -math.inf, "epoch": -1}
    if args.resume and os.path.isfile(os.path.join(ckpt, "trainer.json")):
        load_weights(core, ckpt, "last")
        meta = load_optimizer(optimizer, ckpt)
        if pieces is not None and pieces.ema is not None:
            from safetensors.torch import load_file as _load

            if not os.path.isfile(os.path.join(ckpt, "ema.safetensors")):
                raise FileNotFoundError(f"--resume: {ckpt} holds no EMA state (expected ema.safetensors from a run with "
                                 f"--ema-decay {args.ema_decay}, got none)")
            pieces.ema.load_state_dict(_load(os.path.join(ckpt, "ema.safetensors")))
            if pieces.mixup is not None:
                pieces.mixup.generator.set_state(_load(os.path.join(ckpt, "rng.safetensors"))["mixup"])
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
        capped = min(batch, max(1, int(len(ds) * frac) // dd.world))
        if capped < batch and dd.main:  # said, not silent: a few-shot or tiny training set
            print(f"note: --batch-{task} {batch} is larger than the {task} training set per process "
                  f"({int(len(ds) * frac) // dd.world} samples); batches of {capped} are used")
        batch = capped
        train_loaders[task], _ = make_train_loader(ds, batch, dd, args.seed, args.workers)
    pairs = make_pairs(train_loaders, args)
    eval_batch = max(args.batch_exp, args.batch_au)
    val_loaders = {t: make_eval_loader(data.val[t], eval_batch, dd, args.workers) for t in cfg.tasks}
    test_loaders = {t: make_eval_loader(data.test[t], eval_batch, dd, args.workers) for t in cfg.tasks}
    optimistic = args.select_on == "test"
    select_loaders = test_loaders if optimistic else val_loaders
    recipe_record = recipe_config(args, recipe, core)
    if dd.main:
        with open(os.path.join(run_dir, "recipe.json"), "w") as f:
            json.dump(recipe_record, f, indent=2)

    if dd.main:
        n_train = {t: len(data.train[t]) for t in cfg.tasks}
        n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)
        print(f"[ssm] mode={cfg.mode} tasks={cfg.tasks} backbone={cfg.backbone} frames={cfg.num_frames} "
              f"image={cfg.image_size} train={n_train} trainable={n_params / 1e6:.2f}M device={device} "
              f"world={dd.world} data_built_in={t_data:.1f}s out={run_dir}", file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        t_ep = time.time()
        lr_used = optimizer.param_groups[-1]["lr"]
        if recipe is not None:
            tr = train_one_epoch_release(core, pairs, recipe, args, device, dd, epoch)
            recipe.end_epoch()  # MultiStepLR
        else:
            tr = train_one_epoch(model, core, pairs, optimizer, args, device, dd, epoch, pieces)
            scheduler.step()
        t_ev = time.time()
        with averaged():  # EMA weights (when on) for selection and the best checkpoint, as the release
            val = evaluate(core, select_loaders, device, dd, args)
            tr["train_s"], tr["eval_s"] = t_ev - t_ep, time.time() - t_ev
            score = selection_score(val)
            improved = score > best["score"] or best["epoch"] < 0
            if improved and dd.main:
                save_best(core, ckpt, {"epoch": epoch + 1, args.select_on: val, "args": _args_json(args),
                                       "recipe": recipe_record})
        rec = {"epoch": epoch + 1, **{k: v for k, v in tr.items() if k not in ("steps", "train_s", "eval_s")},
               **flat_metrics(args.select_on, val),
               f"{args.select_on}/score": score, "lr": lr_used}
        history.append(rec)
        if improved:
            best = {"score": score, "epoch": epoch + 1}
        if dd.main:
            print("[ssm] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
                  + f" ({tr['steps']} steps {tr['train_s']:.0f}s, eval {tr['eval_s']:.0f}s)", file=sys.stderr)
            if recipe is None:  # --resume state (the release recipe does not resume)
                save_model(core, ckpt, {"epoch": epoch + 1, "args": _args_json(args)}, name="last")
            from safetensors.torch import save_file

            rng_state = {"torch": torch.get_rng_state()}
            if pieces is not None and pieces.mixup is not None:
                rng_state["mixup"] = pieces.mixup.generator.get_state()
            save_file(rng_state, os.path.join(ckpt, "rng.safetensors"))
            if pieces is not None and pieces.ema is not None:
                save_file(pieces.ema.state_dict(), os.path.join(ckpt, "ema.safetensors"))
            save_optimizer(optimizer, ckpt, {
                "epoch": epoch, "history": history, "best": best, "scheduler": scheduler.state_dict(),
                "rng": json.dumps(random.getstate()),
                "maps_before": [m.tolist() for m in maps_before] if maps_before is not None else None,
            })
        if dd.enabled:
            dist.barrier()

    replica_info = check_replicas(core, dd, dropper, run_dir) if (args.check_replicas and dd.enabled) else None

    # model selection: the best validation epoch; the test split is only touched here
    if os.path.isfile(os.path.join(ckpt, "best.safetensors")):
        load_best(core, ckpt)
    tuned_au = data.test.get("au") if args.tuned_au_f1 == "on" and "au" in cfg.tasks else None
    test = evaluate(core, test_loaders, device, dd, args, tuned_au=tuned_au, among_unseen=True)
    if args.unseen_classes and "exp" in test:
        test["exp_unseen"] = unseen_class_metrics(test["exp"]["confusion_matrix"], cfg.expressions, unseen_names(args))
        among = test["exp"].get("among_unseen")
        if among is not None:  # zero-shot naming: the unseen clips among the unseen classes only
            test["exp_unseen"].update(among_unseen_uar=among["uar"], among_unseen_accuracy=among["accuracy"],
                                      ausuc=test["exp"]["seen_unseen"]["ausuc"])
    if optimistic:  # every number of a test-selected checkpoint is optimistic
        for part in test.values():
            part["optimistic"] = True
    seconds = time.time() - t0
    chance = chance_levels(data, cfg)
    result = {
        "config": cfg.to_json(), "args": _args_json(args), "best_epoch": best["epoch"], "val_score": best["score"],
        "test": test, "chance": chance, "history": history, "seconds": seconds, "world_size": dd.world,
        "selection": {"split": args.select_on, "optimistic": optimistic},
    }
    if recipe_record["recipe"] != "paper" or pieces is not None or optimistic:
        result["recipe"] = recipe_record
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
        table = summary_table(test, chance, cfg, seconds, recipe=args.recipe, optimistic=optimistic)
        with open(os.path.join(run_dir, "summary.txt"), "w") as f:
            f.write(table + "\n")
        print(table)
    if dd.enabled:
        dist.barrier()
    return result


def recipe_config(args: argparse.Namespace, recipe: Any, core: nn.Module) -> dict[str, Any]:
    """Every training-recipe option in force (written to ``recipe.json`` and ``metrics.json``)."""
    rec: dict[str, Any] = {
        "recipe": args.recipe, "ema_decay": args.ema_decay, "mixup_alpha": args.mixup_alpha,
        "mixup_seed": args.seed * 1000 + 17 if args.mixup_alpha > 0 else None, "loss_balance": args.loss_balance,
        "router_noise": args.router_noise, "router_noise_seed": args.seed, "select_on": args.select_on,
        "selection_optimistic": args.select_on == "test", "au_select": args.au_select,
        "data": data_choices(args), "tuned_au_f1": args.tuned_au_f1,
    }
    if recipe is not None:
        rec["release_recipe"] = recipe.describe()
        rec["release_architecture"] = core.release.to_json()
        rec["not_reproduced"] = [
            "the release's per-dataset augmentation magnitudes (expression: crop scale 0.08-1 and ratio 3/4-4/3, "
            "FERV39K rotation 4 deg, DFEW-only brightness jitter; AU: Resize 256 before the crop, no colour jitter); "
            "here real data has one training preset for both tasks (crop 0.8-1.0 / 0.9-1.1, flip, brightness 0.5), "
            "synthetic data flip + normalisation",
            "the release's NumPy / Python RNG streams (same distributions, other draws)"]
    return rec


def data_choices(args: argparse.Namespace) -> dict[str, Any]:
    """The data options in force (recorded in ``recipe.json``)."""
    from facelayers.data import CLIP_MEAN, CLIP_STD

    synthetic = args.data == "synthetic"
    return {
        "au_train_windows": args.au_train_windows, "exp_sampling": args.exp_sampling,
        "exp_sampling_applies": not synthetic,  # synthetic clips are rendered with exactly T frames
        "random_erasing_p": 0.0 if synthetic else args.erase_p,  # the synthetic train transform never erases
        "normalisation": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "eval_covers_every_au_frame": True,
    }


def save_best(core: nn.Module, ckpt: str, extra: dict[str, Any]) -> None:
    """The selected checkpoint (the release preset in its own format)."""
    from facelayers.models.ssm.release import ReleaseSSMModel, save_release_model

    if isinstance(core, ReleaseSSMModel):
        save_release_model(core, ckpt, name="best", extra=extra)
    else:
        save_model(core, ckpt, extra, name="best")


def load_best(core: nn.Module, ckpt: str) -> None:
    from facelayers.models.ssm.release import ReleaseSSMModel

    if isinstance(core, ReleaseSSMModel):
        from facelayers.io import load_module

        load_module(core, os.path.join(ckpt, "best.safetensors"), device=str(next(core.parameters()).device))
    else:
        load_weights(core, ckpt, "best")


def _args_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def check_transfer_args(args: argparse.Namespace) -> None:
    """The transfer settings' checks (``--exp-shots``, ``--unseen-classes``, ``--freeze-visual``),
    before the backbone-dependent defaults are filled. A class with fewer than ``--exp-shots``
    training clips is found when the data is built (still before the model), also exit code 2."""
    err = cli.UsageError
    exp_task = args.mode != "stl" or args.task == "exp"
    for name, on in (("exp-shots", args.exp_shots is not None), ("unseen-classes", args.unseen_classes is not None)):
        if on and not exp_task:
            raise err(f"--{name}: changes the expression training data (expected an expression task, got --mode stl "
                      "--task au)")
    if args.exp_shots is not None and args.exp_fraction < 1.0:
        raise err(f"--exp-shots: sets the expression training data itself (expected no --exp-fraction with it, got "
                  f"--exp-fraction {args.exp_fraction:g})")
    if args.unseen_classes is not None:
        vocabulary = facs.EXPRESSIONS_11 if args.exp_dataset == "mafw" else facs.EXPRESSIONS_7
        try:
            ssm_data.unseen_class_ids(vocabulary, unseen_names(args))
        except ValueError as e:
            raise err(f"--unseen-classes: {str(e).removeprefix('unseen classes: ')} (--exp-dataset "
                      f"{args.exp_dataset})") from None
    if args.unseen_loss is not None and args.unseen_classes is None:
        raise err(f"--unseen-loss: chooses the training softmax of the unseen-class setting (expected "
                  f"--unseen-classes with it, got --unseen-loss {args.unseen_loss} alone)")
    if args.unseen_classes is not None and args.recipe == "ssm_release":
        raise err("--unseen-classes: the release recipe's losses always run over every class (expected --recipe "
                  "paper, got --recipe ssm_release)")
    if args.freeze_visual:
        if args.lr_visual is not None:
            raise err(f"--freeze-visual: the vision weights do not train (expected no --lr-visual with it, got "
                      f"--lr-visual {args.lr_visual:g})")
        if args.recipe == "ssm_release":
            raise err("--freeze-visual: the release recipe trains its vision tower (expected --recipe paper, got "
                      "--recipe ssm_release)")


#: largest ``--frames`` (T) and ``--synthetic-size`` accepted (larger: a typo, and out of memory)
MAX_FRAMES = 256
MAX_SYNTHETIC_SIZE = 64.0


def check_option_effects(args: argparse.Namespace) -> None:
    """Options the user set (value differs from the parser's default) that would have no effect
    with the other options are errors, not silently ignored; so are a test manifest that is the
    training manifest, an expression clip folder holding fewer frames than its manifest line says
    (``check_frame_counts``), and ``--frames`` / ``--synthetic-size`` out of bounds (issue 15).

    Raises:
        cli.UsageError: ``--<option>: has no effect with ... (expected ..., got ...)``.
    """
    err = cli.UsageError
    parser = build_parser()

    def given(*names: str) -> list[str]:
        return [n for n in names if getattr(args, n) != parser.get_default(n)]

    def refuse(names: list[str], why: str, expected: str, got: str) -> None:
        if names:
            raise err(f"--{names[0].replace('_', '-')}: has no effect {why} (expected {expected}, got {got})")

    if args.mode != "stl":
        refuse(given("task"), f"with --mode {args.mode}", "--mode stl", f"--mode {args.mode}")
    text = ("no_dpm", "mapping", "alpha", "beta", "dpm_init", "no_dual", "freeze_dpm", "dpm_variant", "prior_source",
            "n_ctx", "desc_style")
    dpm_only = ("dpm_init", "no_dual", "freeze_dpm", "dpm_variant", "prior_source")
    if args.mode != "ssm":
        refuse(given("no_tsp", *text), f"with --mode {args.mode}", "--mode ssm", f"--mode {args.mode}")
    elif args.no_tsp:
        refuse(given(*text), "with --no-tsp (linear heads, no text side)", "no --no-tsp", "--no-tsp")
    elif args.no_dpm:
        refuse(given("mapping", "alpha", "beta", *dpm_only), "with --no-dpm (no mapping)", "no --no-dpm", "--no-dpm")
    elif args.mapping != "dpm":
        refuse(given(*dpm_only), f"with --mapping {args.mapping}", "--mapping dpm", f"--mapping {args.mapping}")
    if args.mode == "stl":
        refuse(given("num_experts", "top_k", "moe_blocks", "moe_hidden", "moe_backend", "router_noise", "vision_passes"),
               "with --mode stl (no MoE, one task)", "--mode baseline or ssm", "--mode stl")
        other = "au" if args.task == "exp" else "exp"
        refuse(given(*(("au_fraction", "batch_au", "au_select", "au_dataset", "au_root", "au_manifest",
                        "au_test_manifest", "au_train_windows") if other == "au" else
                       ("exp_fraction", "batch_exp", "exp_dataset", "exp_root", "exp_manifest", "exp_test_manifest",
                        "exp_sampling"))),
               f"with --mode stl --task {args.task} (no {other} task)", f"an {other} task",
               f"--mode stl --task {args.task}")
    if args.data == "synthetic":
        refuse(given("au_root", "au_manifest", "au_test_manifest", "exp_root", "exp_manifest", "exp_test_manifest"),
               "with --data synthetic", "--data real", "--data synthetic")
    else:
        refuse(given("synthetic_size", "synthetic_balance", "synthetic_nuisance", "fold"),
               "with --data real (the manifests name the split)", "--data synthetic", "--data real")
        for train, test in (("exp_manifest", "exp_test_manifest"), ("au_manifest", "au_test_manifest")):
            a, b = getattr(args, train), getattr(args, test)
            if a and b and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
                raise err(f"--{test.replace('_', '-')}: the training manifest too, the test set would be trained on "
                          f"(expected a separate test manifest, got {b} for --{train.replace('_', '-')} and "
                          f"--{test.replace('_', '-')})")
        if (args.mode != "stl" or args.task == "exp") and args.exp_root:
            from facelayers.data import read_manifest
            from facelayers.data.datasets import FrameCountMismatchError, check_frame_counts

            for manifest in (args.exp_manifest, args.exp_test_manifest):  # a clip folder short of frames
                if manifest and os.path.isfile(manifest):
                    try:
                        check_frame_counts(read_manifest(manifest, args.exp_dataset), args.exp_root, manifest=manifest)
                    except FrameCountMismatchError as e:
                        raise err(str(e)) from None
    if args.frames is not None and args.frames > MAX_FRAMES:
        raise err(f"--frames: too many frames per clip (expected 1..{MAX_FRAMES}, got {args.frames})")
    if args.data == "synthetic":
        size = args.synthetic_size
        if size > MAX_SYNTHETIC_SIZE:
            raise err(f"--synthetic-size: too large for memory (expected at most {MAX_SYNTHETIC_SIZE:g}, got {size:g})")
        base = ssm_data.SYNTHETIC_QUICK if args.quick else ssm_data.SYNTHETIC_DEFAULT
        tasks = (args.task,) if args.mode == "stl" else ("exp", "au")
        n_classes = len(facs.EXPRESSIONS_11 if args.exp_dataset == "mafw" else facs.EXPRESSIONS_7)
        for task, key, least, what in (("exp", "exp_clips", 5 * n_classes, f"{5 * n_classes} expression clips (5 folds x "
                                        f"{n_classes} classes)"), ("au", "au_subjects", 5, "5 AU subjects (3 folds + 2)")):
            if task in tasks and size != 1.0 and round(base[key] * size) < least:
                raise err(f"--synthetic-size: too small for {'--quick' if args.quick else 'the benchmark'} (expected a "
                          f"size giving at least {what}, i.e. >= {least / base[key]:.3g}, got {size:g}: "
                          f"{round(base[key] * size)})")


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every check that needs more than one argument, before any data or model is built (single
    values are checked by the parser's ``type=`` functions); fills the backbone-dependent defaults.

    Raises:
        cli.UsageError: ``--<option>: <what> (expected ..., got ...)``.
    """
    import open_clip

    err = cli.UsageError
    ocfg: dict[str, Any] = {}
    resolve_backbone(args)
    if args.backbone in TINY_BACKBONES:
        if args.pretrained:
            raise err(f"--pretrained: the {args.backbone} backbone brings its own initialisation (expected no "
                      f"--pretrained, or --backbone ViT-B-16, got {args.pretrained!r})")
        if args.backbone == "tiny-facs" and args.tiny:
            raise err(f"--tiny: the tiny-facs backbone has the default tiny shape (expected no --tiny, or --backbone "
                      f"tiny, got --tiny {args.tiny})")
        clip_kw = tiny_kwargs(args) or TINY_CLIP
        width, layers = clip_kw["embed_dim"], clip_kw["vision_cfg"]["layers"]
    else:
        if args.tiny:
            raise err(f"--tiny: shapes the tiny backbone only (expected --backbone tiny, got --backbone {args.backbone})")
        if args.backbone not in open_clip.list_models():
            raise err(f"--backbone: unknown model (expected 'tiny', 'tiny-facs' or an open_clip name such as 'ViT-B-16', got "
                      f"{args.backbone!r})")
        p = args.pretrained
        if not p or os.path.isfile(p):
            pass
        elif os.sep in p or p.endswith((".pt", ".bin", ".pth", ".safetensors")):
            raise err(f"--pretrained: weights file not found (expected an existing checkpoint file or an open_clip "
                      f"tag such as 'openai', got {p!r})")
        elif p not in open_clip.list_pretrained_tags_by_model(args.backbone):
            tags = open_clip.list_pretrained_tags_by_model(args.backbone)
            raise err(f"--pretrained: unknown tag for {args.backbone} (expected a checkpoint file or one of {tags}, "
                      f"got {p!r})")
        ocfg = open_clip.get_model_config(args.backbone) or {}
        width, layers = ocfg.get("embed_dim"), ocfg.get("vision_cfg", {}).get("layers")
    if args.data == "synthetic":  # options of the real-data loaders only (not silently ignored)
        for name, what in (("erase_p", "the synthetic training transform has no random erasing"),
                           ("exp_sampling", "synthetic expression clips are rendered with exactly --frames frames")):
            if getattr(args, name) is not None:
                raise err(f"--{name.replace('_', '-')}: {what} (expected --data real, got --data synthetic)")
    check_transfer_args(args)
    check_option_effects(args)
    args = resolve_defaults(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise err(f"--out: expected a folder (new or existing), got the file {args.out!r}")
    if args.mode == "stl" and args.debug_drop_expert:
        raise err("--debug-drop-expert: needs MoE layers (expected --mode baseline or ssm, got --mode stl)")
    if args.top_k > args.num_experts:
        raise err(f"--top-k: cannot exceed --num-experts (expected <= {args.num_experts}, got {args.top_k})")
    if args.debug_drop_expert:
        r, e = rank_expert_values(args.debug_drop_expert)
        if e >= args.num_experts:
            raise err(f"--debug-drop-expert: expert out of range (expected 0..{args.num_experts - 1}, got {e})")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if r >= world:
            raise err(f"--debug-drop-expert: rank out of range (expected 0..{world - 1}, got {r})")
    if width is not None and width % args.temporal_heads:
        raise err(f"--temporal-heads: must divide the feature width {width} (expected a divisor of {width}, got "
                  f"{args.temporal_heads})")
    if layers is not None and args.mode != "stl":
        from facelayers.models.ssm import moe_block_indices

        try:
            blocks = moe_block_indices(args.moe_blocks, layers)
        except (ValueError, TypeError) as e:
            raise err(f"--moe-blocks: {e}") from None
        if args.debug_drop_expert and not blocks:
            raise err(f"--debug-drop-expert: needs MoE layers (expected --moe-blocks naming at least one block, "
                      f"got {args.moe_blocks!r})")
    if args.recipe == "ssm_release":
        if args.mode != "ssm":
            raise err(f"--recipe ssm_release: trains the release's SSM (expected --mode ssm, got --mode {args.mode})")
        if args.au_select != "all":
            raise err("--au-select: the release supervises every frame (expected all with --recipe ssm_release, got "
                      f"{args.au_select})")
        if args.frames % 2:
            raise err(f"--frames: the release smooths AU logits over frame pairs (expected an even number, got {args.frames})")
        if args.resume:
            raise err("--resume: not available with --recipe ssm_release (expected a fresh run, got --resume)")
        if args.debug_drop_expert:
            raise err("--debug-drop-expert: a DDP diagnostic (expected no --debug-drop-expert with --recipe ssm_release)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise err("--recipe ssm_release: runs in one process (expected no torchrun, got WORLD_SIZE="
                      f"{os.environ.get('WORLD_SIZE')})")
        for name in ("no_tsp", "no_dpm", "no_dual", "freeze_dpm"):
            if getattr(args, name):
                raise err(f"--{name.replace('_', '-')}: the release model has TSP and a dual learnable DPM (expected "
                          f"no --{name.replace('_', '-')} with --recipe ssm_release)")
    elif args.recipe == "paper" and args.lr_delta != 1e-2:
        raise err("--lr-delta: only the release recipe has a delta-map group (expected --recipe ssm_release, got "
                  "--recipe paper)")
    if args.tuned_au_f1 == "on" and args.mode == "stl" and args.task == "exp":
        raise err("--tuned-au-f1: an AU metric (expected an AU task, got --mode stl --task exp)")
    if args.mixup_alpha > 0 and args.mode == "stl" and args.task == "exp":
        raise err("--mixup-alpha: mixes AU clips only (expected an AU task, got --mode stl --task exp)")
    if sorted(set(args.milestones)) != list(args.milestones):
        raise err(f"--milestones: expected increasing distinct epochs, got {args.milestones}")
    if args.dpm_variant == "ssm_release":
        for name in ("alpha", "beta"):
            v = getattr(args, name)
            if not 0.0 < v < 1.0:
                raise err(f"--{name}: the ssm_release DPM gates it with a sigmoid (expected 0 < {name} < 1, got {v})")
    if args.data == "synthetic":
        n_folds = 5 if args.mode == "stl" and args.task == "exp" else 3  # expression: 5 folds, AU: 3
        if args.fold > n_folds:
            raise err(f"--fold: the synthetic benchmark has folds 1..{n_folds} (expected <= {n_folds}, got {args.fold})")
    else:
        tasks = (args.task,) if args.mode == "stl" else ("exp", "au")
        need = []
        if "au" in tasks:
            need += ["au_root", "au_manifest", "au_test_manifest"]
        if "exp" in tasks:
            need += ["exp_root", "exp_manifest", "exp_test_manifest"]
        missing = ["--" + n.replace("_", "-") for n in need if not getattr(args, n)]
        if missing:
            raise err(f"--data real: missing options (expected {', '.join(missing)}, got none; see docs/reference.md)")
    expressions = facs.EXPRESSIONS_11 if args.exp_dataset == "mafw" else facs.EXPRESSIONS_7
    cfg = model_config(args, expressions, facs.BP4D_AUS if args.au_dataset == "bp4d" else facs.DISFA_AUS)
    try:
        cfg.validate()
    except ValueError as e:
        raise err(f"invalid model options: {e}") from None
    if cfg.uses_text:  # every prompt (context tokens + description + start/end) must fit the text context
        from open_clip.tokenizer import SimpleTokenizer

        from facelayers.models.ssm import descriptions_for

        context = (clip_kw if args.backbone in TINY_BACKBONES else ocfg).get("text_cfg", {}).get("context_length", 77)
        tok = SimpleTokenizer()
        longest = max(len(tok.encode(d)) for d in sum(descriptions_for(cfg), []))
        if args.n_ctx + longest + 2 > context:
            raise err(f"--n-ctx: prompts too long for the text context of {context} tokens (expected n_ctx <= "
                      f"{context - longest - 2} with descriptions of up to {longest} tokens, got {args.n_ctx})")
    ckpt = os.path.join(args.out, "checkpoint")
    if args.resume and not os.path.isfile(os.path.join(ckpt, "trainer.json")):
        print(f"note: --resume: no checkpoint in {ckpt} yet (no trainer.json): starting a fresh run", file=sys.stderr)
    if args.resume and os.path.isfile(os.path.join(ckpt, "trainer.json")):
        from facelayers.io import read_json
        from facelayers.models.ssm import verify_checkpoint

        ck_cfg, _, _ = verify_checkpoint(ckpt, "last")  # CheckpointError naming the file: a bad argument
        read_json(os.path.join(ckpt, "trainer.json"))
        if cfg.clip_kwargs is None and args.backbone in TINY_BACKBONES:
            cfg.clip_kwargs = copy.deepcopy(TINY_CLIP)
        img = (cfg.clip_kwargs or ocfg).get("vision_cfg", {}).get("image_size", ck_cfg.image_size)
        cfg.image_size = int(img[0] if isinstance(img, (tuple, list)) else img)
        from facelayers.models.ssm import EXECUTION_FIELDS

        mine, theirs = cfg.to_json(), ck_cfg.to_json()
        for k in sorted(mine):
            if k not in EXECUTION_FIELDS and mine[k] != theirs.get(k):
                raise err(f"--resume: {ckpt} was trained with other options ({k}: expected {theirs.get(k)!r} as "
                          f"in the checkpoint, got {mine[k]!r})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``error: ...`` + exit code 2 for every user error (``--debug``: traceback)."""
    def _main(a: list[str]) -> int:
        args = validate_args(build_parser().parse_args(a))
        try:
            run(args)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        return 0

    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
