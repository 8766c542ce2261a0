"""FACS captions of synthetic frames, the multi-positive contrastive loss and the pretraining
helpers (facelayers.data.synthetic.captions / .pretrain)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from facelayers import facs
from facelayers.data.synthetic.captions import (
    CAPTION_TEMPLATES,
    NEUTRAL_PHRASES,
    PRETRAIN_SEED_OFFSET,
    caption_for,
    caption_frames,
    caption_positives,
    generate_captioned_frames,
    named_mask,
)
from facelayers.data.synthetic.domains import item_generator
from facelayers.data.synthetic.pretrain import (
    MultiPositiveClipLoss,
    encode_text_prefix,
    multi_positive_clip_loss,
    tokenize_prefix,
)
from facelayers.data.synthetic.render import RENDERED_AUS

AU_NAMES = {a: facs.AUS[a].name for a in RENDERED_AUS}


def _phrases(text: str) -> list[str]:
    """The AU phrase list of a caption: template prefix removed, split at ', ' and ' and '."""
    for t in sorted(CAPTION_TEMPLATES, key=len, reverse=True):
        prefix = t.replace("{}", "")
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
            break
    return [p for part in text.split(", ") for p in part.split(" and ")]


# ---------------------------------------------------------------------------------------------
# captions


@settings(max_examples=60, deadline=None)
@given(mask=st.lists(st.booleans(), min_size=len(RENDERED_AUS), max_size=len(RENDERED_AUS)),
       seed=st.integers(0, 2**31 - 1), subset_p=st.sampled_from([0.0, 0.5, 1.0]))
def test_caption_names_only_active_aus(mask, seed, subset_p):
    active = [a for a, on in zip(RENDERED_AUS, mask) if on]
    c = caption_for(active, torch.Generator().manual_seed(seed), subset_p=subset_p)
    assert set(c.named) <= set(active)
    assert len(set(c.named)) == len(c.named)
    if not active:
        assert c.named == ()
        assert any(p in c.text for p in NEUTRAL_PHRASES)
        return
    assert len(c.named) >= 1
    if subset_p == 0.0:
        assert sorted(c.named) == sorted(active)
    # the caption's phrase list is exactly the names of the named AUs, in the named order
    assert _phrases(c.text) == [AU_NAMES[a] for a in c.named]


def test_captions_are_seeded_and_vary():
    data = generate_captioned_frames(1, sequences_per_subject=1, sequence_length=40)
    a = caption_frames(data.active, data.aus, torch.Generator().manual_seed(3))
    b = caption_frames(data.active, data.aus, torch.Generator().manual_seed(3))
    c = caption_frames(data.active, data.aus, torch.Generator().manual_seed(4))
    assert a == b
    assert a != c
    assert len({x.text for x in a}) > 10  # templates, order and subsets vary


def test_half_of_multi_au_captions_name_a_subset():
    g = torch.Generator().manual_seed(0)
    active = list(RENDERED_AUS[:5])
    n_subset = sum(len(caption_for(active, g).named) < len(active) for _ in range(600))
    # P(subset) = 0.5 * (1 - P(the p=1/2 draw keeps all 5 AUs)) = 0.5 * (1 - 1/32)
    assert 0.40 < n_subset / 600 < 0.57


def test_caption_frames_checks_its_input():
    with pytest.raises(ValueError, match="expected"):
        caption_frames(torch.zeros(3, 4, dtype=torch.bool), RENDERED_AUS, torch.Generator())
    with pytest.raises(ValueError, match="subset_p"):
        caption_for([1], torch.Generator(), subset_p=1.5)


def test_generated_frames_use_seeds_disjoint_from_the_benchmark():
    data = generate_captioned_frames(2, seed=0, sequences_per_subject=1, sequence_length=8)
    assert data.frames.shape == (16, 3, 32, 32) and data.frames.dtype == torch.uint8
    assert data.active.shape == (16, len(RENDERED_AUS))
    # item_generator mixes seed * 1_000_003 + domain * 7_919 + item * 104_729 + 12_345: check the formula
    for s, d, i in [(0, 1, 0), (3, 2, 17), (PRETRAIN_SEED_OFFSET, 1, 5)]:
        assert item_generator(s, d, i).initial_seed() == s * 1_000_003 + d * 7_919 + i * 104_729 + 12_345
    # every benchmark stream (seeds 0..19, domains 1..5, items < 4000) vs pretraining subjects < 4000, seeds < 20
    items = torch.arange(4_000, dtype=torch.int64)
    bench = torch.cat([s * 1_000_003 + d * 7_919 + items * 104_729 for s in range(20) for d in range(1, 6)])
    pre = torch.cat([(PRETRAIN_SEED_OFFSET + s) * 1_000_003 + 1 * 7_919 + items * 104_729 for s in range(20)])
    assert not torch.isin(pre, bench).any()


def _positives_reference(named, active):
    out = torch.zeros(active.shape[0], named.shape[0], dtype=torch.bool)
    for i in range(active.shape[0]):
        for j in range(named.shape[0]):
            names = set(torch.nonzero(named[j]).flatten().tolist())
            acts = set(torch.nonzero(active[i]).flatten().tolist())
            out[i, j] = (not acts) if not names else names <= acts
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9), a=st.integers(1, 6))
def test_caption_positives_matches_a_loop(seed, n, a):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n, a, generator=g) < 0.4
    caps = caption_frames(active, RENDERED_AUS[:a], g)
    named = named_mask(caps, RENDERED_AUS[:a])
    pos = caption_positives(named, active)
    assert torch.equal(pos, _positives_reference(named, active))
    assert pos.diagonal().all()  # a frame's own caption is always true of it


# ---------------------------------------------------------------------------------------------
# loss


def _features(seed, n, c, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(c, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), d=st.integers(1, 16),
       scale=st.floats(0.5, 100.0))
def test_loss_equals_open_clip_cliploss_when_all_captions_differ(seed, n, d, scale):
    from open_clip.loss import ClipLoss

    img, txt = _features(seed, n, n, d)
    s = torch.tensor(scale)
    ref = ClipLoss()(img, txt, s)
    torch.testing.assert_close(multi_positive_clip_loss(img, txt, s), ref)
    # positives built from distinct captions (each caption true only of its own frame) = identity
    active = torch.eye(n, dtype=torch.bool)
    pos = caption_positives(active, active)
    assert torch.equal(pos, torch.eye(n, dtype=torch.bool))
    torch.testing.assert_close(MultiPositiveClipLoss()(img, txt, s, pos), ref)


def _loss_reference(img, txt, scale, pos):
    logits = scale * img @ txt.t()
    rows, cols = [], []
    for i in range(logits.shape[0]):
        js = torch.nonzero(pos[i]).flatten()
        lp = logits[i].log_softmax(0)
        rows.append(-lp[js].mean() if len(js) else 0.0 * lp.sum())
    for j in range(logits.shape[1]):
        is_ = torch.nonzero(pos[:, j]).flatten()
        lp = logits[:, j].log_softmax(0)
        cols.append(-lp[is_].mean() if len(is_) else 0.0 * lp.sum())
    return (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8), c=st.integers(1, 8), d=st.integers(1, 8))
def test_loss_matches_a_loop_reference_outputs_and_gradients(seed, n, c, d):
    img, txt = _features(seed, n, c, d, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.rand(n, c, generator=g) < 0.4
    scale = torch.tensor(7.0, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (img, txt, scale)]
    args_ref = [t.clone().requires_grad_() for t in (img, txt, scale)]
    out = multi_positive_clip_loss(*args, pos)
    ref = _loss_reference(*args_ref, pos)
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    for name, a, b in zip(("dimage", "dtext", "dscale"), args, args_ref):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_loss_gradcheck_float64():
    img, txt = _features(0, 5, 4, 3, torch.float64)
    pos = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    scale = torch.tensor(3.0, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (img, txt, scale))
    assert torch.autograd.gradcheck(lambda a, b, s: multi_positive_clip_loss(a, b, s, pos), inputs)


def test_captions_true_of_both_frames_are_interchangeable():
    # captions 0 and 1 are true of frames 0 and 1: the multi-positive loss does not care which of
    # them is paired with which frame, while ClipLoss (a wrong match for the other) does
    img, txt = _features(1, 5, 5, 8)
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    swapped = txt[[1, 0, 2, 3, 4]]
    s = torch.tensor(20.0)
    torch.testing.assert_close(multi_positive_clip_loss(img, txt, s, pos), multi_positive_clip_loss(img, swapped, s, pos))
    assert not torch.allclose(multi_positive_clip_loss(img, txt, s), multi_positive_clip_loss(img, swapped, s))


def test_loss_rejects_bad_shapes():
    img, txt = _features(0, 3, 4, 5)
    with pytest.raises(ValueError, match="expected N == C"):
        multi_positive_clip_loss(img, txt, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"expected \[3, 4\]"):
        multi_positive_clip_loss(img, txt, torch.tensor(1.0), torch.ones(4, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# text encoding of short captions


def test_encode_text_prefix_equals_full_context_encoding():
    import open_clip
    from _testutils import tiny_clip_kwargs

    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs()).eval()
    texts = ["a face with cheek raiser", "lip corner puller and jaw drop", "relaxed facial muscles"]
    short = tokenize_prefix(texts)
    assert short.shape[1] == int(open_clip.tokenize(texts).argmax(-1).max()) + 1
    with torch.no_grad():
        torch.testing.assert_close(encode_text_prefix(model, short), model.encode_text(open_clip.tokenize(texts)))
    with pytest.raises(ValueError, match="expected <= 3"):
        tokenize_prefix(texts, 3)
