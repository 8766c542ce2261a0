"""The reference SSM model (Sun et al., "SSM"): config, model from injected parts, builders,
self-checking safetensors + JSON checkpoints, video inference and the benchmark's data.

::

    from facelayers.models.ssm import ModelConfig, build_model, save_model, load_model

    model = build_model(ModelConfig(mode="ssm", num_frames=4, moe_blocks="all", temporal_heads=4))
    out = model(exp_clips, au_clips)            # {"exp_logits": [B1, K], "au_logits": [B2, M]}
    save_model(model, "run/checkpoint", name="best")
    model = load_model("run/checkpoint", "best")

The training / evaluation recipe is ``examples/ssm_reference.py`` (see ``docs/reference.md``).
"""

from __future__ import annotations

from .builders import (
    BackboneUnavailableError, build_backbone, build_heads, build_mapping, build_model,
    build_optimizer, build_scheduler, build_temporal_heads, build_text_side, build_vision_encoder,
    checkpoint_vision_blocks_, descriptions_for, moe_block_indices, moe_hidden_default,
    vision_layers, vision_width,
)
from .checkpoint import (
    CHECKPOINT_KIND, VocabularyMismatchError, check_vocabularies, load_model, load_weights,
    read_checkpoint_config, resolve_checkpoint, save_model, upgrade_checkpoint, verify_checkpoint,
)
from .config import EXECUTION_FIELDS, MAPPINGS, MODES, TINY_CLIP, ModelConfig, tiny_clip_kwargs
from .model import SSMModel
from .release import (
    ReleaseArchitecture, ReleaseConversionError, ReleaseSSMModel, build_release_model,
    convert_release_checkpoint, infer_release_architecture, is_release_checkpoint, load_release_model,
    release_outputs, save_release_model,
)
from .release_recipe import (
    ReleaseLoss, ReleaseObjective, ReleaseRecipe, ReleaseRecipeConfig, freeze_text_towers_,
    release_model_from_clip, release_optimizer, release_param_groups, release_scheduler,
    release_train_step, release_tuned_au_f1, set_router_noise_,
)
from .release_checkpoint import (
    CheckpointFormatError, UnsafeCheckpointError, load_release_checkpoint, release_state_dict,
)

__all__ = [
    "ModelConfig", "MODES", "MAPPINGS", "EXECUTION_FIELDS", "TINY_CLIP", "tiny_clip_kwargs",
    "SSMModel", "BackboneUnavailableError", "build_backbone", "build_vision_encoder",
    "build_text_side", "build_mapping", "build_temporal_heads", "build_heads", "build_model",
    "build_optimizer", "build_scheduler", "checkpoint_vision_blocks_", "descriptions_for",
    "moe_block_indices", "moe_hidden_default", "vision_layers", "vision_width", "CHECKPOINT_KIND",
    "VocabularyMismatchError", "check_vocabularies", "load_model", "load_weights",
    "read_checkpoint_config", "resolve_checkpoint", "save_model", "verify_checkpoint",
    "upgrade_checkpoint",
    # the released SSM (opt-in preset + safe checkpoint import; docs/release.md)
    "ReleaseArchitecture", "ReleaseConversionError", "ReleaseSSMModel", "build_release_model",
    "convert_release_checkpoint", "infer_release_architecture", "is_release_checkpoint",
    "load_release_model", "release_outputs", "save_release_model", "CheckpointFormatError",
    "UnsafeCheckpointError", "load_release_checkpoint", "release_state_dict",
    # the release's training recipe (docs/release.md, "Training recipe")
    "ReleaseLoss", "ReleaseObjective", "ReleaseRecipe", "ReleaseRecipeConfig", "freeze_text_towers_",
    "release_model_from_clip", "release_optimizer", "release_param_groups", "release_scheduler",
    "release_train_step", "release_tuned_au_f1", "set_router_noise_",
]
