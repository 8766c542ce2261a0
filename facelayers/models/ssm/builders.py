"""Builders of the reference SSM (torchtune ``_component_builders`` style): small functions, each
building one part from a :class:`~facelayers.models.ssm.ModelConfig`, and :func:`build_model`
that injects the parts into :class:`~facelayers.models.ssm.SSMModel`::

    clip = build_backbone(cfg.backbone, pretrained, clip_kwargs=cfg.clip_kwargs)   # open_clip CLIP
    visual = build_vision_encoder(clip, cfg)            # MoE FFNs injected into clip.visual
    text = build_text_side(clip, cfg)                   # TSP on the frozen text tower (or None)
    mapping = build_mapping(cfg)                        # DPM / Table VII sibling (or None)
    exp_temporal, au_temporal = build_temporal_heads(cfg, dim)
    exp_head, au_head = build_heads(cfg, dim)
    model = SSMModel(visual, exp_temporal, au_temporal, exp_head, au_head, text=text, mapping=mapping, config=cfg)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any
import torch
from torch import nn

from facelayers import facs
from facelayers.params import optimizer_param_groups

from .config import TINY_CLIP, ModelConfig
from .model import SSMModel

__all__ = [
    "BackboneUnavailableError",
    "build_backbone",
    "build_vision_encoder",
    "build_text_side",
    "build_mapping",
    "build_temporal_heads",
    "build_heads",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_vision_blocks_",
    "moe_hidden_default",
    "moe_block_indices",
    "vision_width",
    "vision_layers",
    "descriptions_for",
]


class BackboneUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (missing file, no network)."""


# ----------------------------------------------------------------------------------------------
# backbone and vision encoder
# ----------------------------------------------------------------------------------------------


def build_backbone(name: str = "tiny", pretrained: str | None = None, *, clip_kwargs: dict | None = None) -> nn.Module:
    """An open_clip ``CLIP`` model (vision + text towers).

    Args:
        name: ``"tiny"`` (random init, :data:`~facelayers.models.ssm.TINY_CLIP` or ``clip_kwargs``),
            ``"tiny-facs"`` (the same architecture pretrained on synthetic FACS captions, shipped with the
            package: :func:`facelayers.assets.load_tiny_facs_clip`) or an open_clip model name such as
            ``"ViT-B-16"``.
        pretrained: a local checkpoint file, an open_clip pretrained tag (needs network or a
            filled cache), or ``None`` for random init.
        clip_kwargs: ``open_clip.CLIP`` kwargs for ``"tiny"``.

    Raises:
        BackboneUnavailableError: weights were requested and cannot be loaded, or the name is unknown.
    """
    import open_clip

    if name == "tiny-facs":
        # the default tiny architecture, contrastively pretrained on synthetic FACS captions (shipped in
        # facelayers/assets, no download; docs/zeroshot.md has its recipe and hash)
        if pretrained:
            raise BackboneUnavailableError("the tiny-facs backbone ships its own weights (expected no --pretrained, "
                                           f"got {pretrained!r})")
        if clip_kwargs is not None and clip_kwargs != TINY_CLIP:
            raise BackboneUnavailableError("the tiny-facs backbone has the default tiny shape (expected no --tiny "
                                           f"shape, got {clip_kwargs})")
        from facelayers.assets import load_tiny_facs_clip

        return load_tiny_facs_clip().train()
    if pretrained is not None and not str(pretrained).strip():  # '' would silently mean "random init"
        raise BackboneUnavailableError("empty pretrained weights name (expected a checkpoint file, an open_clip tag "
                                       f"or None for random init, got {pretrained!r})")
    if name == "tiny":
        if pretrained:
            raise BackboneUnavailableError("the tiny backbone is random-init only; drop --pretrained or pick --backbone ViT-B-16")
        return open_clip.CLIP(**copy.deepcopy(clip_kwargs or TINY_CLIP))
    if name not in open_clip.list_models():
        raise BackboneUnavailableError(f"unknown open_clip model {name!r} (expected 'tiny' or an open_clip name "
                                       "such as 'ViT-B-16', 'ViT-B-32', 'ViT-L-14')")
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))):
        if not os.path.isfile(pretrained):
            raise BackboneUnavailableError(f"pretrained weights file not found: {pretrained}")
    try:
        return open_clip.create_model(name, pretrained=pretrained or None)
    except Exception as err:  # network errors, bad tags, corrupt files: all mean "no weights"
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BackboneUnavailableError(
            f"could not load weights {pretrained!r} for {name}: {msg}. Pass a local checkpoint with "
            "--pretrained /path/to/open_clip_pytorch_model.bin (or an OpenAI .pt), or run with network access."
        ) from err


def moe_hidden_default(width: int) -> int:
    """MoE private-expert hidden size: the paper's 512 for width 768, i.e. 2/3 of the width."""
    return max(8, int(round(width * 2 / 3)))


def vision_width(clip: nn.Module) -> int:
    """Width of an open_clip vision tower (``clip`` or ``clip.visual``)."""
    visual = getattr(clip, "visual", clip)
    return int(visual.conv1.out_channels)


def vision_layers(clip: nn.Module) -> int:
    """Number of transformer blocks of an open_clip vision tower (``clip`` or ``clip.visual``)."""
    visual = getattr(clip, "visual", clip)
    return len(visual.transformer.resblocks)


def moe_block_indices(spec: str, n_layers: int) -> list[int]:
    """The ``moe_blocks`` config string -> block indices, with the library's block-spec parser
    (:func:`facelayers.moe.hosts.select_blocks`): ``"all"``, ``"last:N"``, ``"0,3,5"`` (negative
    indices count from the end), or ``"none"`` / ``""`` for no block.

    Raises:
        ValueError: a malformed spec or an index / count out of range for ``n_layers`` blocks.
    """
    from facelayers.moe.hosts import select_blocks

    spec = str(spec).strip()
    if spec in ("none", ""):
        return []
    if spec == "all" or spec.startswith("last:"):
        return select_blocks(spec, n_layers, default="all")
    try:
        idx = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"moe_blocks must be 'all', 'last:N', 'none' or comma-separated block indices "
                         f"(expected e.g. 'last:6' or '0,3', got {spec!r})") from None
    return select_blocks(idx, n_layers, default="all")


def checkpoint_vision_blocks_(visual: nn.Module, *, enable: bool = True) -> list[str]:
    """Routing-safe activation checkpointing of every block of a vision tower, in place; returns the
    names of the blocks changed (:func:`facelayers.moe.checkpoint_moe_blocks_`: the recomputation in
    backward routes every token as its forward did)."""
    from facelayers.moe import checkpoint_moe_blocks_

    return checkpoint_moe_blocks_(visual, enable=enable)


def build_vision_encoder(clip: nn.Module, cfg: ModelConfig, *, router_layer: Any = None) -> nn.Module:
    """``clip.visual`` with MoE FFNs injected in ``cfg.moe_blocks`` (in place) and, with
    ``cfg.grad_checkpoint``, routing-safe activation checkpointing; returns it.

    Args:
        clip: open_clip ``CLIP``.
        cfg: the config.
        router_layer: the MoE router (class, factory or ``None`` for
            :class:`facelayers.moe.TaskTopKRouter`), passed to :func:`facelayers.moe.inject_moe_`.
    """
    visual = clip.visual
    if cfg.moe:
        blocks = moe_block_indices(cfg.moe_blocks, vision_layers(visual))
        if blocks:
            from facelayers.moe import inject_moe_

            hidden = cfg.moe_hidden or moe_hidden_default(vision_width(visual))
            kw = {} if router_layer is None else {"router_layer": router_layer}
            inject_moe_(clip.visual, blocks=blocks, num_experts=cfg.num_experts, hidden_dim=hidden, top_k=cfg.top_k,
                        num_tasks=len(cfg.tasks), backend=cfg.moe_backend, **kw)
    if cfg.grad_checkpoint:
        checkpoint_vision_blocks_(visual, enable=True)
    return visual


# ----------------------------------------------------------------------------------------------
# text side
# ----------------------------------------------------------------------------------------------


def descriptions_for(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(expression descriptions, AU descriptions) for the configured style."""
    exp_desc = facs.expression_descriptions(cfg.expressions, style=cfg.desc_style)
    au_desc = facs.au_descriptions(cfg.aus)
    return exp_desc, au_desc


def build_text_side(clip: nn.Module, cfg: ModelConfig) -> nn.Module | None:
    """TSP: one frozen text tower shared by the expression and AU prompt learners (``None``
    unless ``cfg.uses_text``)."""
    if not cfg.uses_text:
        return None
    from facelayers.prompts import CLIPTextTower, TextPrototypes

    tower = CLIPTextTower.from_open_clip(clip)
    return TextPrototypes(tower, cfg.aus, cfg.expressions, style=cfg.desc_style, n_ctx=cfg.n_ctx,
                          cache_in_eval=cfg.cache_in_eval)


def build_mapping(cfg: ModelConfig, dim: int | None = None) -> nn.Module | None:
    """DPM (or a Table VII sibling) between ``T_exp [K, D]`` and ``T_au [M, D]``, or ``None``
    unless ``cfg.uses_mapping``. The DPM comes from the vocabularies through ``from_facs``: the
    paper's :class:`~facelayers.prior_mapping.DynamicPriorMapping`, or for ``dpm_variant="ssm_release"``
    :class:`~facelayers.prior_mapping.ReleasePriorMapping`, which keeps the neutral row fixed at the
    prior as the released code does.
    ``dim`` is unused (the mappings act on the vocabulary axis); kept for symmetry."""
    if not cfg.uses_mapping:
        return None
    from facelayers import prior_mapping as pm

    if cfg.mapping == "dpm":
        common = dict(alpha=cfg.alpha, beta=cfg.beta, learnable=not cfg.freeze_dpm, dual=cfg.dual, init=cfg.dpm_init)
        if cfg.dpm_variant == "ssm_release":  # anchor + deltas, sigmoid gates, neutral row fixed (released code)
            return pm.ReleasePriorMapping.from_facs(cfg.expressions, cfg.aus, source=cfg.prior_source or "ssm_release",
                                                    **common)
        return pm.DynamicPriorMapping.from_facs(cfg.expressions, cfg.aus, source=cfg.prior_source, tau=cfg.dpm_tau,
                                                **common)
    if cfg.mapping == "linear":
        return pm.LinearSemanticMapping(len(cfg.expressions), len(cfg.aus), alpha=cfg.alpha, beta=cfg.beta)
    return pm.MLPSemanticMapping(len(cfg.expressions), len(cfg.aus), alpha=cfg.alpha, beta=cfg.beta)


# ----------------------------------------------------------------------------------------------
# temporal heads and classifier heads
# ----------------------------------------------------------------------------------------------


def build_temporal_heads(cfg: ModelConfig, dim: int) -> tuple[nn.Module | None, nn.Module | None]:
    """``(ClipTemporalHead | None, FrameTemporalHead | None)`` for the configured tasks
    (``max_frames = max(num_frames, 16)``)."""
    from facelayers.temporal import ClipTemporalHead, FrameTemporalHead

    kw = dict(heads=cfg.temporal_heads, depth=cfg.temporal_depth, max_frames=max(cfg.num_frames, 16))
    exp_temporal = ClipTemporalHead(dim, pool="cls", **kw) if "exp" in cfg.tasks else None
    au_temporal = FrameTemporalHead(dim, select=cfg.au_select, **kw) if "au" in cfg.tasks else None
    return exp_temporal, au_temporal


def build_heads(cfg: ModelConfig, dim: int) -> tuple[nn.Module | None, nn.Module | None]:
    """``(exp_head, au_head)``: cosine heads against the text prototypes with TSP, linear heads
    ``D -> K`` / ``D -> M`` otherwise; ``None`` for a task the config does not train."""
    if cfg.uses_text:
        from facelayers.heads import CosineClassifier

        return (CosineClassifier(tau=cfg.tau) if "exp" in cfg.tasks else None,
                CosineClassifier(tau=cfg.tau) if "au" in cfg.tasks else None)
    return (nn.Linear(dim, len(cfg.expressions)) if "exp" in cfg.tasks else None,
            nn.Linear(dim, len(cfg.aus)) if "au" in cfg.tasks else None)


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, *, pretrained: str | None = None, clip: nn.Module | None = None) -> SSMModel:
    """Assemble :class:`SSMModel` from a config (building the backbone unless ``clip`` is given).

    Fills ``cfg.image_size`` from the backbone and ``cfg.clip_kwargs`` for the default tiny CLIP.
    Parts are built in a fixed order (vision MoE, text, mapping, temporal heads, heads) so a seed
    gives the same initial weights every time.
    """
    cfg.validate()
    if clip is None:
        clip = build_backbone(cfg.backbone, pretrained, clip_kwargs=cfg.clip_kwargs)
    if cfg.backbone in ("tiny", "tiny-facs") and cfg.clip_kwargs is None:
        cfg.clip_kwargs = copy.deepcopy(TINY_CLIP)
    img = clip.visual.image_size
    cfg.image_size = int(img[0] if isinstance(img, (tuple, list)) else img)
    visual = build_vision_encoder(clip, cfg)
    text = build_text_side(clip, cfg)
    dim = int(visual.output_dim)
    mapping = build_mapping(cfg, dim)
    exp_temporal, au_temporal = build_temporal_heads(cfg, dim)
    exp_head, au_head = build_heads(cfg, dim)
    return SSMModel(visual, exp_temporal, au_temporal, exp_head, au_head, text=text, mapping=mapping, config=cfg)


# ----------------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------------


def build_optimizer(model: SSMModel, *, lr: float, lr_visual: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with two groups: the pretrained vision weights (``lr_visual``, group ``"visual"``) and
    everything new (``lr``, group ``"new"``); see :meth:`SSMModel.param_groups`."""
    groups = optimizer_param_groups(model.param_groups(), {"visual": lr_visual, "new": lr})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, *, milestones: Sequence[int],
                    gamma: float) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multi-step decay, stepped once per epoch (paper: x0.1 every 10 epochs)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)

