"""Pins the flat public API of `facelayers` (update deliberately when an issue adds names)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

import facelayers

EXPECTED = {
    "__version__",
    # facs
    "facs", "AU", "AUS", "BP4D_AUS", "DISFA_AUS", "EXPRESSIONS", "EXPRESSIONS_7", "EXPRESSIONS_11",
    "TABLE_S4_AUS", "Expression", "UnknownLabelError", "au_descriptions", "expression_descriptions",
    "prior_matrix", "release_descriptions", "check_descriptions",
    # MoE
    "MoEFFN", "moe_task_context", "moe_aux_loss", "moe_load_stats", "SSM_RELEASE_MOE_KWARGS",
    "inject_moe_", "map_pre_injection_state_dict", "load_pre_injection_state_dict",
    "moe_parameter_groups", "grouped_expert_mlp", "TaskTopKRouter", "ReleaseMisroutedTopKRouter",
    "RouterOutput", "TokenLayout", "GroupedExperts", "LEGACY_PARAMETER_NAMES", "MissingTaskIdsWarning",
    "set_shared_activation_", "current_task_ids", "iter_moe_layers", "named_moe_layers",
    "moe_task_state", "checkpoint_moe_blocks_",
    # text side
    "CLIPTextTower", "PromptLearner", "TextPrototypes", "DynamicPriorMapping", "LinearSemanticMapping",
    "MLPSemanticMapping", "CosineClassifier", "ReleasePriorMapping", "build_prior_mapping",
    "LinearCosineHead", "AUPairSmoothing", "StoredPromptLearner",
    # temporal, losses, metrics
    "TemporalTransformer", "ClipTemporalHead", "FrameTemporalHead", "LocalFrameAttention",
    "LocalFrameTemporalHead", "GatedClsTemporalHead", "expression_loss", "au_loss",
    "joint_loss", "au_f1", "au_auc", "per_class_recall", "uar", "war", "confusion_matrix",
    "tuned_au_f1", "AUMeter", "ExpressionMeter",
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
    "ParameterEMA", "ClipMixup", "MovingMeanLossBalance", "mix_clips", "mixup_loss", "sigmoid_ramp",
}


def test_exported_set_is_pinned():
    assert set(facelayers.__all__) == EXPECTED
    assert len(facelayers.__all__) == len(set(facelayers.__all__)), "duplicate names in __all__"


def test_every_exported_name_resolves():
    for name in facelayers.__all__:
        assert getattr(facelayers, name) is not None, name


def test_star_import_matches_all():
    ns: dict = {}
    exec("from facelayers import *", ns)
    assert set(ns) - {"__builtins__"} == set(facelayers.__all__)


def test_import_is_lazy_and_touches_no_cuda():
    code = (
        "import sys, torch, facelayers; "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'; "
        "bad = [m for m in sys.modules if m.endswith('triton_kernels') or m == 'matplotlib']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_version_matches_metadata():
    try:
        installed = version("facelayers")
    except PackageNotFoundError:
        pytest.skip("facelayers is not installed (running from a source tree)")
    assert installed == facelayers.__version__
