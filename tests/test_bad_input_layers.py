"""Bad input to the losses, metrics and temporal / head layers: clear errors, one wording, no host syncs.

Every error names what was expected and what came, as ``... (expected X, got Y)``. Empty batches are
errors in the losses and ``au_f1`` as in ``uar`` / ``war``. Value checks never read tensors back from
an accelerator: run on ``meta`` tensors (which have no values at all), the hot paths must not touch a
value.
"""

from __future__ import annotations

import pytest
import torch

from facelayers.heads import AUPairSmoothing, CosineClassifier, LinearCosineHead
from facelayers.losses import au_loss, expression_loss, joint_loss
from facelayers.metrics import au_f1, tuned_au_f1, uar, war
from facelayers.prior_mapping import DynamicPriorMapping, ReleasePriorMapping
from facelayers.temporal import (
    ClipTemporalHead,
    FrameTemporalHead,
    GatedClsTemporalHead,
    LocalFrameTemporalHead,
    TemporalTransformer,
)

WORDING = r"\(expected .+, got .+\)"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: expression_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), r"non-empty batch.*\(0, 3\)"),
        (lambda: expression_loss(torch.zeros(0, 3), torch.zeros(0, 3)), r"non-empty batch.*\(0, 3\)"),
        (lambda: au_loss(torch.zeros(0, 4), torch.zeros(0, 4)), r"non-empty batch.*\(0, 4\)"),
        (lambda: au_loss(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4)), r"non-empty batch.*\(2, 0, 4\)"),
        (lambda: au_f1(torch.zeros(0, 4), torch.zeros(0, 4)), r"at least one frame.*N >= 1.*\(0, 4\)"),
        (lambda: uar(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3), "N=0"),
        (lambda: war(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)), "N=0"),
        (lambda: tuned_au_f1(torch.zeros(0, 2), torch.zeros(0, 2)), r"N >= 1"),
    ],
    ids=["ce-index", "ce-soft", "bce", "bce-T0", "au_f1", "uar", "war", "tuned"],
)
def test_empty_batches_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert __import__("re").search(WORDING, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "call, err",
    [
        (lambda: expression_loss(torch.randn(2, 3), torch.tensor([0, 3])), ValueError),
        (lambda: expression_loss(torch.randn(2, 3), torch.tensor([0, 1]), weight=-torch.ones(3)), ValueError),
        (lambda: expression_loss(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg"), ValueError),
        (lambda: au_loss(torch.randn(2, 3), torch.full((2, 3), 2.0)), ValueError),
        (lambda: au_loss(torch.randn(2, 3), torch.ones(2, 3), mask=torch.tensor([0, 2])), ValueError),
        (lambda: au_loss(torch.randn(2, 3), torch.ones(2, 3), pos_weight=torch.zeros(3)), ValueError),
        (lambda: joint_loss(None, None), ValueError),
        (lambda: au_f1(torch.rand(3, 2), torch.ones(3, 3)), ValueError),
        (lambda: uar(torch.tensor([0, 3]), torch.tensor([0, 1]), 3), ValueError),
        (lambda: TemporalTransformer(8, heads=2)(torch.randn(1, 17, 8)), ValueError),
        (lambda: TemporalTransformer(8, heads=2)(torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)), ValueError),
        (lambda: ClipTemporalHead(8, heads=2, pool="max"), ValueError),
        (lambda: LocalFrameTemporalHead(8, heads=2)(torch.randn(1, 3, 8), torch.zeros(1, 3)), TypeError),
        (lambda: GatedClsTemporalHead(8, heads=2)(torch.randn(3, 8)), ValueError),
        (lambda: CosineClassifier(8)(torch.randn(2, 8), torch.randn(3, 7)), ValueError),
        (lambda: LinearCosineHead(8, 3)(torch.randn(2, 8), torch.randn(4, 8)), ValueError),
        (lambda: AUPairSmoothing(3)(torch.randn(1, 3, 3)), ValueError),
        (lambda: DynamicPriorMapping(torch.ones(3, 4))(torch.randn(2, 5), torch.randn(4, 5)), ValueError),
        (lambda: DynamicPriorMapping(-torch.ones(3, 4)), ValueError),
        (lambda: ReleasePriorMapping(torch.ones(3, 4), alpha=1.5), ValueError),
        (lambda: ReleasePriorMapping(torch.ones(3, 4), fixed_rows=(5,)), ValueError),
    ],
    ids=[
        "ce-range", "ce-weight", "ce-reduction", "bce-target", "bce-int-mask", "bce-pos-weight", "joint-none",
        "f1-shape", "uar-range", "tt-frames", "tt-all-padded", "pool", "local-mask-dtype", "gated-2d",
        "cosine-D", "lincos-K", "smooth-T", "dpm-K", "dpm-negative", "release-alpha", "release-fixed",
    ],
)
def test_errors_use_one_wording(call, err):
    with pytest.raises(err) as info:
        call()
    assert __import__("re").search(WORDING, str(info.value)), f"wording: {info.value}"


def test_value_checks_are_optional():
    logits, bad = torch.randn(2, 3), torch.full((2, 3), 2.0)
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        au_loss(logits, bad)
    # skipped on request: BCE with a target of 2 is just a number
    assert torch.isfinite(au_loss(logits, bad, check_values=False))
    with pytest.raises(ValueError, match=r"expected values in \[0, 3\)"):
        expression_loss(logits, torch.tensor([0, 3]), check_values=True)


META = torch.device("meta")


def test_loss_hot_paths_read_no_values():
    """On meta tensors any .item() / bool(tensor) / int(tensor) raises: none may happen by default."""
    logits = torch.empty(4, 5, device=META)
    idx = torch.empty(4, dtype=torch.long, device=META)
    assert expression_loss(logits, idx, weight=torch.empty(5, device=META)).device == META
    assert expression_loss(logits, torch.empty(4, 5, device=META), label_smoothing=0.1).device == META
    au_logits = torch.empty(2, 6, 5, device=META)
    out = au_loss(
        au_logits, torch.empty(2, 6, 5, device=META), pos_weight=torch.empty(5, device=META),
        mask=torch.empty(2, 6, dtype=torch.long, device=META),
    )
    assert out.device == META
    assert joint_loss(out, out).device == META


@pytest.mark.parametrize(
    "build, select_shape",
    [
        (lambda: ClipTemporalHead(8, heads=2, max_frames=6, device="meta"), (2, 8)),
        (lambda: ClipTemporalHead(8, heads=2, max_frames=6, pool="mean", device="meta"), (2, 8)),
        (lambda: FrameTemporalHead(8, heads=2, max_frames=6, device="meta"), (2, 8)),
        (lambda: LocalFrameTemporalHead(8, heads=2, device="meta"), (2, 6, 8)),
        (lambda: GatedClsTemporalHead(8, heads=2, max_frames=6, device="meta"), (2, 8)),
    ],
    ids=["clip-cls", "clip-mean", "frame-center", "local", "gated-cls"],
)
def test_temporal_hot_paths_read_no_values(build, select_shape):
    x = torch.empty(2, 6, 8, device=META)
    mask = torch.empty(2, 6, dtype=torch.bool, device=META)
    head = build()
    assert head(x, mask).shape == select_shape
    assert head(x).shape == select_shape
