"""The reference SSM's configuration: everything needed to rebuild the model (stored as JSON
beside the weights, and inside the weights file's metadata)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any

from facelayers import facs

__all__ = ["ModelConfig", "MODES", "MAPPINGS", "TINY_CLIP", "tiny_clip_kwargs", "EXECUTION_FIELDS"]

#: The default tiny CLIP: random init, no download; small enough that the default run trains in
#: minutes on 2 CPU cores, big enough (32 px, 8 px patches -> 16 patches) to see the synthetic AUs.
TINY_CLIP: dict[str, Any] = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)

MODES = ("stl", "baseline", "ssm")
MAPPINGS = ("dpm", "linear", "mlp", "none")
_DPM_VARIANTS = ("paper", "ssm_release")
_DPM_INITS = ("prior", "random")
_AU_SELECT = ("center", "all")

#: Fields that change how the model runs, never what it computes (a checkpoint may be loaded with
#: other values; see docs/reference.md "Execution options").
EXECUTION_FIELDS = ("grad_checkpoint", "vision_passes", "cache_in_eval", "moe_backend")


def tiny_clip_kwargs(image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 2) -> dict[str, Any]:
    """``open_clip.CLIP`` kwargs of a tiny random-init CLIP (text tower fixed: width 64, 2 layers).

    Raises:
        ValueError: a non-positive size, or a patch that does not tile the image.
    """
    for name, v in (("image_size", image_size), ("patch_size", patch_size), ("width", width), ("layers", layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"tiny CLIP {name} must be a positive int (expected >= 1, got {v!r})")
    if image_size % patch_size:
        raise ValueError(f"tiny CLIP patch_size must divide image_size (expected a divisor of {image_size}, "
                         f"got {patch_size})")
    if width % 32:
        raise ValueError(f"tiny CLIP width must be a multiple of the head width 32 (expected 32, 64, ..., got {width})")
    return dict(
        embed_dim=width,
        vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


def _pos_int(name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (expected >= {minimum}, got {v!r})")


def _pos_float(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0 (expected > 0, got {v!r})")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the reference SSM (see :func:`~facelayers.models.ssm.build_model`).

    ``tasks`` is ``("exp", "au")`` for the joint modes, a single task for ``mode="stl"``.
    Execution options (:data:`EXECUTION_FIELDS`) never change results.
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
        """A JSON-ready dict (tuples as lists)."""
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["expressions"] = list(self.expressions)
        d["aus"] = list(self.aus)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: ``d`` is not a dict or has keys the config does not know.
        """
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a JSON object (expected a dict, got {type(d).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown} (expected keys among {sorted(known)}, got {unknown})")
        d = copy.deepcopy(d)
        for k in ("tasks", "expressions", "aus"):
            if k in d:
                if not isinstance(d[k], (list, tuple)):
                    raise ValueError(f"model config {k!r} must be a list (expected a list, got {d[k]!r})")
                d[k] = tuple(d[k])
        return cls(**d)

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the field, what was expected and what it holds.
        """
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        if not self.tasks or any(t not in ("exp", "au") for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty subset of ('exp', 'au'), got {self.tasks!r}")
        if self.mode == "stl" and len(self.tasks) != 1:
            raise ValueError(f"mode 'stl' trains one task, got tasks={self.tasks!r}")
        if self.mode != "stl" and tuple(self.tasks) != ("exp", "au"):
            raise ValueError(f"mode {self.mode!r} trains both tasks, got tasks={self.tasks!r}")
        facs.check_vocabulary(self.expressions, "expression")
        facs.check_vocabulary(self.aus, "au")
        if self.vision_passes not in (1, 2):
            raise ValueError(f"vision_passes must be 1 (one concatenated pass) or 2 (one per task), got {self.vision_passes!r}")
        from facelayers.ops.grouped_experts import available_backends

        if self.moe_backend not in available_backends():
            raise ValueError(f"moe_backend must be one of {available_backends()}, got {self.moe_backend!r}")
        _pos_int("num_frames", self.num_frames)
        _pos_int("image_size", self.image_size)
        _pos_int("num_experts", self.num_experts)
        _pos_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts (expected <= {self.num_experts}, got {self.top_k})")
        if self.moe_hidden is not None:
            _pos_int("moe_hidden", self.moe_hidden)
        _pos_int("temporal_heads", self.temporal_heads)
        _pos_int("temporal_depth", self.temporal_depth)
        _pos_int("n_ctx", self.n_ctx)
        if self.au_select not in _AU_SELECT:
            raise ValueError(f"au_select must be one of {_AU_SELECT}, got {self.au_select!r}")
        if self.desc_style not in facs.DESCRIPTION_STYLES:
            raise ValueError(f"desc_style must be one of {facs.DESCRIPTION_STYLES}, got {self.desc_style!r}")
        if self.dpm_variant not in _DPM_VARIANTS:
            raise ValueError(f"dpm_variant must be one of {_DPM_VARIANTS}, got {self.dpm_variant!r}")
        if self.dpm_init not in _DPM_INITS:
            raise ValueError(f"dpm_init must be one of {_DPM_INITS}, got {self.dpm_init!r}")
        _pos_float("tau", self.tau)
        _pos_float("dpm_tau", self.dpm_tau)
        if not isinstance(self.moe_blocks, str):
            raise ValueError(f"moe_blocks must be a block spec string ('all', 'last:N', '0,3', 'none'), "
                             f"got {self.moe_blocks!r}")

    @property
    def uses_text(self) -> bool:
        """TSP text prototypes and cosine heads (mode ``"ssm"`` with ``tsp``)."""
        return self.mode == "ssm" and self.tsp

    @property
    def uses_mapping(self) -> bool:
        """A mapping between the two vocabularies' text features (both tasks, TSP, not ``"none"``)."""
        return self.uses_text and self.mapping != "none" and len(self.tasks) == 2
