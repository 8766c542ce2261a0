"""Clip-consistent transforms: one draw per clip, reproducible by generator, presets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from facelayers.data import (
    CLIP_MEAN,
    CLIP_STD,
    ClipCenterCrop,
    ClipColorJitter,
    ClipCompose,
    ClipNormalize,
    ClipRandomErasing,
    ClipRandomHorizontalFlip,
    ClipRandomResizedCrop,
    ClipResize,
    eval_transform,
    train_transform,
)


def _identical_frames(seed: int, t: int = 5, h: int = 20, w: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g).expand(t, 3, h, w).contiguous()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


RANDOM_TRANSFORMS = {
    "crop": lambda: ClipRandomResizedCrop(12, scale=(0.2, 1.0), ratio=(0.5, 2.0)),
    "flip": lambda: ClipRandomHorizontalFlip(0.5),
    "jitter": lambda: ClipColorJitter(0.5, 0.5, 0.5, 0.2),
    "erase": lambda: ClipRandomErasing(p=1.0, scale=(0.1, 0.3), value="random"),
    "erase_const": lambda: ClipRandomErasing(p=1.0, value=(0.1, 0.2, 0.3)),
    "train_preset": lambda: train_transform(16, erase_p=1.0, contrast=0.3, saturation=0.3, hue=0.1),
}


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
@given(seed=st.integers(0, 2**31))
def test_same_draw_for_every_frame(name, seed):
    t = RANDOM_TRANSFORMS[name]()
    out = t(_identical_frames(seed), _gen(seed + 1))
    for i in range(1, out.shape[0]):
        assert torch.equal(out[i], out[0]), f"{name}: frame {i} differs from frame 0"


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_reproducible_by_generator_and_actually_random(name):
    t = RANDOM_TRANSFORMS[name]()
    clip = _identical_frames(0)
    assert torch.equal(t(clip, _gen(5)), t(clip, _gen(5)))
    outs = {tuple(t(clip, _gen(s)).flatten()[::7].tolist()) for s in range(8)}
    assert len(outs) > 1, f"{name} gave the same output for 8 seeds"


def test_flip_is_a_mirror_of_every_frame():
    clip = torch.rand(3, 3, 4, 5)
    flipped = ClipRandomHorizontalFlip(1.0)(clip)
    assert torch.equal(flipped, clip.flip(-1))
    assert torch.equal(ClipRandomHorizontalFlip(0.0)(clip), clip)


def test_crop_box_is_shared_by_non_identical_frames():
    # frame k = base + k: a per-frame crop would break "out[k] - out[0] == k"
    base = torch.rand(1, 3, 30, 30)
    clip = base + torch.arange(4.0).view(4, 1, 1, 1)
    out = ClipRandomResizedCrop(10, scale=(0.1, 0.5))(clip, _gen(1))
    for k in range(4):
        torch.testing.assert_close(out[k] - out[0], torch.full_like(out[0], float(k)), atol=1e-4, rtol=0)


def test_erasing_same_rectangle_in_all_frames():
    clip = torch.rand(4, 3, 20, 20)
    out = ClipRandomErasing(p=1.0, value=0.0)(clip, _gen(2))
    erased = out == 0
    assert erased.any()
    assert all(torch.equal(erased[k], erased[0]) for k in range(4))
    assert torch.equal(ClipRandomErasing(p=0.0)(clip, _gen(2)), clip)


def test_normalize_matches_formula():
    clip = torch.rand(2, 3, 4, 4)
    out = ClipNormalize()(clip)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (clip - mean) / std)
    assert CLIP_MEAN == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_presets_shapes():
    clip = torch.rand(6, 3, 40, 50)
    assert train_transform(32)(clip, _gen(0)).shape == (6, 3, 32, 32)
    ev = eval_transform(32)
    out = ev(clip)
    assert out.shape == (6, 3, 32, 32)
    assert torch.equal(out, ev(clip)), "eval preset must be deterministic"
    # square input: eval preset is a plain resize + normalise
    sq = torch.rand(2, 3, 64, 64)
    expected = ClipNormalize()(ClipResize((32, 32))(sq))
    torch.testing.assert_close(ev(sq), expected)
    assert "ClipRandomResizedCrop" in repr(train_transform(8))


def test_resize_and_center_crop():
    clip = torch.rand(2, 3, 40, 60)
    assert ClipResize(20)(clip).shape == (2, 3, 20, 30)
    assert ClipCenterCrop((10, 12))(clip).shape == (2, 3, 10, 12)
    assert torch.equal(ClipCenterCrop((10, 12))(clip), clip[:, :, 15:25, 24:36])


def test_compose_passes_generator_and_calls_plain_callables():
    seen = []
    t = ClipCompose([ClipRandomHorizontalFlip(0.5), lambda c: seen.append(c.shape) or c + 1])
    out = t(torch.zeros(2, 3, 4, 4), _gen(0))
    assert seen == [(2, 3, 4, 4)] and torch.equal(out, torch.ones(2, 3, 4, 4))


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda: ClipNormalize()(torch.rand(3, 4, 4)), ValueError, r"\[T, C, H, W\]"),
        (lambda: ClipNormalize()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)), TypeError, "floating"),
        (lambda: ClipNormalize()(torch.rand(1, 1, 4, 4)), ValueError, "channels"),
        (lambda: ClipRandomHorizontalFlip(1.5), ValueError, r"\[0, 1\]"),
        (lambda: ClipRandomResizedCrop(8, scale=(0.9, 0.1)), ValueError, "scale"),
        (lambda: ClipColorJitter(hue=0.7), ValueError, "hue"),
        (lambda: ClipRandomErasing(value="noise"), ValueError, "random"),
        (lambda: ClipResize(0), ValueError, "size"),
    ],
)
def test_bad_arguments(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@given(seed=st.integers(0, 2**31), h=st.integers(9, 40), w=st.integers(9, 40))
def test_reference_geometry_is_torchvision_on_the_drawn_params(seed, h, w):
    # the float reference path = torchvision's functional ops on the parameters drawn from the generator
    from torchvision.transforms.v2 import functional as F

    clip = torch.rand(2, 3, h, w, generator=_gen(seed))
    crop = ClipRandomResizedCrop(8, scale=(0.2, 1.0), ratio=(0.5, 2.0))
    top, left, ch, cw = crop.get_params(h, w, _gen(seed))
    assert torch.equal(crop(clip, _gen(seed)), F.resized_crop(clip, top, left, ch, cw, [8, 8], antialias=True))
    for size in (7, (5, 11)):
        steps = ClipResize(size)._steps(h, w)
        out = ClipResize(size)(clip)
        assert torch.equal(out, F.resize(clip, [size] if isinstance(size, int) else list(size), antialias=True))
        assert steps[-1].out_size() == tuple(out.shape[-2:])
    cc = ClipCenterCrop((12, 30))
    assert torch.equal(cc(clip), F.center_crop(clip, [12, 30]))
    assert cc._steps(h, w)[-1].out_size() == (12, 30)
