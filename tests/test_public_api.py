"""Pins the flat public API of `facelayers` (update deliberately when an issue adds names)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

import facelayers

EXPECTED = set(
    """
    __version__ AU au_auc au_descriptions au_f1 au_loss AUClipDataset AUMeter AUPairSmoothing
    AURecord AUS BP4D_AUS build_prior_mapping check_descriptions checkpoint_moe_blocks_
    CheckpointError ClipMixup ClipTemporalHead CLIPTextTower confusion_matrix CosineClassifier
    current_task_ids data DISFA_AUS DynamicPriorMapping eval_transform Expression
    expression_descriptions expression_loss ExpressionClipDataset ExpressionMeter
    ExpressionRecord EXPRESSIONS EXPRESSIONS_11 EXPRESSIONS_7 facs FrameTemporalHead
    GatedClsTemporalHead get_split group_by_subject grouped_expert_mlp GroupedExperts
    HeterogeneousLoader inject_moe_ inspect_safetensors iter_moe_layers joint_loss
    LEGACY_PARAMETER_NAMES LinearCosineHead LinearSemanticMapping list_splits load_module
    load_pre_injection_state_dict LocalFrameAttention LocalFrameTemporalHead ManifestError
    ManifestValidationError map_pre_injection_state_dict MissingTaskIdsWarning mix_clips
    mixup_loss MLPSemanticMapping moe_aux_loss moe_load_stats moe_parameter_groups
    moe_task_context moe_task_state MoEFFN MovingMeanLossBalance named_moe_layers
    optimizer_param_groups ParameterEMA parse_subject per_class_recall pretrained_and_new
    prior_matrix PromptLearner read_manifest release_descriptions ReleaseMisroutedTopKRouter
    ReleasePriorMapping RouterOutput save_module seen_unseen_curve segment_indices set_shared_activation_
    sigmoid_ramp Split SSM_RELEASE_MOE_KWARGS StoredPromptLearner subject_split
    SyntheticAUDataset SyntheticExpressionDataset TABLE_S4_AUS TaskTopKRouter
    TemporalTransformer TextPrototypes TokenLayout train_transform tuned_au_f1 uar
    UnknownLabelError validate_manifest ValidationReport war write_manifest
    """.split()
)  # sorted case-insensitively; update deliberately when an issue adds names


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
