"""facelayers: reusable PyTorch layers for facial Action Unit detection and dynamic facial
expression recognition, learned jointly across heterogeneous datasets (the SSM paper).

Public names are re-exported here flat (``from facelayers import DynamicPriorMapping``); the
exported set is pinned by ``tests/test_public_api.py``.
"""

from __future__ import annotations

from . import facs
from .facs import (
    AU, AUS, BP4D_AUS, DISFA_AUS, EXPRESSIONS, EXPRESSIONS_7, EXPRESSIONS_11, TABLE_S4_AUS,
    Expression, UnknownLabelError, au_descriptions, check_descriptions, expression_descriptions,
    prior_matrix, release_descriptions,
)

from . import data
from .data import (
    AUClipDataset, AURecord, ExpressionClipDataset, ExpressionRecord, HeterogeneousLoader,
    ManifestError, ManifestValidationError, Split, ValidationReport, eval_transform, get_split,
    group_by_subject, list_splits, parse_subject, read_manifest, segment_indices, subject_split,
    train_transform, validate_manifest, write_manifest,
)

from .data.synthetic import SyntheticAUDataset, SyntheticExpressionDataset
from .heads import AUPairSmoothing, CosineClassifier, LinearCosineHead
from .prior_mapping import (
    DynamicPriorMapping, LinearSemanticMapping, MLPSemanticMapping, ReleasePriorMapping,
    build_prior_mapping,
)
from .prompts import CLIPTextTower, PromptLearner, StoredPromptLearner, TextPrototypes
from .io import CheckpointError, inspect_safetensors, load_module, save_module
from .params import optimizer_param_groups, pretrained_and_new
from .training import ClipMixup, MovingMeanLossBalance, ParameterEMA, mix_clips, mixup_loss, sigmoid_ramp

from .losses import au_loss, expression_loss, joint_loss
from .metrics import (
    AUMeter, ExpressionMeter, au_auc, au_f1, confusion_matrix, per_class_recall, seen_unseen_curve, tuned_au_f1,
    uar, war,
)
from .temporal import (
    ClipTemporalHead, FrameTemporalHead, GatedClsTemporalHead, LocalFrameAttention,
    LocalFrameTemporalHead, TemporalTransformer,
)

from .moe import (
    LEGACY_PARAMETER_NAMES, SSM_RELEASE_MOE_KWARGS, GroupedExperts, MissingTaskIdsWarning, MoEFFN,
    ReleaseMisroutedTopKRouter, RouterOutput, TaskTopKRouter, TokenLayout, checkpoint_moe_blocks_,
    current_task_ids, inject_moe_, iter_moe_layers, load_pre_injection_state_dict,
    map_pre_injection_state_dict, moe_aux_loss, moe_load_stats, moe_parameter_groups,
    moe_task_context, moe_task_state, named_moe_layers, set_shared_activation_,
)
from .ops.grouped_experts import grouped_expert_mlp

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # facs
    "facs", "AU", "AUS", "BP4D_AUS", "DISFA_AUS", "EXPRESSIONS", "EXPRESSIONS_7", "EXPRESSIONS_11",
    "TABLE_S4_AUS", "Expression", "UnknownLabelError", "au_descriptions",
    "expression_descriptions", "prior_matrix", "release_descriptions", "check_descriptions",
    # MoE
    "MoEFFN", "moe_task_context", "moe_aux_loss", "moe_load_stats", "SSM_RELEASE_MOE_KWARGS",
    "inject_moe_", "map_pre_injection_state_dict", "load_pre_injection_state_dict",
    "moe_parameter_groups", "grouped_expert_mlp", "TaskTopKRouter", "ReleaseMisroutedTopKRouter",
    "RouterOutput", "TokenLayout", "GroupedExperts", "LEGACY_PARAMETER_NAMES",
    "MissingTaskIdsWarning", "set_shared_activation_", "current_task_ids", "iter_moe_layers",
    "named_moe_layers", "moe_task_state", "checkpoint_moe_blocks_",
    # text side
    "CLIPTextTower", "PromptLearner", "TextPrototypes", "DynamicPriorMapping",
    "LinearSemanticMapping", "MLPSemanticMapping", "ReleasePriorMapping", "build_prior_mapping",
    "CosineClassifier", "LinearCosineHead", "AUPairSmoothing", "StoredPromptLearner",
    # temporal, losses, metrics
    "TemporalTransformer", "ClipTemporalHead", "FrameTemporalHead", "LocalFrameAttention",
    "LocalFrameTemporalHead", "GatedClsTemporalHead", "expression_loss", "au_loss", "joint_loss",
    "au_f1", "au_auc", "per_class_recall", "uar", "war", "confusion_matrix", "tuned_au_f1", "seen_unseen_curve",
    "AUMeter", "ExpressionMeter",
    # data
    "data", "AUClipDataset", "AURecord", "ExpressionClipDataset", "ExpressionRecord",
    "HeterogeneousLoader", "ManifestError", "ManifestValidationError", "Split", "ValidationReport",
    "eval_transform", "get_split", "list_splits", "read_manifest", "segment_indices",
    "train_transform", "validate_manifest", "write_manifest", "SyntheticAUDataset",
    "SyntheticExpressionDataset", "parse_subject", "group_by_subject", "subject_split",
    # checkpoints and parameter groups
    "CheckpointError", "inspect_safetensors", "save_module", "load_module", "pretrained_and_new",
    "optimizer_param_groups",
    # training utilities
    "ParameterEMA", "ClipMixup", "MovingMeanLossBalance", "mix_clips", "mixup_loss",
    "sigmoid_ramp",
]
