"""Builders of the reference SSM model (torchtune-style: small functions that assemble parts).

The model follows the data-flow figure of ``shared/DESIGN.md``::

    expression clips [B1,T,3,H,W] ─┐                          ┌─ ClipTemporalHead  -> z_exp [B1,D]
    AU clips         [B2,T,3,H,W] ─┴─ ONE CLIP vision pass ───┤
                                     (MoE FFNs, task routed)  └─ FrameTemporalHead -> z_au [B2,D] / [B2,T,D]
    TSP prompts -> frozen text tower -> T_exp [K,D], T_au [M,D] -> DPM -> cosine heads

Everything here is importable (``examples`` is not a package: add this folder to ``sys.path``);
``ssm_reference.py`` is the CLI around it and ``predict_video.py`` reuses :func:`load_model`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from facelayers import facs

# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

#: The default tiny CLIP: random init, no download; small enough that the default run trains in
#: minutes on 2 CPU cores, big enough (32 px, 8 px patches -> 16 patches) to see the synthetic AUs.
TINY_CLIP: dict[str, Any] = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)



def tiny_clip_kwargs(image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 2) -> dict[str, Any]:
    """open_clip.CLIP kwargs of a tiny random-init CLIP (text tower fixed: width 64, 2 layers)."""
    return dict(
        embed_dim=width,
        vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


MODES = ("stl", "baseline", "ssm")
MAPPINGS = ("dpm", "linear", "mlp", "none")


class BackboneUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (missing file, no network)."""


class VocabularyMismatchError(ValueError):
    """A checkpoint was trained with other AU / expression vocabularies than the model."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model (stored as JSON beside the weights).

    ``tasks`` is ``("exp", "au")`` for the joint modes, a single task for ``stl``.
    """

    mode: str = "ssm"
    tasks: tuple[str, ...] = ("exp", "au")
    expressions: tuple[str, ...] = facs.EXPRESSIONS_7
    aus: tuple[int, ...] = facs.BP4D_AUS
    backbone: str = "tiny"
    clip_kwargs: dict[str, Any] | None = None  # open_clip.CLIP kwargs (tiny) or None (named model)
    num_frames: int = 8
    image_size: int = 48
    # MoE
    moe: bool = True
    moe_blocks: str = "last:2"
    num_experts: int = 4
    top_k: int = 2
    moe_hidden: int | None = None
    # temporal
    temporal_heads: int = 8
    temporal_depth: int = 1
    au_select: str = "center"
    # text side
    tsp: bool = True
    mapping: str = "dpm"
    desc_style: str = "compound"
    n_ctx: int = 8
    tau: float = 0.01
    dpm_tau: float = 0.01
    alpha: float = 0.1
    beta: float = 0.1
    dpm_init: str = "prior"
    dual: bool = True
    freeze_dpm: bool = False
    dpm_variant: str = "paper"
    prior_source: str | None = None
    grad_checkpoint: bool = False
    # execution (results are identical whatever these are; see docs/reference.md "Execution options")
    vision_passes: int = 1  # 1: ONE concatenated pass for both tasks; 2: the release's two passes
    cache_in_eval: bool = True  # PromptLearner text-feature cache in eval mode
    moe_backend: str = "auto"  # grouped-expert backend of every MoEFFN (facelayers.ops.grouped_experts.BACKENDS)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["expressions"] = list(self.expressions)
        d["aus"] = list(self.aus)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        d = dict(d)
        for k in ("tasks", "expressions", "aus"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        if not self.tasks or any(t not in ("exp", "au") for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty subset of ('exp', 'au'), got {self.tasks!r}")
        if self.mode == "stl" and len(self.tasks) != 1:
            raise ValueError(f"mode 'stl' trains one task, got tasks={self.tasks!r}")
        if self.mode != "stl" and tuple(self.tasks) != ("exp", "au"):
            raise ValueError(f"mode {self.mode!r} trains both tasks, got tasks={self.tasks!r}")
        facs.check_vocabulary(self.expressions, "expression")
        facs.check_vocabulary(self.aus, "au")
        if self.vision_passes not in (1, 2):
            raise ValueError(f"vision_passes must be 1 (one concatenated pass) or 2 (one per task), got {self.vision_passes!r}")
        from facelayers.ops.grouped_experts import BACKENDS

        if self.moe_backend not in BACKENDS:
            raise ValueError(f"moe_backend must be one of {BACKENDS}, got {self.moe_backend!r}")

    @property
    def uses_text(self) -> bool:
        return self.mode == "ssm" and self.tsp

    @property
    def uses_mapping(self) -> bool:
        return self.uses_text and self.mapping != "none" and len(self.tasks) == 2


# ----------------------------------------------------------------------------------------------
# backbone
# ----------------------------------------------------------------------------------------------


def build_backbone(name: str = "tiny", pretrained: str | None = None, *, clip_kwargs: dict | None = None) -> nn.Module:
    """An open_clip ``CLIP`` model (vision + text towers).

    Args:
        name: ``"tiny"`` (random init, :data:`TINY_CLIP` or ``clip_kwargs``) or an open_clip model
            name such as ``"ViT-B-16"``.
        pretrained: a local checkpoint file, an open_clip pretrained tag (needs network or a
            filled cache), or ``None`` for random init.
        clip_kwargs: ``open_clip.CLIP`` kwargs for ``"tiny"``.

    Raises:
        BackboneUnavailableError: weights were requested and cannot be loaded.
    """
    import open_clip

    if name == "tiny":
        if pretrained:
            raise BackboneUnavailableError("the tiny backbone is random-init only; drop --pretrained or pick --backbone ViT-B-16")
        return open_clip.CLIP(**copy.deepcopy(clip_kwargs or TINY_CLIP))
    if name not in open_clip.list_models():
        raise BackboneUnavailableError(f"unknown open_clip model {name!r}; e.g. 'ViT-B-16', 'ViT-B-32', 'ViT-L-14'")
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
    return int(clip.visual.conv1.out_channels)


def vision_layers(clip: nn.Module) -> int:
    return len(clip.visual.transformer.resblocks)


def parse_blocks(spec: str, n_layers: int) -> list[int]:
    """``"last:6"``, ``"all"``, ``"none"`` or ``"0,3,5"`` -> block indices."""
    spec = str(spec).strip()
    if spec in ("none", ""):
        return []
    if spec == "all":
        return list(range(n_layers))
    if spec.startswith("last:"):
        k = int(spec[5:])
        if not 0 <= k <= n_layers:
            raise ValueError(f"moe blocks {spec!r}: the backbone has {n_layers} blocks")
        return list(range(n_layers - k, n_layers))
    idx = [int(s) for s in spec.split(",") if s.strip()]
    bad = [i for i in idx if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"moe blocks {bad} out of range for a backbone with {n_layers} blocks")
    return sorted({i % n_layers for i in idx})


def build_vision_encoder(clip: nn.Module, cfg: ModelConfig) -> list[str]:
    """Inject MoE FFNs into ``clip.visual`` in place; returns the replaced module names."""
    if not cfg.moe:
        return []
    from facelayers.moe import inject_moe_

    blocks = parse_blocks(cfg.moe_blocks, vision_layers(clip))
    if not blocks:
        return []
    hidden = cfg.moe_hidden or moe_hidden_default(vision_width(clip))
    return inject_moe_(
        clip.visual, blocks=blocks, num_experts=cfg.num_experts, hidden_dim=hidden, top_k=cfg.top_k,
        num_tasks=len(cfg.tasks), backend=cfg.moe_backend,
    )


# ----------------------------------------------------------------------------------------------
# activation checkpointing that keeps the MoE task routing
# ----------------------------------------------------------------------------------------------


def _block_task_ids(block: nn.Module) -> Any:
    """The task ids the block's MoE layers would route with right now (0 = every token task 0)."""
    for m in _moe_modules(block):
        ids = m._task_ids  # set by facelayers.moe.moe_task_context
        return 0 if ids is None else ids
    return None


def _run_block_routed(block: nn.Module, task_ids: Any, *args: Any, **kwargs: Any) -> Tensor:
    """The block's own forward under ``moe_task_context(block, task_ids)`` (no context without MoE)."""
    forward = type(block).forward
    if task_ids is None:
        return forward(block, *args, **kwargs)
    from facelayers.moe import moe_task_context

    with moe_task_context(block, task_ids):
        return forward(block, *args, **kwargs)


def _routed_checkpoint_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    # The task ids are an ARGUMENT of the checkpointed function: the recomputation in backward enters
    # the same routing, even though the caller's moe_task_context has closed by then.
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_run_block_routed, self, _block_task_ids(self), *args, use_reentrant=False, **kwargs)


def set_routed_grad_checkpointing(visual: nn.Module, enable: bool = True) -> None:
    """Activation checkpointing of every block of an open_clip vision tower, MoE-routing safe.

    open_clip's own ``set_grad_checkpointing`` recomputes a block in backward by calling it again,
    when the caller's :func:`facelayers.moe.moe_task_context` has usually closed: MoE blocks would
    then be recomputed with other routing (a ``CheckpointError``, or wrong gradients). Here each
    block's forward is wrapped (instance attribute, state-dict keys unchanged) in a non-reentrant
    checkpoint of a function that receives the current task ids as an argument and re-enters
    ``moe_task_context`` with them, so recomputation sees exactly the routing of the forward.
    open_clip's flag is kept off (no double checkpointing).
    """
    tr = visual.transformer
    tr.grad_checkpointing = False
    for blk in tr.resblocks:
        if enable:
            blk.forward = types.MethodType(_routed_checkpoint_forward, blk)
        else:
            blk.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------------------------
# text side
# ----------------------------------------------------------------------------------------------


def descriptions_for(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(expression descriptions, AU descriptions) for the configured style."""
    exp_desc = facs.expression_descriptions(cfg.expressions, style=cfg.desc_style)
    au_desc = facs.au_descriptions(cfg.aus)
    return exp_desc, au_desc


def build_text_side(clip: nn.Module, cfg: ModelConfig) -> nn.Module:
    """TSP: one frozen text tower shared by the expression and AU prompt learners."""
    from facelayers.prompts import CLIPTextTower, TextPrototypes

    tower = CLIPTextTower.from_open_clip(clip)
    return TextPrototypes(tower, cfg.aus, cfg.expressions, style=cfg.desc_style, n_ctx=cfg.n_ctx,
                          cache_in_eval=cfg.cache_in_eval)


def build_mapping(cfg: ModelConfig, dim: int) -> nn.Module | None:
    """DPM (or its Table VII siblings) between ``T_exp [K, D]`` and ``T_au [M, D]``."""
    if not cfg.uses_mapping:
        return None
    from facelayers import prior_mapping as pm

    source = cfg.prior_source or ("ssm_release" if cfg.dpm_variant == "ssm_release" else "table_s4")
    prior = facs.prior_matrix(cfg.expressions, cfg.aus, source=source)
    if cfg.mapping == "dpm":
        return pm.DynamicPriorMapping(
            prior, tau=cfg.dpm_tau, alpha=cfg.alpha, beta=cfg.beta, learnable=not cfg.freeze_dpm,
            dual=cfg.dual, init=cfg.dpm_init, variant=cfg.dpm_variant,
        )
    if cfg.mapping == "linear":
        return pm.LinearSemanticMapping(len(cfg.expressions), len(cfg.aus), alpha=cfg.alpha, beta=cfg.beta)
    return pm.MLPSemanticMapping(len(cfg.expressions), len(cfg.aus), alpha=cfg.alpha, beta=cfg.beta)


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

TASK_INDEX = {"exp": 0, "au": 1}


class SSMModel(nn.Module):
    """Reference SSM: shared MoE CLIP vision encoder, temporal heads, text-aligned or linear heads.

    Built by :func:`build_model`; sub-modules are injected (``clip`` already MoE-injected).

    Args:
        cfg: the :class:`ModelConfig`.
        clip: open_clip ``CLIP`` (its text tower is only used through ``text``).
        text: TSP module (``forward() -> (T_exp [K,D], T_au [M,D])``) or ``None``.
        mapping: DPM / ablation mapping or ``None``.
    """

    def __init__(self, cfg: ModelConfig, clip: nn.Module, text: nn.Module | None, mapping: nn.Module | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = clip.visual
        dim = int(clip.visual.output_dim)
        self.dim = dim
        # keep only the vision tower on the module (the text tower lives inside `text` when used)
        self.text = text
        self.mapping = mapping
        kw = dict(heads=cfg.temporal_heads, depth=cfg.temporal_depth, max_frames=max(cfg.num_frames, 16))
        self.exp_temporal = None
        self.au_temporal = None
        from facelayers.temporal import ClipTemporalHead, FrameTemporalHead

        if "exp" in cfg.tasks:
            self.exp_temporal = ClipTemporalHead(dim, pool="cls", **kw)
        if "au" in cfg.tasks:
            self.au_temporal = FrameTemporalHead(dim, select=cfg.au_select, **kw)
        k, m = len(cfg.expressions), len(cfg.aus)
        if cfg.uses_text:
            from facelayers.heads import CosineClassifier

            self.exp_head = CosineClassifier(tau=cfg.tau) if "exp" in cfg.tasks else None
            self.au_head = CosineClassifier(tau=cfg.tau) if "au" in cfg.tasks else None
        else:
            self.exp_head = nn.Linear(dim, k) if "exp" in cfg.tasks else None
            self.au_head = nn.Linear(dim, m) if "au" in cfg.tasks else None
        self._routing_depth = 0

    # -- routing -----------------------------------------------------------------------------
    def task_ids(self, n_exp: int, n_au: int, num_frames: int, device: torch.device | str | None = None) -> Tensor:
        """Per-frame task ids of the concatenated batch ``[exp frames..., au frames...]``."""
        ids = []
        if n_exp:
            ids.append(torch.full((n_exp * num_frames,), self._task_slot("exp"), dtype=torch.long, device=device))
        if n_au:
            ids.append(torch.full((n_au * num_frames,), self._task_slot("au"), dtype=torch.long, device=device))
        return torch.cat(ids)

    def _task_slot(self, task: str) -> int:
        return self.cfg.tasks.index(task)

    @contextlib.contextmanager
    def routing(self, n_exp: int, n_au: int, num_frames: int, device: torch.device | str | None = None) -> Iterator[None]:
        """Route the next concatenated vision pass(es) per sample (optional: :meth:`forward` routes
        by itself; activation checkpointing does not need it open across ``backward()``)."""
        if not self.cfg.moe:
            yield
            return
        from facelayers.moe import moe_task_context

        with moe_task_context(self.visual, self.task_ids(n_exp, n_au, num_frames, device)):
            self._routing_depth += 1
            try:
                yield
            finally:
                self._routing_depth -= 1

    # -- text --------------------------------------------------------------------------------
    def text_features(self) -> tuple[Tensor | None, Tensor | None]:
        """``(T_exp' [K, D], T_au' [M, D])`` after TSP and the mapping (``None`` without TSP)."""
        if self.text is None:
            return None, None
        t_exp, t_au = self.text()
        if self.mapping is not None:
            t_exp, t_au = self.mapping(t_exp, t_au)
        return t_exp, t_au

    # -- forward -----------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, D]`` through the (MoE) vision encoder."""
        return self.visual(frames)

    def forward(self, exp_clips: Tensor | None = None, au_clips: Tensor | None = None, *,
                vision_passes: int | None = None) -> dict[str, Tensor]:
        """One vision pass for both tasks (or one per task, the released code's execution).

        Args:
            exp_clips: ``[B1, T, 3, H, W]`` or ``None``.
            au_clips: ``[B2, T', 3, H, W]`` or ``None``.
            vision_passes: 1 = ONE concatenated pass, per-sample task routing; 2 = expression
                frames, then AU frames, each pass routed as its task (same results); default
                ``cfg.vision_passes``.

        Returns:
            dict with ``exp_logits [B1, K]`` and/or ``au_logits [B2, M]`` (``[B2, T', M]`` with
            ``au_select="all"``).
        """
        if exp_clips is None and au_clips is None:
            raise ValueError("SSMModel.forward: expected expression and/or AU clips, got neither")
        if exp_clips is not None and self.exp_temporal is None:
            raise ValueError(f"this model was built for tasks {self.cfg.tasks}; got expression clips")
        if au_clips is not None and self.au_temporal is None:
            raise ValueError(f"this model was built for tasks {self.cfg.tasks}; got AU clips")
        parts, shapes = [], []
        for name, c in (("exp_clips", exp_clips), ("au_clips", au_clips)):
            if c is None:
                shapes.append((0, 0))
                continue
            if c.dim() != 5 or c.shape[2] != 3:
                raise ValueError(f"{name}: expected [B, T, 3, H, W], got {tuple(c.shape)}")
            shapes.append((c.shape[0], c.shape[1]))
            parts.append(c.flatten(0, 1))
        if len(parts) == 2 and parts[0].shape[1:] != parts[1].shape[1:]:
            raise ValueError(f"expression and AU frames must share [3, H, W]; got {tuple(parts[0].shape[1:])} and {tuple(parts[1].shape[1:])}")
        passes = self.cfg.vision_passes if vision_passes is None else vision_passes
        if passes not in (1, 2):
            raise ValueError(f"vision_passes must be 1 or 2, got {passes!r}")
        (b1, t1), (b2, t2) = shapes
        if passes == 2 and len(parts) == 2:
            feats = torch.cat([self.encode_task_frames(parts[0], "exp"), self.encode_task_frames(parts[1], "au")])
        elif passes == 2:
            feats = self.encode_task_frames(parts[0], "exp" if b1 else "au")
        elif self.cfg.moe and self._routing_depth == 0:
            frames = torch.cat(parts) if len(parts) == 2 else parts[0]
            ids = []
            if b1:
                ids.append(torch.full((b1 * t1,), self._task_slot("exp"), dtype=torch.long, device=frames.device))
            if b2:
                ids.append(torch.full((b2 * t2,), self._task_slot("au"), dtype=torch.long, device=frames.device))
            from facelayers.moe import moe_task_context

            with moe_task_context(self.visual, torch.cat(ids) if len(ids) == 2 else ids[0]):
                feats = self.encode_frames(frames)
        else:
            feats = self.encode_frames(torch.cat(parts) if len(parts) == 2 else parts[0])
        out: dict[str, Tensor] = {}
        t_exp, t_au = self.text_features()
        if b1:
            out["exp_logits"] = self.exp_logits_from_features(feats[: b1 * t1].reshape(b1, t1, -1), t_exp)
        if b2:
            out["au_logits"] = self.au_logits_from_features(feats[b1 * t1 :].reshape(b2, t2, -1), t_au)
        return out

    def encode_task_frames(self, frames: Tensor, task: str) -> Tensor:
        """``[N, 3, H, W] -> [N, D]`` with every frame routed as ``task`` (frames are encoded
        independently, so per-frame features can be reused by overlapping windows)."""
        if self.cfg.moe and any(True for _ in _moe_modules(self.visual)):
            from facelayers.moe import moe_task_context

            with moe_task_context(self.visual, self._task_slot(task)):
                return self.encode_frames(frames)
        return self.encode_frames(frames)

    def exp_logits_from_features(self, f: Tensor, t_exp: Tensor | None = None) -> Tensor:
        """Frame features ``[B, T, D]`` -> expression logits ``[B, K]``."""
        if t_exp is None and self.text is not None:
            t_exp, _ = self.text_features()
        z = self.exp_temporal(f)
        return self.exp_head(z, t_exp) if t_exp is not None else self.exp_head(z)

    def au_logits_from_features(self, f: Tensor, t_au: Tensor | None = None) -> Tensor:
        """Frame features ``[B, T, D]`` -> AU logits ``[B, M]`` (centre) or ``[B, T, M]`` (all)."""
        if t_au is None and self.text is not None:
            _, t_au = self.text_features()
        z = self.au_temporal(f)
        return self.au_head(z, t_au) if t_au is not None else self.au_head(z)

    # -- execution options (no effect on results) ----------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the vision blocks (routing-safe, see
        :func:`set_routed_grad_checkpointing`); updates ``cfg.grad_checkpoint``."""
        set_routed_grad_checkpointing(self.visual, enable)
        self.cfg.grad_checkpoint = bool(enable)

    def set_cache_in_eval(self, enable: bool = True) -> int:
        """Eval-mode text-feature cache of every ``PromptLearner`` on/off (drops cached features);
        updates ``cfg.cache_in_eval``; returns the number of learners changed."""
        from facelayers.prompts import PromptLearner

        n = 0
        for m in self.modules():
            if isinstance(m, PromptLearner):
                m.cache_in_eval = bool(enable)
                m.train(m.training)  # train()/eval() drop the cache
                n += 1
        self.cfg.cache_in_eval = bool(enable)
        return n

    def set_moe_backend(self, backend: str) -> int:
        """Grouped-expert backend of every ``MoEFFN`` (one of ``facelayers.ops.grouped_experts.BACKENDS``);
        updates ``cfg.moe_backend``; returns the number of MoE layers changed."""
        from facelayers.ops.grouped_experts import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"moe_backend must be one of {BACKENDS}, got {backend!r}")
        n = 0
        for m in _moe_modules(self.visual):
            m.backend = backend
            n += 1
        self.cfg.moe_backend = backend
        return n

    # -- parameter groups --------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into ``"visual"`` (pretrained backbone weights, the MoE
        shared experts included) and ``"new"`` (MoE private experts / routers / gates, temporal
        heads, prompt contexts, mapping, heads)."""
        private: set[int] = set()
        if self.cfg.moe and any(True for _ in _moe_modules(self.visual)):
            from facelayers.moe import moe_parameter_groups

            for ps in moe_parameter_groups(self.visual).values():
                private.update(id(p) for p in ps)
        visual, new = [], []
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if name.startswith("visual.") and id(p) not in private:
                visual.append(p)
            else:
                new.append(p)
        return {"visual": visual, "new": new}


def _moe_modules(module: nn.Module) -> Iterator[nn.Module]:
    from facelayers.moe import MoEFFN

    return (m for m in module.modules() if isinstance(m, MoEFFN))


def build_model(cfg: ModelConfig, *, pretrained: str | None = None, clip: nn.Module | None = None) -> SSMModel:
    """Assemble :class:`SSMModel` from a config (building the backbone unless ``clip`` is given)."""
    cfg.validate()
    if clip is None:
        clip = build_backbone(cfg.backbone, pretrained, clip_kwargs=cfg.clip_kwargs)
    if cfg.backbone == "tiny" and cfg.clip_kwargs is None:
        cfg.clip_kwargs = copy.deepcopy(TINY_CLIP)
    img = clip.visual.image_size
    img = img[0] if isinstance(img, (tuple, list)) else int(img)
    cfg.image_size = int(img)
    build_vision_encoder(clip, cfg)
    if cfg.grad_checkpoint:
        set_routed_grad_checkpointing(clip.visual, True)
    text = build_text_side(clip, cfg) if cfg.uses_text else None
    dim = int(clip.visual.output_dim)
    mapping = build_mapping(cfg, dim)
    return SSMModel(cfg, clip, text, mapping)


# ----------------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------------


def build_optimizer(model: SSMModel, *, lr: float, lr_visual: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with two groups: visual backbone (``lr_visual``) and everything new (``lr``)."""
    groups = model.param_groups()
    pg = []
    if groups["visual"]:
        pg.append(dict(params=groups["visual"], lr=lr_visual, name="visual"))
    if groups["new"]:
        pg.append(dict(params=groups["new"], lr=lr, name="new"))
    return torch.optim.AdamW(pg, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, *, milestones: Sequence[int], gamma: float) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multi-step decay, stepped once per epoch (paper: x0.1 every 10 epochs)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)


# ----------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, no pickles)
# ----------------------------------------------------------------------------------------------


def _contiguous_unshared(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Plain CPU copies (safetensors rejects tensors that share storage or are not contiguous)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}


def _dedupe(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop state-dict entries that are the same tensor as an earlier one (the text tower is shared
    by both prompt learners); returns the kept entries and ``{alias: kept key}``."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for k, v in sd.items():
        ident = (v.data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype) if v.numel() else None
        if ident is not None and ident in first:
            aliases[k] = first[ident]
            continue
        if ident is not None:
            first[ident] = k
        kept[k] = v
    return kept, aliases


def save_model(model: SSMModel, folder: str, extra: dict[str, Any] | None = None, name: str = "model") -> None:
    """``{folder}/{name}.safetensors`` (weights) + ``{folder}/{name}.json`` (config, extra)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    sd, aliases = _dedupe(model.state_dict())
    sd = _contiguous_unshared(sd)
    meta = {"config": model.cfg.to_json(), "aliases": aliases, **(extra or {})}
    tmp = os.path.join(folder, f".{name}.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt", "facelayers": "ssm_reference"})
    os.replace(tmp, os.path.join(folder, f"{name}.safetensors"))
    with open(os.path.join(folder, f"{name}.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(folder, f"{name}.json.tmp"), os.path.join(folder, f"{name}.json"))


def read_checkpoint_config(folder: str, name: str = "model") -> dict[str, Any]:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint config at {path} (expected {name}.json + {name}.safetensors)")
    with open(path) as f:
        return json.load(f)


def check_vocabularies(model_cfg: ModelConfig, ckpt_cfg: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise :class:`VocabularyMismatchError` naming both vocabularies when they differ."""
    ck_exp = tuple(ckpt_cfg.get("expressions", ()))
    ck_aus = tuple(int(a) for a in ckpt_cfg.get("aus", ()))
    problems = []
    if "exp" in model_cfg.tasks and ck_exp != tuple(model_cfg.expressions):
        problems.append(f"expressions: {source} has {list(ck_exp)}, model has {list(model_cfg.expressions)}")
    if "au" in model_cfg.tasks and ck_aus != tuple(model_cfg.aus):
        problems.append(f"AUs: {source} has {list(ck_aus)}, model has {list(model_cfg.aus)}")
    if problems:
        raise VocabularyMismatchError("checkpoint vocabulary does not match the model: " + "; ".join(problems))


def load_weights(model: SSMModel, folder: str, name: str = "model", *, strict: bool = True) -> dict[str, Any]:
    """Load ``{name}.safetensors`` into ``model`` after checking the vocabularies; returns the JSON."""
    from safetensors.torch import load_file

    meta = read_checkpoint_config(folder, name)
    check_vocabularies(model.cfg, meta["config"])
    sd = load_file(os.path.join(folder, f"{name}.safetensors"))
    for alias, key in meta.get("aliases", {}).items():
        sd[alias] = sd[key]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {folder}/{name} does not fit this model: missing {list(missing)[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {list(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    return meta


def load_model(folder: str, name: str = "model", *, device: str | torch.device = "cpu") -> SSMModel:
    """Rebuild the model from ``{name}.json`` (no download: random init, then the saved weights)."""
    meta = read_checkpoint_config(folder, name)
    cfg = ModelConfig.from_json(meta["config"])
    model = build_model(cfg, pretrained=None)
    load_weights(model, folder, name)
    return model.to(device).eval()


def save_optimizer(optimizer: torch.optim.Optimizer, folder: str, extra: dict[str, Any]) -> None:
    """Optimizer state tensors -> ``optimizer.safetensors``; groups + ``extra`` -> ``trainer.json``."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    save_file(tensors, os.path.join(folder, ".optimizer.safetensors.tmp"))
    os.replace(os.path.join(folder, ".optimizer.safetensors.tmp"), os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "trainer.json.tmp"), "w") as f:
        json.dump({"param_groups": groups, "scalars": scalars, **extra}, f, indent=2)
    os.replace(os.path.join(folder, "trainer.json.tmp"), os.path.join(folder, "trainer.json"))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: str) -> dict[str, Any]:
    """Inverse of :func:`save_optimizer`; returns the ``trainer.json`` dict."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "trainer.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


class DataUnavailableError(RuntimeError):
    """Real-data options are incomplete or point to missing files."""


@dataclass
class DataBundle:
    """Train / val / test datasets per task plus the label vocabularies.

    Items follow the facelayers data contract: expression ``dict(clip [T,3,H,W], label, index)``,
    AU ``dict(clip [T,3,H,W], labels [M] or [T,M], mask Bool[T], index)``.
    """

    expressions: tuple[str, ...]
    aus: tuple[int, ...]
    train: dict[str, Any]
    val: dict[str, Any]
    test: dict[str, Any]
    au_test_positive_rate: list[float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index split with ``round(fraction * n)`` validation items (>= 1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 training items to carve a validation split, got {n}")
    k = min(n - 1, max(1, int(round(fraction * n))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def _subject_of(sequence: str) -> str:
    """BP4D ``F001/T1`` -> ``F001``; DISFA ``SN001`` -> ``SN001``."""
    return sequence.replace("\\", "/").split("/")[0]


def build_real_datasets(
    *, frames: int, image_size: int, seed: int, val_fraction: float, au_dataset: str, au_root: str | None,
    au_manifest: str | None, au_test_manifest: str | None, exp_dataset: str, exp_root: str | None,
    exp_manifest: str | None, exp_test_manifest: str | None, au_select: str = "center",
    tasks: Sequence[str] = ("exp", "au"),
) -> DataBundle:
    """Datasets from the public manifests (BP4D / DISFA and DFEW / FERV39K / MAFW).

    The validation split is carved from the training manifest: whole AU subjects (so it is
    subject-independent, like the test folds) and random expression clips.
    """
    from facelayers.data import AUClipDataset, ExpressionClipDataset, eval_transform, read_manifest, train_transform

    need = []
    if "au" in tasks:
        need += [("--au-root", au_root), ("--au-manifest", au_manifest), ("--au-test-manifest", au_test_manifest)]
    if "exp" in tasks:
        need += [("--exp-root", exp_root), ("--exp-manifest", exp_manifest), ("--exp-test-manifest", exp_test_manifest)]
    missing = [n for n, v in need if not v]
    if missing:
        raise DataUnavailableError(f"--data real needs {', '.join(missing)} (see docs/reference.md)")
    for n, v in need:
        if n.endswith("manifest") and not os.path.isfile(v):
            raise DataUnavailableError(f"{n}: file not found: {v}")
        if n.endswith("root") and not os.path.isdir(v):
            raise DataUnavailableError(f"{n}: folder not found: {v}")
    aus = facs.BP4D_AUS if au_dataset == "bp4d" else facs.DISFA_AUS
    expressions = facs.MAFW_EXPRESSIONS if exp_dataset == "mafw" else facs.EXPRESSIONS_7
    tr_tf, ev_tf = train_transform(image_size), eval_transform(image_size)
    train, val, test = {}, {}, {}
    rate = None
    if "au" in tasks:
        recs = read_manifest(au_manifest, au_dataset)
        subjects = sorted({_subject_of(r.sequence) for r in recs})
        tr_i, va_i = _split_indices(len(subjects), val_fraction, seed)
        val_subjects = {subjects[i] for i in va_i}
        tr_recs = [r for r in recs if _subject_of(r.sequence) not in val_subjects]
        va_recs = [r for r in recs if _subject_of(r.sequence) in val_subjects]
        kw = dict(num_frames=frames, label_mode=au_select)
        train["au"] = AUClipDataset(tr_recs, au_root, train=True, transform=tr_tf, seed=seed, **kw)
        val["au"] = AUClipDataset(va_recs, au_root, eval_cover=au_select == "center", transform=ev_tf, **kw)
        te_recs = read_manifest(au_test_manifest, au_dataset)
        test["au"] = AUClipDataset(te_recs, au_root, eval_cover=au_select == "center", transform=ev_tf, **kw)
        lab = torch.tensor([r.labels for r in te_recs], dtype=torch.float64)
        rate = lab.mean(0).tolist()
    if "exp" in tasks:
        recs = read_manifest(exp_manifest, exp_dataset)
        tr_i, va_i = _split_indices(len(recs), val_fraction, seed)
        train["exp"] = ExpressionClipDataset([recs[i] for i in tr_i], exp_root, num_frames=frames, train=True,
                                             transform=tr_tf, seed=seed)
        val["exp"] = ExpressionClipDataset([recs[i] for i in va_i], exp_root, num_frames=frames, transform=ev_tf)
        test["exp"] = ExpressionClipDataset(read_manifest(exp_test_manifest, exp_dataset), exp_root,
                                            num_frames=frames, transform=ev_tf)
    return DataBundle(tuple(expressions), tuple(aus), train, val, test, rate)


def build_datasets(*, data: str, frames: int, image_size: int, seed: int, fold: int, quick: bool, size: float,
                   data_seed: int = 0, class_balance: str = "uniform", nuisance: float | None = None,
                   val_fraction: float, exp_fraction: float, au_fraction: float, au_dataset: str,
                   au_root: str | None, au_manifest: str | None, au_test_manifest: str | None, exp_dataset: str,
                   exp_root: str | None, exp_manifest: str | None, exp_test_manifest: str | None,
                   au_select: str = "center", tasks: Sequence[str] = ("exp", "au")) -> DataBundle:
    """Synthetic benchmark (default) or real datasets; see :func:`build_real_datasets`."""
    if data == "real":
        return build_real_datasets(
            frames=frames, image_size=image_size, seed=seed, val_fraction=val_fraction, au_dataset=au_dataset,
            au_root=au_root, au_manifest=au_manifest, au_test_manifest=au_test_manifest, exp_dataset=exp_dataset,
            exp_root=exp_root, exp_manifest=exp_manifest, exp_test_manifest=exp_test_manifest, au_select=au_select,
            tasks=tasks,
        )
    return build_synthetic_datasets(frames=frames, image_size=image_size, seed=data_seed, fold=fold, quick=quick,
                                    size=size, val_fraction=val_fraction, au_dataset=au_dataset,
                                    exp_dataset=exp_dataset, au_select=au_select, tasks=tasks,
                                    class_balance=class_balance, nuisance=nuisance)


#: Size of the default synthetic benchmark (``--synthetic-size`` scales the counts).
SYNTHETIC_DEFAULT = dict(exp_clips=2000, au_subjects=40, au_sequences=2, au_sequence_length=48)
SYNTHETIC_QUICK = dict(exp_clips=80, au_subjects=5, au_sequences=1, au_sequence_length=24)


def build_synthetic_datasets(*, frames: int, image_size: int, seed: int, fold: int, quick: bool, size: float,
                             val_fraction: float, au_dataset: str = "bp4d", exp_dataset: str = "dfew",
                             au_select: str = "center", tasks: Sequence[str] = ("exp", "au"),
                             class_balance: str = "uniform", nuisance: float | None = None) -> DataBundle:
    """The synthetic FACS benchmark of :mod:`facelayers.data.synthetic` (in memory, no files).

    Expression side: wild-like clips of the 7 (DFEW / FERV39K-like) or 11 (MAFW-like) classes, 5
    stratified folds, test = fold ``fold``; validation = ``val_fraction`` of the other folds.
    AU side: lab-like takes of BP4D-like (12) or DISFA-like (8) AUs, 3 subject folds, test = fold
    ``fold``, validation = 15 % of the other subjects (subject-independent). ``seed`` is the
    *benchmark* seed (the same benchmark for every training seed unless it changes).
    """
    from facelayers.data import ClipCompose, ClipNormalize, ClipRandomHorizontalFlip
    from facelayers.data.synthetic import SyntheticAUDataset, SyntheticExpressionDataset

    p = dict(SYNTHETIC_QUICK if quick else SYNTHETIC_DEFAULT)
    if size != 1.0:
        p = {k: max(1, int(round(v * size))) if k in ("exp_clips", "au_subjects") else v for k, v in p.items()}
    aus = facs.BP4D_AUS if au_dataset == "bp4d" else facs.DISFA_AUS
    expressions = facs.EXPRESSIONS_11 if exp_dataset == "mafw" else facs.EXPRESSIONS_7
    train_tf = ClipCompose([ClipRandomHorizontalFlip(), ClipNormalize()])
    eval_tf = ClipNormalize()
    train, val, test = {}, {}, {}
    rate = None
    if "exp" in tasks:
        n_folds = 5
        if not 1 <= fold <= n_folds:
            raise ValueError(f"--fold must be in 1..{n_folds} for the synthetic expression benchmark, got {fold}")
        kw = dict(expressions=expressions, num_clips=max(p["exp_clips"], 5 * len(expressions)), num_frames=frames,
                  image_size=image_size, seed=seed, num_folds=n_folds, fold=fold - 1, val_fraction=val_fraction,
                  class_balance=class_balance)
        if nuisance is not None:
            kw["nuisance"] = float(nuisance)
        train["exp"] = SyntheticExpressionDataset(split="train", transform=train_tf, item_seed=seed, **kw)
        val["exp"] = SyntheticExpressionDataset(split="val", transform=eval_tf, **kw)
        test["exp"] = SyntheticExpressionDataset(split="test", transform=eval_tf, **kw)
    if "au" in tasks:
        n_folds = 3
        if not 1 <= fold <= n_folds:
            raise ValueError(f"--fold must be in 1..{n_folds} for the synthetic AU benchmark, got {fold}")
        kw = dict(aus=aus, num_subjects=max(p["au_subjects"], n_folds + 2), num_frames=frames, image_size=image_size,
                  label_mode=au_select, seed=seed, num_folds=n_folds, fold=fold - 1,
                  sequences_per_subject=p["au_sequences"], sequence_length=p["au_sequence_length"])
        stride = max(1, frames // 2)
        # fixed windows every T/2 frames (train=False: SyntheticAUDataset's random window shift can
        # step past the end of a take at the time of writing, see the report of issue 8)
        train["au"] = SyntheticAUDataset(split="train", transform=train_tf, stride=stride, train=False,
                                         item_seed=seed, **kw)
        val["au"] = SyntheticAUDataset(split="val", transform=eval_tf, stride=stride, **kw)
        test["au"] = SyntheticAUDataset(split="test", transform=eval_tf, eval_cover=au_select == "center", **kw)
        rate = test["au"].frame_labels.float().mean(0).tolist()
    notes = {"synthetic": {**p, "class_balance": class_balance, "benchmark_seed": seed, "nuisance": nuisance}}
    return DataBundle(tuple(expressions), tuple(aus), train, val, test, rate, notes)
