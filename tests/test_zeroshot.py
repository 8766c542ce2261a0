"""Zero-shot evaluation (facelayers.zeroshot) on tiny cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from facelayers import facs
from facelayers.zeroshot import (
    au_prompt_embeddings,
    expression_prompt_embeddings,
    plot_zero_shot_timeline,
    synthetic_zero_shot,
    zero_shot_au,
    zero_shot_au_metrics,
    zero_shot_expression,
    zero_shot_expression_metrics,
)

E = 8


class FakeCLIP(nn.Module):
    """Image embedding = the first E pixel values; text embedding = sum of fixed random token vectors."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(49408, E, generator=g), requires_grad=False)

    def encode_image(self, x):
        return x.flatten(1)[:, :E]

    def encode_text(self, tokens):
        return self.table[tokens].sum(1)


def _frame(vec: torch.Tensor) -> torch.Tensor:
    """A [3, 2, 2] frame whose first E pixel values are ``vec``."""
    out = torch.zeros(12)
    out[:E] = vec
    return out.view(3, 2, 2)


def test_au_metrics_known_answer():
    s = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.2, 0.0]])
    y = torch.tensor([[1, 0], [0, 1], [1, 0], [1, 1]])
    out = zero_shot_au_metrics(s, y)
    # AU 1: positives 0.9, 0.8, 0.2 vs negative 0.2 -> (1 + 1 + 0.5) / 3; AU 2: 0.3, 0.0 vs 0.1, 0.2 -> 2 / 4
    torch.testing.assert_close(out["per_au"], torch.tensor([2.5 / 3, 0.5], dtype=torch.float64))
    assert math.isclose(out["mean"], (2.5 / 3 + 0.5) / 2)
    with pytest.raises(ValueError, match="both be"):
        zero_shot_au_metrics(s, y[:, :1])


def test_expression_metrics_known_answer():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = zero_shot_expression_metrics(logits, torch.tensor([0, 1, 1, 2]), 3)
    assert math.isclose(out["uar"], (1 + 0.5 + 1) / 3)
    assert math.isclose(out["war"], 0.75)
    assert out["per_class_recall"] == [1.0, 0.5, 1.0]


def test_zero_shot_au_on_a_fake_clip():
    model = FakeCLIP()
    aus = (1, 2)
    t = au_prompt_embeddings(model, aus)
    assert t.shape == (2, E)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    # frames show AU1's or AU2's prototype; one AU1-labelled frame shows AU2's (a miss for AU1)
    shows = [0, 0, 1, 1, 1]
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], dtype=torch.float32)
    items = []
    for k, lab in zip(shows, labels):
        clip = torch.zeros(3, 3, 2, 2)
        clip[1] = _frame(t[k])  # the centre frame (T // 2) carries the content
        items.append({"clip": clip, "labels": lab})
    out = zero_shot_au(model, items, aus)
    # AU1 scores: cos 1 (x2) for positives 0, 1 and cos(t1, t2) for positive 4; negatives 2, 3 score cos(t1, t2)
    assert out["per_au"][0] == pytest.approx((2 * 2 + 0.5 * 2) / 6)
    # AU2: positives 2, 3 score 1; negatives 0, 1 score cos(t1, t2), negative 4 scores 1 -> ties
    assert out["per_au"][1] == pytest.approx((2 * 2 + 2 * 0.5) / 6)
    assert out["scores"].shape == (5, 2)
    with pytest.raises(ValueError, match="centre-frame labels"):
        zero_shot_au(model, [{"clip": torch.zeros(3, 3, 2, 2), "labels": torch.zeros(3, 2)}], aus)


@pytest.mark.parametrize("style", facs.DESCRIPTION_STYLES)
def test_zero_shot_expression_on_a_fake_clip(style):
    model = FakeCLIP()
    names = ("happiness", "sadness", "anger")
    t = expression_prompt_embeddings(model, names, style)
    assert t.shape == (3, E)
    # two frames per clip; the mean embedding decides. Clip 5 (anger) shows happiness.
    shows = [(0, 0), (0, 0), (1, 1), (1, 1), (2, 2), (0, 0)]
    labels = [0, 0, 1, 1, 2, 2]
    items = [{"clip": torch.stack([_frame(t[a]), _frame(t[b])]), "label": torch.tensor(y)}
             for (a, b), y in zip(shows, labels)]
    out = zero_shot_expression(model, items, names, styles=(style,))
    assert out[style]["per_class_recall"] == [1.0, 1.0, 0.5]
    assert out[style]["uar"] == pytest.approx(2.5 / 3)
    assert out[style]["war"] == pytest.approx(5 / 6)


def test_synthetic_zero_shot_smoke():
    import open_clip
    from _testutils import tiny_clip_kwargs

    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs()).eval()
    out = synthetic_zero_shot(model, size=0.04, frames=2)
    assert out["expressions"] == list(facs.EXPRESSIONS_7) and out["aus"] == list(facs.BP4D_AUS)
    assert len(out["au"]["per_au"]) == len(facs.BP4D_AUS)
    assert set(out["exp"]) == set(facs.DESCRIPTION_STYLES)
    assert out["sizes"]["exp_clips"] > 0 and out["sizes"]["au_frames"] > 0
    for v in out["exp"].values():
        assert 0.0 <= v["uar"] <= 1.0 and len(v["per_class_recall"]) == 7


def test_timeline_plot_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(20, 3, generator=g)
    labels = (torch.rand(20, 3, generator=g) < 0.3).float()
    path = tmp_path / "t.png"
    plot_zero_shot_timeline(scores, labels, (1, 2, 4), path=path, title="x")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="expected|must be"):
        plot_zero_shot_timeline(scores, labels, (1, 2))


def test_prompt_embeddings_check_their_input():
    with pytest.raises(ValueError, match="templates"):
        au_prompt_embeddings(FakeCLIP(), (1,), templates=("no slot",))
    with pytest.raises(ValueError, match="4 dims"):
        from facelayers.zeroshot import frame_embeddings

        frame_embeddings(FakeCLIP(), torch.zeros(2, 3, 2))
