"""The released SSM model as a facelayers preset: architecture, builder, weight import, save / load.

The only trained SSM weights that exist are the ones published with the released research code
(MSA-LMC/SSM @ 978d79a: ``ssm/models/bp4d.py`` ``Bp4dSSM`` and ``ssm/models/disfa.py`` ``DisfaSSM``,
fine-tuned OpenAI ViT-B/16 CLIP). That model is not the paper's (see ``docs/release.md``); this
module assembles exactly the released architecture from facelayers layers, for any of the six
dataset pairs (BP4D or DISFA x DFEW, FERV39K or MAFW), and imports the release's weights:

=====================================  ===============================================================
release (``Bp4dSSM`` / ``DisfaSSM``)   facelayers part (attribute of :class:`ReleaseSSMModel`)
=====================================  ===============================================================
``encoder`` (CLIP ViT, ``TrueMoE_FFN``  ``visual``: open_clip ``VisionTransformer`` with
in the last 6 blocks)                  :func:`~facelayers.moe.inject_moe_` (``SSM_RELEASE_MOE_KWARGS``,
                                       ``shared_activation="gelu"``, router
                                       :class:`~facelayers.moe.ReleaseMisroutedTopKRouter` or, with
                                       ``dispatch="fixed"``, :class:`~facelayers.moe.TaskTopKRouter`)
``text_encoder`` + ``prompt_learner1``  ``text``: :class:`StoredTextPrototypes` = two
/ ``prompt_learner2``                  :class:`~facelayers.prompts.StoredPromptLearner` on one
                                       :class:`~facelayers.prompts.CLIPTextTower` (no token embedding)
``_compute_maps``, ``alpha``, ``beta``  ``mapping``: :class:`~facelayers.prior_mapping.ReleasePriorMapping`
                                       (neutral row / column fixed at the prior)
``dfer_temporal_net`` / ``temporal_net``  ``exp_temporal``: :class:`~facelayers.temporal.GatedClsTemporalHead`
``au_temporal_net`` / ``temporal_net_au``  ``au_temporal``: :class:`~facelayers.temporal.LocalFrameTemporalHead`
``dfer_head`` + cosine term            ``exp_head``: :class:`~facelayers.heads.LinearCosineHead`
``au_head`` + cosine term, ``au_smooth``  ``au_head``: :class:`SmoothedAUHead` (``LinearCosineHead`` then
                                       :class:`~facelayers.heads.AUPairSmoothing`)
=====================================  ===============================================================

The BP4D and DISFA classes differ only in attribute names of the temporal modules (BP4D:
``dfer_temporal_net`` / ``au_temporal_net``; DISFA: ``temporal_net`` / ``temporal_net_au``), in
their AU count (12 / 8) and in their prior tables and description strings
(:func:`facelayers.facs.release_prior_table`, :func:`facelayers.facs.release_descriptions`); the
DISFA class writes its fixed neutral row with ``torch.cat`` and does not clamp the remaining mass,
which computes the same maps. DFEW and FERV39K models are identical (7 classes); MAFW has 11.

Everything that the checkpoint's shapes determine is inferred from them
(:func:`infer_release_architecture`): widths, depths, patch and image size, expert count and width,
prompt context length, temporal sizes, number of frames. The rest are the release's constants:
OpenAI CLIP's ``heads = width // 64``, top-2 routing without renormalisation, 8 heads in the
expression temporal module, ``max_update = 0.25``, logits ``Linear(z) + 0.1 * cos / 0.01``, AU
smoothing over frame pairs, prompts ``"X X ... X <description>"`` with the class token at the end.

Examples::

    >>> from facelayers.models.ssm import release
    >>> model = release.convert_release_checkpoint("checkpoint.pth", au_dataset="bp4d",
    ...                                            expression_dataset="dfew")      # doctest: +SKIP
    >>> release.save_release_model(model, "runs/ssm-release-bp4d-dfew")          # doctest: +SKIP
    >>> out = model(x_exp, x_au)   # {"exp_logits": [B1, K], "au_logits": [B2, T, M]}  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from facelayers import facs
from facelayers.heads import AUPairSmoothing, LinearCosineHead
from facelayers.io import CheckpointError, inspect_safetensors, load_module, read_json, save_module, write_json
from facelayers.prior_mapping import ReleasePriorMapping
from facelayers.prompts import CLIPTextTower, StoredPromptLearner
from facelayers.temporal import GatedClsTemporalHead, LocalFrameTemporalHead

from .model import SSMModel
from .release_checkpoint import load_release_checkpoint, release_state_dict

__all__ = [
    "RELEASE_KIND",
    "RELEASE_DISPATCHES",
    "ReleaseArchitecture",
    "ReleaseConversionError",
    "ReleaseSSMModel",
    "SmoothedAUHead",
    "StoredTextPrototypes",
    "build_release_model",
    "convert_release_checkpoint",
    "convert_release_state_dict",
    "infer_release_architecture",
    "is_release_checkpoint",
    "load_release_model",
    "release_model_config",
    "release_outputs",
    "save_release_model",
]

#: ``facelayers.kind`` metadata value of a converted release model's weights file.
RELEASE_KIND = "ssm_release"
#: ``"release"``: the released MoE dispatch, bug included (reproduces the released outputs);
#: ``"fixed"``: every token uses its own top-k experts.
RELEASE_DISPATCHES = ("release", "fixed")

_AU_DATASETS = {"bp4d": facs.BP4D_AUS, "disfa": facs.DISFA_AUS}
_EXP_DATASETS = {"dfew": 7, "ferv39k": 7, "mafw": 11}
_MODEL_CLASS = {"bp4d": "Bp4dSSM", "disfa": "DisfaSSM"}
#: release attribute names of the (expression, AU) temporal modules per model class
_TEMPORAL_NAMES = {"Bp4dSSM": ("dfer_temporal_net", "au_temporal_net"), "DisfaSSM": ("temporal_net", "temporal_net_au")}
# release constants (ssm/models/{bp4d,disfa,moe,temporal,prompting}.py)
_CLIP_HEAD_WIDTH = 64  # OpenAI CLIP: heads = width // 64
_EXP_TEMPORAL_HEADS = 8
_LOCAL_MAX_UPDATE = 0.25
_HEAD_SCALE, _HEAD_TAU = 0.1, 0.01
_TOP_K = 2
_SMOOTH_GROUP = 2
_META_RELEASE = "facelayers.release"
_META_CONFIG = "facelayers.config"
_META_KIND = "facelayers.kind"


class ReleaseConversionError(ValueError):
    """A release state dict does not fit the released architecture (names every key at fault)."""


# ------------------------------------------------------------------------------------------------
# architecture
# ------------------------------------------------------------------------------------------------
@dataclass
class ReleaseArchitecture:
    """Everything that fixes the released model's shapes (inferred from a checkpoint, stored as JSON).

    Attributes:
        au_dataset: ``"bp4d"`` (12 AUs, release class ``Bp4dSSM``) or ``"disfa"`` (8 AUs, ``DisfaSSM``).
        expression_dataset: ``"dfew"``, ``"ferv39k"`` (7 classes) or ``"mafw"`` (11).
        embed_dim: CLIP embedding size ``D`` (the release hard-codes 512).
        image_size, patch_size, vision_width, vision_layers, vision_heads, vision_mlp_ratio: the
            OpenAI-CLIP vision tower.
        moe_blocks: vision blocks whose FFN is a MoE layer (release: the last 6).
        num_experts, expert_hidden, top_k: the private experts (release: 4, 512, 2).
        text_width, text_layers, text_heads, text_mlp_ratio, context_length: the text tower.
        n_ctx, class_specific, position: the prompt learners (release: 8, True, "end").
        num_frames: clip length ``T`` (release: 16).
        exp_depth, exp_heads, exp_head_dim, exp_mlp_dim, exp_out_proj: the expression temporal module.
        au_depth, au_heads, au_radius, au_max_update: the AU temporal module.
        smooth_kernel: kernel size of the AU smoothing (release: 5).
        dispatch: ``"release"`` or ``"fixed"`` (see :data:`RELEASE_DISPATCHES`).
    """

    au_dataset: str
    expression_dataset: str
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_ratio: float
    moe_blocks: tuple[int, ...]
    num_experts: int
    expert_hidden: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_ratio: float
    context_length: int
    n_ctx: int
    num_frames: int
    exp_depth: int
    exp_head_dim: int
    exp_mlp_dim: int
    au_depth: int
    au_heads: int
    au_radius: int
    smooth_kernel: int
    top_k: int = _TOP_K
    class_specific: bool = True
    position: str = "end"
    exp_heads: int = _EXP_TEMPORAL_HEADS
    exp_out_proj: bool = True
    au_max_update: float = _LOCAL_MAX_UPDATE
    dispatch: str = "release"

    @property
    def model_class(self) -> str:
        """The release class this architecture is (``"Bp4dSSM"`` or ``"DisfaSSM"``)."""
        return _MODEL_CLASS[self.au_dataset]

    @property
    def aus(self) -> tuple[int, ...]:
        """The AU codes, in the AU dataset's label order."""
        return tuple(_AU_DATASETS[self.au_dataset])

    @property
    def expressions(self) -> tuple[str, ...]:
        """The expression names, in the dataset's label order."""
        return tuple(facs.EXPRESSIONS_11 if _EXP_DATASETS[self.expression_dataset] == 11 else facs.EXPRESSIONS_7)

    def validate(self) -> None:
        """Check the fields that the builder does not check itself.

        Raises:
            ValueError: naming the field, what was expected and what it holds.
        """
        _check_choice("au_dataset", self.au_dataset, tuple(_AU_DATASETS))
        _check_choice("expression_dataset", self.expression_dataset, tuple(_EXP_DATASETS))
        _check_choice("dispatch", self.dispatch, RELEASE_DISPATCHES)
        _check_choice("position", self.position, ("end", "middle", "front"))
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"release architecture {f.name} must be a positive int (expected >= 1, got {v!r})")
        if self.vision_layers and any(not 0 <= b < self.vision_layers for b in self.moe_blocks):
            raise ValueError(f"moe_blocks must index the {self.vision_layers} vision blocks "
                             f"(expected values in [0, {self.vision_layers}), got {list(self.moe_blocks)})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts (expected <= {self.num_experts}, got {self.top_k})")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["moe_blocks"] = list(self.moe_blocks)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReleaseArchitecture:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: not a dict, unknown or missing keys.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"release architecture must be a JSON object (expected a dict, got {type(d).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown release architecture keys (expected keys among {sorted(known)}, got {unknown})")
        required = {f.name for f in fields(cls)} - {f.name for f in fields(cls) if _has_default(f)}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"release architecture lacks keys (expected {sorted(required)}, missing {missing})")
        d = dict(d)
        d["moe_blocks"] = tuple(int(b) for b in d["moe_blocks"])
        arch = cls(**d)
        arch.validate()
        return arch


def _has_default(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is not MISSING or f.default_factory is not MISSING


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices} (expected one of them, got {value!r})")


def _dataset_names(au_dataset: str, expression_dataset: str) -> tuple[str, str]:
    au = str(au_dataset).strip().lower()
    exp = str(expression_dataset).strip().lower()
    _check_choice("au_dataset", au, tuple(_AU_DATASETS))
    _check_choice("expression_dataset", exp, tuple(_EXP_DATASETS))
    return au, exp


def _layer_count(sd: Mapping[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if not idx:
        return 0
    if idx != set(range(max(idx) + 1)):
        raise ReleaseConversionError(f"layers under {prefix}* are not numbered 0..n-1 (expected consecutive "
                                     f"indices, got {sorted(idx)})")
    return max(idx) + 1


def _need(sd: Mapping[str, Tensor], key: str, ndim: int | None = None) -> Tensor:
    if key not in sd:
        raise ReleaseConversionError(f"release state dict lacks {key!r} (expected the released model's keys, "
                                     f"got {len(sd)} keys without it)")
    t = sd[key]
    if ndim is not None and t.dim() != ndim:
        raise ReleaseConversionError(f"{key} must have {ndim} dims (expected {ndim}-D, got shape {list(t.shape)})")
    return t


def infer_release_architecture(
    state_dict: Mapping[str, Tensor], au_dataset: str, expression_dataset: str, *, dispatch: str = "release"
) -> ReleaseArchitecture:
    """Read the released model's architecture from its state dict's shapes.

    Args:
        state_dict: release key names (``module.`` prefix removed: :func:`release_state_dict`).
        au_dataset: ``"bp4d"`` or ``"disfa"`` (case-insensitive); must match the checkpoint's class
            and AU count.
        expression_dataset: ``"dfew"``, ``"ferv39k"`` or ``"mafw"``; must match the class count.
        dispatch: ``"release"`` or ``"fixed"``.

    Raises:
        ReleaseConversionError: a key the architecture needs is missing, or the checkpoint is of
            another dataset pair / model class (named, with expected and found values).
    """
    au, exp = _dataset_names(au_dataset, expression_dataset)
    _check_choice("dispatch", dispatch, RELEASE_DISPATCHES)
    classes = [c for c, (e_name, _) in _TEMPORAL_NAMES.items() if f"{e_name}.cls_token" in state_dict]
    if len(classes) != 1:
        raise ReleaseConversionError(
            "cannot tell the release model class (expected 'dfer_temporal_net.cls_token' (Bp4dSSM) or "
            f"'temporal_net.cls_token' (DisfaSSM), got {'both' if classes else 'neither'})")
    cls_name = classes[0]
    if cls_name != _MODEL_CLASS[au]:
        want = [a for a, c in _MODEL_CLASS.items() if c == cls_name][0]
        raise ReleaseConversionError(f"the checkpoint is a {cls_name} ({want.upper()}) model but the AU dataset is "
                                     f"{au!r} (expected --au-dataset {want}, got {au})")
    exp_name, au_name = _TEMPORAL_NAMES[cls_name]
    m = _need(state_dict, "au_head.weight", 2).shape[0]
    k = _need(state_dict, "dfer_head.weight", 2).shape[0]
    if m != len(_AU_DATASETS[au]):
        raise ReleaseConversionError(f"au_head has {m} outputs (expected {len(_AU_DATASETS[au])} AUs of {au.upper()}, got {m})")
    if k != _EXP_DATASETS[exp]:
        raise ReleaseConversionError(f"dfer_head has {k} classes but {exp.upper()} has {_EXP_DATASETS[exp]} "
                                     f"(expected {_EXP_DATASETS[exp]}, got {k}; --exp-dataset mafw has 11, dfew/ferv39k 7)")
    conv = _need(state_dict, "encoder.conv1.weight", 4)
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    n_pos = int(_need(state_dict, "encoder.positional_embedding", 2).shape[0])
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid != n_pos - 1:
        raise ReleaseConversionError(f"encoder.positional_embedding has {n_pos} rows (expected 1 + a square number "
                                     f"of patches, got {n_pos})")
    embed_dim = int(_need(state_dict, "encoder.proj", 2).shape[1])
    layers = _layer_count(state_dict, "encoder.transformer.resblocks.")
    moe = sorted(i for i in range(layers) if f"encoder.transformer.resblocks.{i}.mlp.gate.weight" in state_dict)
    if not moe:
        raise ReleaseConversionError("no MoE block in encoder.transformer.resblocks (expected "
                                     "'encoder.transformer.resblocks.<i>.mlp.gate.weight' in the last blocks, got none)")
    b0 = f"encoder.transformer.resblocks.{moe[0]}.mlp."
    n_exp = int(_need(state_dict, b0 + "gate.weight", 2).shape[0])
    hidden = int(_need(state_dict, b0 + "private_experts.0.fc1.weight", 2).shape[0])
    v_mlp = int(_need(state_dict, b0 + "shared_fc1.weight", 2).shape[0])
    t_pos = _need(state_dict, "text_encoder.positional_embedding", 2)
    t_width, ctx_len = int(t_pos.shape[1]), int(t_pos.shape[0])
    t_layers = _layer_count(state_dict, "text_encoder.transformer.resblocks.")
    t_mlp = int(_need(state_dict, "text_encoder.transformer.resblocks.0.mlp.c_fc.weight", 2).shape[0])
    ctx = _need(state_dict, "prompt_learner1.ctx")
    if ctx.dim() not in (2, 3):
        raise ReleaseConversionError(f"prompt_learner1.ctx must be [K, n_ctx, W] or [n_ctx, W] (got {list(ctx.shape)})")
    n_ctx = int(ctx.shape[-2])
    pos = _need(state_dict, f"{exp_name}.pos_embedding", 3)
    qkv = _need(state_dict, f"{exp_name}.temporal_transformer.layers.0.0.fn.fn.to_qkv.weight", 2)
    inner = int(qkv.shape[0]) // 3
    if inner % _EXP_TEMPORAL_HEADS:
        raise ReleaseConversionError(f"{exp_name} to_qkv has {inner} inner dims per q/k/v (expected a multiple of "
                                     f"the release's {_EXP_TEMPORAL_HEADS} heads, got {inner})")
    rel = _need(state_dict, f"{au_name}.layers.0.relative_position_bias", 2)
    smooth = _need(state_dict, "au_smooth.weight", 3)
    for name, t in (("vision width (encoder.conv1)", width), ("text width (text_encoder.positional_embedding)", t_width)):
        if t < _CLIP_HEAD_WIDTH or t % _CLIP_HEAD_WIDTH:
            raise ReleaseConversionError(f"{name} {t} does not split into OpenAI-CLIP heads of 64 (expected a "
                                         f"multiple of 64, got {t})")
    arch = ReleaseArchitecture(
        au_dataset=au, expression_dataset=exp, embed_dim=embed_dim, image_size=grid * patch, patch_size=patch,
        vision_width=width, vision_layers=layers, vision_heads=width // _CLIP_HEAD_WIDTH,
        vision_mlp_ratio=v_mlp / width, moe_blocks=tuple(moe), num_experts=n_exp, expert_hidden=hidden,
        text_width=t_width, text_layers=t_layers, text_heads=t_width // _CLIP_HEAD_WIDTH,
        text_mlp_ratio=t_mlp / t_width, context_length=ctx_len, n_ctx=n_ctx, class_specific=ctx.dim() == 3,
        num_frames=int(pos.shape[1]) - 1, exp_depth=_layer_count(state_dict, f"{exp_name}.temporal_transformer.layers."),
        exp_head_dim=inner // _EXP_TEMPORAL_HEADS,
        exp_mlp_dim=int(_need(state_dict, f"{exp_name}.temporal_transformer.layers.0.1.fn.fn.net.0.weight", 2).shape[0]),
        exp_out_proj=f"{exp_name}.temporal_transformer.layers.0.0.fn.fn.to_out.0.weight" in state_dict,
        au_depth=_layer_count(state_dict, f"{au_name}.layers."), au_heads=int(rel.shape[0]),
        au_radius=(int(rel.shape[1]) - 1) // 2, smooth_kernel=int(smooth.shape[-1]), dispatch=dispatch,
    )
    arch.validate()
    return arch


# ------------------------------------------------------------------------------------------------
# parts
# ------------------------------------------------------------------------------------------------
class StoredTextPrototypes(nn.Module):
    """Expression and AU prompt learners over stored prompt embeddings (the release's text side).

    Args:
        expression_prompts: ``() -> T_exp [K, D]`` (a :class:`~facelayers.prompts.StoredPromptLearner`).
        au_prompts: ``() -> T_au [M, D]``.

    Shapes:
        ``forward() -> (T_exp [K, D], T_au [M, D])``, L2-normalised.
    """

    def __init__(self, expression_prompts: nn.Module, au_prompts: nn.Module) -> None:
        super().__init__()
        self.expression_prompts = expression_prompts
        self.au_prompts = au_prompts

    def reset_parameters(self) -> None:
        """Re-initialise both learners' contexts."""
        self.expression_prompts.reset_parameters()
        self.au_prompts.reset_parameters()

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.expression_prompts(), self.au_prompts()


class SmoothedAUHead(nn.Module):
    """An AU head followed by a smoothing of its logits over frames (the release's AU output).

    ``forward(z, text) = smoothing(head(z, text))``; the release computes its per-frame AU logits
    with :class:`~facelayers.heads.LinearCosineHead` and smooths them with
    :class:`~facelayers.heads.AUPairSmoothing` (``ssm/models/bp4d.py``, end of ``forward``); its
    fourth output, the text term, is NOT smoothed (``return_text=True`` gives it).

    Args:
        head: ``head(z [B, T, D], text [M, D]) -> [B, T, M]`` (``return_text=True`` supported).
        smoothing: ``[B, T, M] -> [B, T, M]``.

    Shapes:
        ``forward(z [B, T, D], text [M, D]) -> [B, T, M]`` (or ``(logits, text_term)``).
    """

    def __init__(self, head: nn.Module, smoothing: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.smoothing = smoothing

    def reset_parameters(self) -> None:
        self.head.reset_parameters()
        self.smoothing.reset_parameters()

    def forward(self, z: Tensor, text: Tensor, *, return_text: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if z.dim() != 3:
            raise ValueError(f"SmoothedAUHead needs per-frame features (expected [B, T, D], got {tuple(z.shape)})")
        logits, text_term = self.head(z, text, return_text=True)
        out = self.smoothing(logits)
        return (out, text_term) if return_text else out


class ReleaseSSMModel(SSMModel):
    """The released SSM model, assembled from facelayers parts (:func:`build_release_model`).

    An :class:`~facelayers.models.ssm.SSMModel` with the release's parts and execution:

    * one expert pool shared by both tasks (the release routes no task): every task uses MoE task
      slot 0;
    * two vision passes per forward, expression frames then AU frames, as the release calls its
      encoder twice (with ``dispatch="release"`` the features depend on the other frames of the same
      pass, so this matters);
    * the AU head keeps every frame: ``forward`` returns ``exp_logits [B1, K]`` and ``au_logits
      [B2, T, M]`` (smoothed); :func:`release_outputs` also returns the text terms and the maps.

    Args:
        visual, exp_temporal, au_temporal, exp_head, au_head, text, mapping: the parts, as for
            :class:`~facelayers.models.ssm.SSMModel` (all required here).
        release: the :class:`ReleaseArchitecture` they were built from.
        config: the :class:`~facelayers.models.ssm.ModelConfig` the scripts read
            (:func:`release_model_config`).

    Attributes:
        release: the :class:`ReleaseArchitecture`.
    """

    def __init__(
        self,
        visual: nn.Module,
        exp_temporal: nn.Module,
        au_temporal: nn.Module,
        exp_head: nn.Module,
        au_head: nn.Module,
        text: nn.Module,
        mapping: nn.Module,
        *,
        release: ReleaseArchitecture,
        config: Any = None,
    ) -> None:
        super().__init__(visual, exp_temporal, au_temporal, exp_head, au_head, text, mapping, config=config,
                         vision_passes=2)
        self.release = release

    def load_release_state_dict(self, state_dict: Mapping[str, Tensor], *, source: str = "release state dict") -> None:
        """Load weights given in the release's own key names (``Bp4dSSM`` / ``DisfaSSM``, with or
        without the ``nn.DataParallel`` ``module.`` prefix), checked by :func:`convert_release_state_dict`.

        Raises:
            ReleaseConversionError: naming every missing / unexpected key and shape mismatch.
        """
        sd = release_state_dict(state_dict, source=source)
        self.load_state_dict(convert_release_state_dict(sd, self, source=source), strict=True)

    def _task_slot(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"task must be one of {self.tasks}, got {task!r}")
        return 0

    def forward(self, exp_clips: Tensor | None = None, au_clips: Tensor | None = None, *,
                vision_passes: int | None = None) -> dict[str, Tensor]:
        """As :meth:`SSMModel.forward`, always with the release's two vision passes.

        Args:
            exp_clips: ``[B1, T, 3, H, W]`` or ``None``.
            au_clips: ``[B2, T, 3, H, W]`` or ``None`` (``T`` even: AU logits are smoothed in frame pairs).
            vision_passes: must be ``None`` or 2.

        Returns:
            ``{"exp_logits": [B1, K], "au_logits": [B2, T, M]}`` (the parts given).
        """
        if vision_passes not in (None, 2):
            raise ValueError(f"the release encodes each task's frames in a pass of its own (expected "
                             f"vision_passes=2 or None, got {vision_passes!r})")
        return super().forward(exp_clips, au_clips, vision_passes=2)

    def extra_repr(self) -> str:
        r = self.release
        return (f"release={r.model_class}({r.au_dataset}+{r.expression_dataset}), dispatch={r.dispatch!r}, "
                + super().extra_repr())


def _text_tower(arch: ReleaseArchitecture, factory: dict[str, Any]) -> CLIPTextTower:
    from open_clip.transformer import LayerNorm, QuickGELU, Transformer

    w = arch.text_width
    transformer = Transformer(w, arch.text_layers, arch.text_heads, mlp_ratio=arch.text_mlp_ratio,
                              act_layer=QuickGELU, batch_first=True).to(**factory)
    pos = nn.Parameter(torch.empty(arch.context_length, w, **factory))
    proj = nn.Parameter(torch.empty(w, arch.embed_dim, **factory))
    with torch.no_grad():
        nn.init.normal_(pos, std=0.01)
        nn.init.normal_(proj, std=w**-0.5)
    mask = torch.full((arch.context_length, arch.context_length), float("-inf"), device=factory.get("device")).triu_(1)
    # the release's checkpoints hold no token embedding: the tower only encodes stored embeddings
    return CLIPTextTower(None, pos, transformer, LayerNorm(w).to(**factory), proj, mask,  # type: ignore[arg-type]
                         sequence_first=False, freeze=True)


def _learner(tower: CLIPTextTower, texts: list[str], arch: ReleaseArchitecture, factory: dict[str, Any]) -> StoredPromptLearner:
    k, w, c = len(texts), arch.text_width, arch.n_ctx
    s = arch.context_length - 1 - c
    ctx_shape = (k, c, w) if arch.class_specific else (c, w)
    ctx = torch.empty(ctx_shape, **factory)
    nn.init.normal_(ctx, std=0.02)
    return StoredPromptLearner(tower, torch.zeros(k, 1, w, **factory), torch.zeros(k, s, w, **factory), ctx,
                               StoredPromptLearner.release_token_ids(tower, texts, c).argmax(dim=-1), descriptions=texts, position=arch.position)


def release_model_config(arch: ReleaseArchitecture) -> Any:
    """A :class:`~facelayers.models.ssm.ModelConfig` describing the release model for the scripts
    (vocabularies, ``num_frames``, ``image_size``, tasks; ``backbone="ssm_release"``).

    Only fields that :class:`ModelConfig` has are set; the release's own architecture is
    :class:`ReleaseArchitecture` (``model.release``).
    """
    from .config import ModelConfig

    want: dict[str, Any] = dict(
        mode="ssm", tasks=("exp", "au"), expressions=arch.expressions, aus=arch.aus, backbone="ssm_release",
        clip_kwargs=None, num_frames=arch.num_frames, image_size=arch.image_size, moe=True,
        moe_blocks=",".join(str(b) for b in arch.moe_blocks), num_experts=arch.num_experts, top_k=arch.top_k,
        moe_hidden=arch.expert_hidden, temporal_heads=arch.exp_heads, temporal_depth=arch.exp_depth, au_select="all",
        tsp=True, mapping="dpm", desc_style="compound", n_ctx=arch.n_ctx, tau=_HEAD_TAU, alpha=0.1, beta=0.1,
        dpm_init="prior", dual=True, dpm_variant="ssm_release", prior_source="ssm_release", vision_passes=2,
    )
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in want.items() if k in known})


def build_release_model(arch: ReleaseArchitecture, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> ReleaseSSMModel:
    """The release preset: exactly the released architecture, random initialisation (release-style).

    Args:
        arch: the architecture (:func:`infer_release_architecture` reads it from a checkpoint).
        device, dtype: of the parameters.

    Returns:
        A :class:`ReleaseSSMModel` in train mode (load weights with :func:`convert_release_checkpoint`
        or :func:`load_release_model`).
    """
    from open_clip.transformer import QuickGELU, VisionTransformer

    from facelayers.moe import SSM_RELEASE_MOE_KWARGS, ReleaseMisroutedTopKRouter, TaskTopKRouter, inject_moe_

    arch.validate()
    factory = {"device": device, "dtype": dtype}
    d = arch.embed_dim
    visual = VisionTransformer(arch.image_size, arch.patch_size, arch.vision_width, arch.vision_layers,
                               arch.vision_heads, arch.vision_mlp_ratio, output_dim=d, act_layer=QuickGELU)
    visual = visual.to(**{k: v for k, v in factory.items() if v is not None})
    moe_kwargs = dict(SSM_RELEASE_MOE_KWARGS)
    moe_kwargs.update(num_experts=arch.num_experts, hidden_dim=arch.expert_hidden, top_k=arch.top_k)
    router = ReleaseMisroutedTopKRouter if arch.dispatch == "release" else TaskTopKRouter
    inject_moe_(visual, blocks=list(arch.moe_blocks), shared_activation="gelu", router_layer=router, **moe_kwargs)

    tower = _text_tower(arch, {k: v for k, v in factory.items() if v is not None})
    exp_texts, au_texts = facs.release_descriptions(arch.au_dataset, arch.expression_dataset)
    text = StoredTextPrototypes(_learner(tower, exp_texts, arch, factory), _learner(tower, au_texts, arch, factory))
    prior = facs.release_prior_table(arch.au_dataset, len(arch.expressions))
    neutral = [i for i, n in enumerate(arch.expressions) if not facs.EXPRESSIONS[n].aus]
    mapping = ReleasePriorMapping(prior, fixed_rows=neutral, **factory)
    exp_temporal = GatedClsTemporalHead(d, depth=arch.exp_depth, heads=arch.exp_heads, head_dim=arch.exp_head_dim,
                                        mlp_dim=arch.exp_mlp_dim, max_frames=arch.num_frames, **factory)
    au_temporal = LocalFrameTemporalHead(d, depth=arch.au_depth, heads=arch.au_heads, radius=arch.au_radius,
                                         max_update=arch.au_max_update, select="all", **factory)
    head_kw = dict(scale=_HEAD_SCALE, tau=_HEAD_TAU, normalize_text=False, **factory)
    exp_head = LinearCosineHead(d, len(arch.expressions), **head_kw)
    au_head = SmoothedAUHead(LinearCosineHead(d, len(arch.aus), **head_kw),
                             AUPairSmoothing(len(arch.aus), group_size=_SMOOTH_GROUP, kernel_size=arch.smooth_kernel,
                                             **factory))
    model = ReleaseSSMModel(visual, exp_temporal, au_temporal, exp_head, au_head, text, mapping,
                            config=release_model_config(arch), release=arch)
    return model


# ------------------------------------------------------------------------------------------------
# weights: release names -> facelayers names
# ------------------------------------------------------------------------------------------------
def _vision_rules(arch: ReleaseArchitecture) -> list[tuple[re.Pattern[str], str]]:
    return [
        (re.compile(r"^encoder\.transformer\.resblocks\.(\d+)\.mlp\.shared_fc1\.(weight|bias)$"),
         r"visual.transformer.resblocks.\1.mlp.shared.c_fc.\2"),
        (re.compile(r"^encoder\.transformer\.resblocks\.(\d+)\.mlp\.shared_fc2\.(weight|bias)$"),
         r"visual.transformer.resblocks.\1.mlp.shared.c_proj.\2"),
        (re.compile(r"^encoder\.transformer\.resblocks\.(\d+)\.mlp\.alpha$"), r"visual.transformer.resblocks.\1.mlp.gamma"),
        (re.compile(r"^encoder\.(.*)$"), r"visual.\1"),
    ]


def _static_rules(arch: ReleaseArchitecture) -> list[tuple[re.Pattern[str], str]]:
    exp_name, au_name = _TEMPORAL_NAMES[arch.model_class]
    e, a = re.escape(exp_name), re.escape(au_name)
    return [
        (re.compile(r"^prompt_learner1\.(ctx|token_prefix|token_suffix)$"), r"text.expression_prompts.\1"),
        (re.compile(r"^prompt_learner2\.(ctx|token_prefix|token_suffix)$"), r"text.au_prompts.\1"),
        (re.compile(r"^delta_map1$"), "mapping.delta_au2exp"),
        (re.compile(r"^delta_map2$"), "mapping.delta_exp2au"),
        (re.compile(r"^alpha$"), "mapping.alpha_param"),
        (re.compile(r"^beta$"), "mapping.beta_param"),
        (re.compile(rf"^{e}\.cls_token$"), "exp_temporal.cls_token"),
        (re.compile(rf"^{e}\.pos_embedding$"), "exp_temporal.pos_embed"),
        (re.compile(rf"^{e}\.gate$"), "exp_temporal.gate"),
        (re.compile(rf"^{e}\.ln\.(weight|bias)$"), r"exp_temporal.norm.\1"),
        (re.compile(rf"^{e}\.temporal_transformer\.layers\.(\d+)\.0\.fn\.norm\.(weight|bias)$"), r"exp_temporal.blocks.\1.norm1.\2"),
        (re.compile(rf"^{e}\.temporal_transformer\.layers\.(\d+)\.0\.fn\.fn\.to_qkv\.weight$"), r"exp_temporal.blocks.\1.qkv.weight"),
        (re.compile(rf"^{e}\.temporal_transformer\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.(weight|bias)$"), r"exp_temporal.blocks.\1.proj.\2"),
        (re.compile(rf"^{e}\.temporal_transformer\.layers\.(\d+)\.1\.fn\.norm\.(weight|bias)$"), r"exp_temporal.blocks.\1.norm2.\2"),
        (re.compile(rf"^{e}\.temporal_transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.0\.(weight|bias)$"), r"exp_temporal.blocks.\1.fc1.\2"),
        (re.compile(rf"^{e}\.temporal_transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.3\.(weight|bias)$"), r"exp_temporal.blocks.\1.fc2.\2"),
        (re.compile(rf"^{a}\.layers\.(\d+)\.norm\.(weight|bias)$"), r"au_temporal.layers.\1.norm.\2"),
        (re.compile(rf"^{a}\.layers\.(\d+)\.to_q\.weight$"), r"au_temporal.layers.\1.q_proj.weight"),
        (re.compile(rf"^{a}\.layers\.(\d+)\.to_k\.weight$"), r"au_temporal.layers.\1.k_proj.weight"),
        (re.compile(rf"^{a}\.layers\.(\d+)\.relative_position_bias$"), r"au_temporal.layers.\1.rel_pos_bias"),
        (re.compile(rf"^{a}\.layers\.(\d+)\.channel_gate$"), r"au_temporal.layers.\1.channel_gate"),
        (re.compile(r"^dfer_head\.(weight|bias)$"), r"exp_head.linear.\1"),
        (re.compile(r"^au_head\.(weight|bias)$"), r"au_head.head.linear.\1"),
        (re.compile(r"^au_smooth\.weight$"), "au_head.smoothing.weight"),
    ]


_MOE_ROUTER = re.compile(r"^encoder\.transformer\.resblocks\.(\d+)\.mlp\.gate\.(weight|bias)$")
_MOE_EXPERT = re.compile(r"^encoder\.transformer\.resblocks\.(\d+)\.mlp\.private_experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$")
_MOE_ALIAS = re.compile(r"^encoder\.transformer\.resblocks\.(\d+)\.mlp\.shared_expert\.([02])\.(weight|bias)$")
_TEXT = re.compile(r"^text_encoder\.(.*)$")


def convert_release_state_dict(
    state_dict: Mapping[str, Tensor], model: ReleaseSSMModel, *, source: str = "release checkpoint"
) -> dict[str, Tensor]:
    """Rename / reshape a release state dict into ``model``'s state dict names, checking everything.

    Checks: every release key is used (or is a checked alias / derived buffer: the MoE
    ``shared_expert.*`` aliases of ``shared_fc1`` / ``shared_fc2``, the DPM ``init_map`` and
    ``row_targets_*``, which must equal the preset's prior table and its sums); every parameter of
    ``model`` receives a value; every shape fits.

    Args:
        state_dict: release key names (no ``module.`` prefix).
        model: the model built for the checkpoint's architecture.
        source: a name for error messages.

    Returns:
        ``{facelayers name: tensor}`` covering ``model.state_dict()`` (buffers the preset derives
        itself keep the model's values).

    Raises:
        ReleaseConversionError: naming every missing / unexpected key and every shape mismatch.
    """
    arch = model.release
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    problems: list[str] = []
    rules = _static_rules(arch) + _vision_rules(arch)
    tower_paths = [n[: -len("positional_embedding")] for n in target if n.endswith("tower.positional_embedding")]
    experts: dict[tuple[int, str, str], dict[int, Tensor]] = {}

    def put(name: str, value: Tensor, src: str) -> None:
        if name not in target:
            unexpected.append(f"{src} (-> {name})")
            return
        if tuple(target[name].shape) != tuple(value.shape):
            mismatched.append(f"{src} -> {name}: expected {list(target[name].shape)}, got {list(value.shape)}")
            return
        out[name] = value

    for key, value in state_dict.items():
        if key in ("init_map", "row_targets_au2emo", "row_targets_emo2au"):
            continue
        if _MOE_ALIAS.match(key):
            i, j, p = _MOE_ALIAS.match(key).groups()  # type: ignore[union-attr]
            orig = f"encoder.transformer.resblocks.{i}.mlp.shared_fc{1 if j == '0' else 2}.{p}"
            if orig not in state_dict or not torch.equal(state_dict[orig], value):
                problems.append(f"{key} differs from {orig} (expected the same tensor: the release's shared expert "
                                "holds its fc layers twice)")
            continue
        m = _MOE_ROUTER.match(key)
        if m:
            put(f"visual.transformer.resblocks.{m.group(1)}.mlp.router.{m.group(2)}", value.unsqueeze(0), key)
            continue
        m = _MOE_EXPERT.match(key)
        if m:
            blk, e, fc, p = m.groups()
            experts.setdefault((int(blk), fc, p), {})[int(e)] = value
            continue
        m = _TEXT.match(key)
        if m:
            if not tower_paths:
                unexpected.append(key)
            for tp in tower_paths:
                put(tp + m.group(1), value, key)
            continue
        for pat, repl in rules:
            if pat.match(key):
                put(pat.sub(repl, key), value, key)
                break
        else:
            unexpected.append(key)

    for (blk, fc, p), by_e in sorted(experts.items()):
        n = arch.num_experts
        if sorted(by_e) != list(range(n)):
            problems.append(f"encoder.transformer.resblocks.{blk}.mlp.private_experts.*.{fc}.{p}: experts "
                            f"{sorted(by_e)} (expected 0..{n - 1})")
            continue
        stacked = torch.stack([by_e[e] for e in range(n)])  # [E, out, in] or [E, out]
        if p == "weight":
            stacked = stacked.transpose(1, 2)  # the bank stores [E, in, out]
        name = f"visual.transformer.resblocks.{blk}.mlp.experts.{'w' if p == 'weight' else 'b'}{fc[-1]}"
        put(name, stacked.unsqueeze(0).contiguous(), f"encoder.transformer.resblocks.{blk}.mlp.private_experts.*.{fc}.{p}")

    # derived release buffers must agree with the preset
    prior = model.mapping.prior
    init = state_dict.get("init_map")
    if init is None:
        problems.append("init_map is missing (expected the release's prior table)")
    elif tuple(init.shape) != tuple(prior.shape) or not torch.allclose(init.to(prior), prior, rtol=0, atol=1e-6):
        problems.append(f"init_map differs from the release prior table of {arch.au_dataset}+{arch.expression_dataset} "
                        f"(expected facs.release_prior_table({arch.au_dataset!r}, {prior.shape[0]}), got another "
                        f"{list(init.shape)} table: is the dataset pair right?)")
    else:
        for key, want in (("row_targets_au2emo", init.sum(1)), ("row_targets_emo2au", init.sum(0))):
            got = state_dict.get(key)
            if got is None or tuple(got.shape) != tuple(want.shape) or not torch.allclose(got, want, atol=1e-5):
                problems.append(f"{key} is not the row mass of init_map (expected {want.tolist()}, got "
                                f"{None if got is None else got.tolist()})")
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(f"{n} (release {_release_hint(n, arch)})" for n in target if n not in out and n in params)
    if missing or unexpected or mismatched or problems:
        parts = []
        if missing:
            parts.append(f"missing (no release key for) {missing}")
        if unexpected:
            parts.append(f"unexpected {sorted(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched}")
        parts.extend(problems)
        raise ReleaseConversionError(f"{source} does not fit the released {arch.model_class} "
                                     f"({arch.au_dataset}+{arch.expression_dataset}): " + "; ".join(parts))
    for n, t in target.items():
        out.setdefault(n, t)
    return out


def _release_hint(name: str, arch: ReleaseArchitecture) -> str:
    """Where a facelayers parameter comes from in the release (for error messages)."""
    exp_name, au_name = _TEMPORAL_NAMES[arch.model_class]
    same = (("visual.", "encoder."), ("text.expression_prompts.tower.", "text_encoder."),
            ("text.au_prompts.tower.", "text_encoder."), ("text.expression_prompts.", "prompt_learner1."),
            ("text.au_prompts.", "prompt_learner2."))
    renamed = (("mapping.delta_au2exp", "delta_map1"), ("mapping.delta_exp2au", "delta_map2"),
               ("mapping.alpha_param", "alpha"), ("mapping.beta_param", "beta"), ("exp_temporal.", f"{exp_name}.*"),
               ("au_temporal.", f"{au_name}.*"), ("exp_head.linear.", "dfer_head.*"), ("au_head.head.linear.", "au_head.*"),
               ("au_head.smoothing.", "au_smooth.weight"))
    for ours, theirs in same:
        if name.startswith(ours):
            rest = name[len(ours):]
            return theirs + (rest.split(".mlp.")[0] + ".mlp.*" if ".mlp." in rest and ours == "visual." else rest)
    for ours, theirs in renamed:
        if name.startswith(ours):
            return theirs
    return "?"


def convert_release_checkpoint(
    path: str | os.PathLike, au_dataset: str, expression_dataset: str, *, dispatch: str = "release",
) -> ReleaseSSMModel:
    """Read a release ``.pth`` safely, infer its architecture, build the preset and load the weights.

    Args:
        path: the release runner's checkpoint (``checkpoint.pth``, ``best_emotion.pth``) or a bare
            state dict (``best_au.pth``); read by :func:`load_release_checkpoint` (nothing in the file
            is executed).
        au_dataset: ``"bp4d"`` or ``"disfa"``.
        expression_dataset: ``"dfew"``, ``"ferv39k"`` or ``"mafw"``.
        dispatch: ``"release"`` (default: the released outputs) or ``"fixed"`` (correct routing).

    Returns:
        The model in eval mode, on CPU, float32 (``model.release`` has the architecture).

    Raises:
        UnsafeCheckpointError, CheckpointFormatError: from the safe loader.
        ReleaseConversionError: the weights do not fit (every key at fault named).
        ValueError: unknown dataset / dispatch names.
    """
    src = os.fspath(path)
    sd = release_state_dict(load_release_checkpoint(path), source=src)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    arch = infer_release_architecture(sd, au_dataset, expression_dataset, dispatch=dispatch)
    model = build_release_model(arch)
    model.load_release_state_dict(sd, source=src)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def release_outputs(model: ReleaseSSMModel, exp_clips: Tensor, au_clips: Tensor) -> dict[str, Tensor]:
    """The six outputs of the release's ``forward`` (``Bp4dSSM.forward`` / ``DisfaSSM.forward``).

    Args:
        model: a :class:`ReleaseSSMModel`.
        exp_clips: ``[B1, T, 3, H, W]``.
        au_clips: ``[B2, T, 3, H, W]``.

    Returns:
        dict with ``exp_logits [B1, K]``, ``exp_text_logits [B1, K]`` (``0.1 * cos / 0.01``),
        ``au_logits [B2, T, M]`` (smoothed), ``au_text_logits [B2, T, M]`` (unsmoothed text term),
        ``map_au2exp [K, M]``, ``map_exp2au [M, K]``. The release returns the AU tensors flat,
        ``[B2 * T, M]``.
    """
    for name, c in (("exp_clips", exp_clips), ("au_clips", au_clips)):
        if not isinstance(c, Tensor) or c.dim() != 5 or c.shape[2] != 3:
            raise ValueError(f"{name}: expected [B, T, 3, H, W], got {tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
    b1, t1 = exp_clips.shape[:2]
    b2, t2 = au_clips.shape[:2]
    t_exp, t_au = model.text_features()
    f_exp = model.encode_task_frames(exp_clips.flatten(0, 1), "exp").reshape(b1, t1, -1)
    exp_logits, exp_text = model.exp_head(model.exp_temporal(f_exp), t_exp, return_text=True)
    f_au = model.encode_task_frames(au_clips.flatten(0, 1), "au").reshape(b2, t2, -1)
    au_logits, au_text = model.au_head(model.au_temporal(f_au), t_au, return_text=True)
    a, b = model.mapping.maps()
    return {"exp_logits": exp_logits, "exp_text_logits": exp_text, "au_logits": au_logits,
            "au_text_logits": au_text, "map_au2exp": a, "map_exp2au": b}


# ------------------------------------------------------------------------------------------------
# save / load (safetensors + JSON)
# ------------------------------------------------------------------------------------------------
def _paths(folder: str | os.PathLike, name: str) -> tuple[str, str]:
    folder = os.fspath(folder)
    return os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.safetensors")


def save_release_model(model: ReleaseSSMModel, folder: str | os.PathLike, *, name: str = "model",
                       extra: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """Write ``{folder}/{name}.safetensors`` (weights; kind ``"ssm_release"``, the architecture and
    config in its metadata) + ``{folder}/{name}.json`` (``{"config": ModelConfig, "release":
    ReleaseArchitecture, **extra}``). Returns both paths."""
    if not isinstance(model, ReleaseSSMModel):
        raise TypeError(f"save_release_model needs a ReleaseSSMModel (expected one, got {type(model).__name__})")
    json_path, st_path = _paths(folder, name)
    cfg = model.cfg.to_json() if model.cfg is not None else release_model_config(model.release).to_json()
    rel = model.release.to_json()
    meta = {"format": "pt", _META_KIND: RELEASE_KIND, _META_RELEASE: json.dumps(rel, sort_keys=True),
            _META_CONFIG: json.dumps(cfg, sort_keys=True),
            "facelayers.expressions": json.dumps(list(model.release.expressions)),
            "facelayers.aus": json.dumps(list(model.release.aus))}
    save_module(model, st_path, metadata=meta)
    write_json(json_path, {"config": cfg, "release": rel, **dict(extra or {})})
    return st_path, json_path


def is_release_checkpoint(folder: str | os.PathLike, name: str = "model") -> bool:
    """True when ``{folder}/{name}.safetensors`` is a converted release model (metadata kind
    ``"ssm_release"``); reads the header only."""
    _, st_path = _paths(folder, name)
    if not os.path.isfile(st_path):
        return False
    return inspect_safetensors(st_path).metadata.get(_META_KIND) == RELEASE_KIND


def load_release_model(folder: str | os.PathLike, name: str = "model", *,
                       device: str | torch.device = "cpu") -> ReleaseSSMModel:
    """Rebuild a converted release model from ``{name}.json`` + ``{name}.safetensors`` (checked:
    kind, architecture in the JSON equals the weights file's, every tensor's shape, finite values).

    Raises:
        CheckpointError: naming the file and the field / tensor at fault.
    """
    json_path, st_path = _paths(folder, name)
    header = inspect_safetensors(st_path)
    kind = header.metadata.get(_META_KIND)
    if kind != RELEASE_KIND:
        raise CheckpointError(st_path, f"is not a converted release model (expected metadata {_META_KIND}="
                                       f"{RELEASE_KIND!r}, got {kind!r})", field=_META_KIND)
    if not os.path.isfile(json_path):
        raise CheckpointError(json_path, f"no checkpoint config (expected {name}.json beside {name}.safetensors)")
    meta = read_json(json_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("release"), dict):
        raise CheckpointError(json_path, "expected a JSON object with a 'release' object", field="release")
    try:
        stored = json.loads(header.metadata.get(_META_RELEASE, "null"))
    except json.JSONDecodeError as err:
        raise CheckpointError(st_path, f"metadata {_META_RELEASE!r} is not valid JSON ({err.msg})", field=_META_RELEASE) from None
    for key in sorted(set(stored or {}) | set(meta["release"])):
        if (stored or {}).get(key) != meta["release"].get(key):
            raise CheckpointError(json_path, f"disagrees with the weights file {os.path.basename(st_path)} (expected "
                                             f"{(stored or {}).get(key)!r}, got {meta['release'].get(key)!r})",
                                  field=f"release.{key}")
    try:
        arch = ReleaseArchitecture.from_json(meta["release"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(json_path, f"invalid release architecture: {err}", field="release") from None
    model = build_release_model(arch)
    load_module(model, st_path, header=header)
    return model.to(device).eval()
