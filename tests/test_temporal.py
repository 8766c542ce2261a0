"""Tests for facelayers.temporal: shapes, centre selection, padding invariance, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _testutils import one_thread  # noqa: F401  (autouse: one intra-op thread)

from facelayers.temporal import ClipTemporalHead, FrameTemporalHead, TemporalTransformer


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def _x(seed: int, b: int, t: int, d: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, d, generator=g, dtype=dtype)


def _random_padding(seed: int, b: int, t: int) -> torch.Tensor:
    """Bool [B, T] with True = padded; every clip keeps at least one valid frame (not always a prefix)."""
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, t, generator=g) < 0.4
    keep = torch.randint(0, t, (b,), generator=g)
    mask[torch.arange(b), keep] = False
    return mask


sizes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 8),  # T
    st.sampled_from([1, 2, 4]),  # heads
    st.integers(1, 6),  # head dim (odd sizes included)
    st.integers(1, 2),  # depth
    st.integers(0, 2**31 - 1),  # seed
)


@given(sizes)
def test_shapes_property(params):
    b, t, heads, hd, depth, seed = params
    d = heads * hd
    x = _x(seed, b, t, d)
    tt = TemporalTransformer(d, depth=depth, heads=heads, max_frames=8)
    assert tt(x).shape == (b, t, d)
    for pool in ("cls", "mean"):
        assert ClipTemporalHead(d, depth=depth, heads=heads, max_frames=8, pool=pool)(x).shape == (b, d)
    assert FrameTemporalHead(d, depth=depth, heads=heads, max_frames=8, select="center")(x).shape == (b, d)
    assert FrameTemporalHead(d, depth=depth, heads=heads, max_frames=8, select="all")(x).shape == (b, t, d)


@given(sizes, st.booleans())
def test_center_equals_indexing_all_frames(params, use_mask):
    b, t, heads, hd, depth, seed = params
    d = heads * hd
    x = _x(seed, b, t, d)
    center = FrameTemporalHead(d, depth=depth, heads=heads, max_frames=8, select="center")
    allf = FrameTemporalHead(d, depth=depth, heads=heads, max_frames=8, select="all")
    allf.load_state_dict(center.state_dict())  # same weights
    mask = _random_padding(seed, b, t) if use_mask else None
    full = allf(x, mask)
    if mask is None:
        expected = full[:, t // 2]
    else:
        # centre of the valid frames: the floor(L/2)-th valid frame in temporal order
        rows = []
        for i in range(b):
            valid_pos = [j for j in range(t) if not bool(mask[i, j])]
            rows.append(full[i, valid_pos[len(valid_pos) // 2]])
        expected = torch.stack(rows)
    torch.testing.assert_close(center(x, mask), expected, atol=0, rtol=0, msg="centre != all-frames[centre]")


def test_center_index_documented_values():
    assert int(FrameTemporalHead.center_index(16)) == 8
    assert int(FrameTemporalHead.center_index(5)) == 2
    assert int(FrameTemporalHead.center_index(1)) == 0
    pad = torch.tensor([[False] * 6 + [True] * 2, [True, True] + [False] * 5 + [True], [False] * 8])
    # 6 valid frames at 0..5 -> 3rd valid (index 3); 5 valid at 2..6 -> index 4; none padded -> 4
    assert FrameTemporalHead.center_index(8, pad).tolist() == [3, 4, 4]


@given(sizes)
def test_padded_frames_do_not_influence_other_outputs(params):
    b, t, heads, hd, depth, seed = params
    if t < 2:
        t = 2
    d = heads * hd
    x = _x(seed, b, t, d)
    mask = _random_padding(seed, b, t)
    mask[0, 0] = False
    mask[0, 1] = True  # guarantee a padded frame in clip 0
    x2 = x.clone()
    g = torch.Generator().manual_seed(seed + 7)
    x2[mask] = 100.0 * torch.randn(int(mask.sum()), d, generator=g)  # change only the padded frames
    modules = {
        "transformer": TemporalTransformer(d, depth=depth, heads=heads, max_frames=8),
        "clip-cls": ClipTemporalHead(d, depth=depth, heads=heads, max_frames=8, pool="cls"),
        "clip-mean": ClipTemporalHead(d, depth=depth, heads=heads, max_frames=8, pool="mean"),
        "frame-center": FrameTemporalHead(d, depth=depth, heads=heads, max_frames=8, select="center"),
        "frame-all": FrameTemporalHead(d, depth=depth, heads=heads, max_frames=8, select="all"),
    }
    for name, mod in modules.items():
        y1, y2 = mod(x, mask), mod(x2, mask)
        torch.testing.assert_close(y1, y2, **TOL[torch.float32], msg=f"{name}: a padded frame changed the output")
        if y1.ndim == 3:
            assert bool((y1[mask] == 0).all()), f"{name}: outputs at padded frames must be zero"


def test_padding_equals_truncation_for_suffix_padding():
    # Padding the tail equals running on the valid prefix only (positions 0..L-1 are shared).
    d, t, L = 16, 7, 4
    x = _x(3, 2, t, d)
    mask = torch.zeros(2, t, dtype=torch.bool)
    mask[:, L:] = True
    head = ClipTemporalHead(d, heads=4, max_frames=8, pool="cls")
    torch.testing.assert_close(head(x, mask), head(x[:, :L]), **TOL[torch.float32])
    mean = ClipTemporalHead(d, heads=4, max_frames=8, pool="mean")
    torch.testing.assert_close(mean(x, mask), mean(x[:, :L]), **TOL[torch.float32])
    frame = FrameTemporalHead(d, heads=4, max_frames=8)
    torch.testing.assert_close(frame(x, mask), frame(x[:, :L]), **TOL[torch.float32])


def test_mean_pool_is_mean_of_frame_outputs():
    d = 12
    head = ClipTemporalHead(d, heads=3, max_frames=5, pool="mean")
    x = _x(0, 3, 5, d)
    torch.testing.assert_close(head(x), head.temporal(x).mean(1))


def test_attention_matches_explicit_softmax_reference():
    """The SDPA block equals a hand-written attention (float64), with a padding mask."""
    torch.manual_seed(1)
    d, heads, t, b = 8, 2, 5, 2
    tt = TemporalTransformer(d, heads=heads, max_frames=t, dtype=torch.float64)
    x = _x(2, b, t, d, torch.float64)
    mask = torch.tensor([[False, False, False, True, True], [False] * 5])

    def ref(x):
        blk = tt.blocks[0]
        h = x + tt.pos_embed[:t]
        qkv = blk.qkv(blk.norm1(h)).view(b, t, 3, heads, d // heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        s = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = h + blk.proj(a)
        h = h + blk.fc2(torch.nn.functional.gelu(blk.fc1(blk.norm2(h))))
        return tt.norm(h).masked_fill(mask[..., None], 0.0)

    torch.testing.assert_close(tt(x, mask), ref(x), **TOL[torch.float64])


def test_gradcheck_float64():
    tt = ClipTemporalHead(4, heads=2, max_frames=3, pool="cls", dtype=torch.float64)
    x = _x(0, 2, 3, 4, torch.float64).requires_grad_()
    mask = torch.tensor([[False, False, True], [False, False, False]])
    assert torch.autograd.gradcheck(lambda x: tt(x, mask), (x,))


def test_position_matters_and_any_T_works():
    tt = TemporalTransformer(8, heads=2, max_frames=6)
    x = _x(0, 1, 6, 8)
    for t in range(1, 7):
        assert tt(x[:, :t]).shape == (1, t, 8)
    # learned positions break permutation equivariance
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    assert not torch.allclose(tt(x[:, perm]), tt(x)[:, perm])


def test_too_many_frames_raises_naming_both():
    head = FrameTemporalHead(8, heads=2, max_frames=4)
    with pytest.raises(ValueError, match=r"T=5.*max_frames=4"):
        head(torch.randn(1, 5, 8))


@pytest.mark.parametrize(
    "build, x, mask, err, match",
    [
        (lambda: TemporalTransformer(8, heads=2), torch.randn(2, 3, 7), None, ValueError, r"D=8.*\(2, 3, 7\)"),
        (lambda: TemporalTransformer(8, heads=2), torch.randn(3, 8), None, ValueError, r"\[B, T, D=8\]"),
        (lambda: TemporalTransformer(8, heads=2), torch.randn(2, 0, 8), None, ValueError, "at least one frame"),
        (lambda: TemporalTransformer(8, heads=2), torch.randn(2, 3, 8), torch.zeros(2, 3), TypeError, "torch.bool"),
        (lambda: TemporalTransformer(8, heads=2), torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.bool),
         ValueError, r"\[2, 3\].*\(2, 4\)"),
        (lambda: TemporalTransformer(8, heads=2), torch.randn(2, 3, 8), torch.tensor([[True] * 3, [False] * 3]),
         ValueError, "fully padded"),
    ],
    ids=["wrong-D", "2d-input", "T0", "float-mask", "mask-shape", "all-padded"],
)
def test_bad_inputs_raise(build, x, mask, err, match):
    with pytest.raises(err, match=match):
        build()(x, mask)


def test_bad_constructor_args():
    with pytest.raises(ValueError, match=r"dim=10, heads=4"):
        TemporalTransformer(10, heads=4)
    with pytest.raises(ValueError, match="pool"):
        ClipTemporalHead(8, heads=2, pool="max")
    with pytest.raises(ValueError, match="select"):
        FrameTemporalHead(8, heads=2, select="last")
    with pytest.raises(ValueError, match="max_frames"):
        TemporalTransformer(8, heads=2, max_frames=0)


def test_meta_device_and_reset_parameters():
    head = ClipTemporalHead(16, heads=4, max_frames=6, device="meta")
    assert head.temporal.pos_embed.device.type == "meta" and head.cls_token.device.type == "meta"
    head = head.to_empty(device="cpu")
    head.reset_parameters()
    assert torch.isfinite(head(torch.randn(2, 6, 16))).all()
    assert 0.005 < float(head.temporal.pos_embed.detach().std()) < 0.05  # trunc_normal(std=0.02)


def test_dtype_and_repr():
    head = FrameTemporalHead(8, heads=2, max_frames=4, select="all", dtype=torch.float64)
    assert head(torch.randn(1, 4, 8, dtype=torch.float64)).dtype == torch.float64
    r = repr(head)
    assert "select='all'" in r and "max_frames=4" in r and "heads=2" in r


def test_dropout_only_in_training():
    tt = TemporalTransformer(8, heads=2, max_frames=4, dropout=0.5)
    x = torch.randn(2, 4, 8)
    tt.eval()
    torch.testing.assert_close(tt(x), tt(x), atol=0, rtol=0)
    tt.train()
    assert not torch.equal(tt(x), tt(x))


def test_backward_reaches_all_parameters():
    head = ClipTemporalHead(8, heads=2, max_frames=4, depth=2)
    head(torch.randn(2, 4, 8)).sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/non-finite gradient for {missing}"
