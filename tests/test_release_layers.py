"""Layers that reproduce the released SSM code's modules, each tested on its own.

LocalFrameAttention / LocalFrameTemporalHead (release ``Temporal_Transformer_All``), GatedClsTemporalHead
(release ``Temporal_Transformer_Cls``), LinearCosineHead, AUPairSmoothing, ReleasePriorMapping and the
mapping factory; plus the injectable TemporalTransformer of the paper heads. Every reference below is
written from the release's formulas, independently of the implementation under test.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from _testutils import one_thread  # noqa: F401  (autouse: one intra-op thread)

from facelayers import facs
from facelayers.heads import AUPairSmoothing, LinearCosineHead
from facelayers.prior_mapping import (
    DynamicPriorMapping,
    LinearSemanticMapping,
    MLPSemanticMapping,
    ReleasePriorMapping,
    build_prior_mapping,
)
from facelayers.temporal import (
    ClipTemporalHead,
    FrameTemporalHead,
    GatedClsTemporalHead,
    LocalFrameAttention,
    LocalFrameTemporalHead,
    TemporalTransformer,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _x(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _gradcheck_module(module: torch.nn.Module, *inputs: torch.Tensor, fast: bool = False) -> bool:
    """gradcheck w.r.t. the inputs AND every parameter (float64)."""
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    ins = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    n_in = len(ins)

    def fn(*args):
        out = functional_call(module, dict(zip(names, args[n_in:])), tuple(args[:n_in]))
        return out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])

    return torch.autograd.gradcheck(fn, (*ins, *params), fast_mode=fast)


# ============================================================================= LocalFrameAttention


def _local_reference(layer: LocalFrameAttention, x: torch.Tensor) -> torch.Tensor:
    """Loop-over-frames reading of the release's ``_LocalFrameAttention.forward``."""
    b, t, d = x.shape
    h, r, hd = layer.heads, layer.radius, d // layer.heads
    n = F.layer_norm(x, (d,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    q = n @ layer.q_proj.weight.t()
    k = n @ layer.k_proj.weight.t()
    out = torch.empty_like(x)
    gate = layer.max_update * torch.tanh(layer.channel_gate)
    for bi in range(b):
        for i in range(t):
            ctx = torch.empty(d, dtype=x.dtype)
            for hh in range(h):
                sl = slice(hh * hd, (hh + 1) * hd)
                js = [j for j in range(t) if abs(j - i) <= r]
                s = torch.stack(
                    [q[bi, i, sl] @ k[bi, j, sl] / math.sqrt(hd) + layer.rel_pos_bias[hh, j - i + r] for j in js]
                )
                w = torch.softmax(s, 0)
                ctx[sl] = sum(w[n_] * x[bi, j, sl] for n_, j in enumerate(js))
            out[bi, i] = x[bi, i] + gate * (ctx - x[bi, i])
    return out


@given(
    b=st.integers(1, 2), t=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]), hd=st.integers(1, 3),
    radius=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
)
def test_local_attention_identity_at_init_and_matches_reference(b, t, heads, hd, radius, seed):
    d = heads * hd
    layer = LocalFrameAttention(d, heads=heads, radius=radius, dtype=torch.float64)
    x = _x(seed, b, t, d, dtype=torch.float64)
    assert torch.equal(layer(x), x), "the release's layer is the exact identity at initialisation"
    _perturb(layer, seed)
    y = layer(x)
    assert y.shape == (b, t, d)
    torch.testing.assert_close(y, _local_reference(layer, x), **TOL[torch.float64])


def test_local_attention_release_initialisation():
    layer = LocalFrameAttention(16, heads=4, radius=2)
    assert torch.equal(layer.k_proj.weight, layer.q_proj.weight), "W_k starts as a copy of W_q"
    assert layer.q_proj.bias is None and layer.k_proj.bias is None
    expected = torch.zeros(4, 5)
    expected[:, 2] = 1.0
    assert torch.equal(layer.rel_pos_bias, expected)
    assert torch.equal(layer.channel_gate, torch.zeros(16))
    bound = 0.5 * math.sqrt(6.0 / (16 + 16))  # xavier_uniform with gain 0.5
    assert layer.q_proj.weight.abs().max() <= bound
    assert layer.q_proj.weight.std() > 0.3 * bound
    # max_update bounds the move towards the neighbourhood average per channel
    with torch.no_grad():
        layer.channel_gate.fill_(100.0)
    x = _x(0, 2, 6, 16)
    n = layer(x)
    torch.testing.assert_close(n, _local_reference(layer, x), **TOL[torch.float32])


def test_local_attention_is_local():
    """A frame outside +-radius cannot change an output."""
    layer = LocalFrameAttention(8, heads=2, radius=1)
    _perturb(layer, 1)
    x = _x(2, 1, 7, 8)
    x2 = x.clone()
    x2[0, 6] += 10.0
    y, y2 = layer(x), layer(x2)
    torch.testing.assert_close(y[0, :5], y2[0, :5], atol=0, rtol=0)
    assert not torch.allclose(y[0, 5], y2[0, 5])


def test_local_attention_padding():
    layer = LocalFrameTemporalHead(8, heads=2, depth=2)
    _perturb(layer, 3)
    x = _x(4, 2, 6, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    x2 = x.clone()
    x2[mask] = 50.0
    y, y2 = layer(x, mask), layer(x2, mask)
    torch.testing.assert_close(y, y2, **TOL[torch.float32])
    assert bool((y[mask] == 0).all())
    # suffix padding equals the truncated clip
    torch.testing.assert_close(y[0, :4], layer(x[:1, :4])[0], **TOL[torch.float32])


def test_local_attention_gradcheck_float64():
    layer = LocalFrameAttention(4, heads=2, radius=1, dtype=torch.float64)
    _perturb(layer, 5)
    assert _gradcheck_module(layer, _x(6, 2, 4, 4, dtype=torch.float64))


def test_local_head_stack_select_and_state_dict():
    head = LocalFrameTemporalHead(8, depth=2, heads=2, select="all")
    assert sorted(head.state_dict()) == sorted(
        f"layers.{i}.{n}" for i in range(2)
        for n in ("norm.weight", "norm.bias", "q_proj.weight", "k_proj.weight", "rel_pos_bias", "channel_gate")
    )
    _perturb(head, 7)
    x = _x(8, 3, 5, 8)
    ref = head.layers[1](head.layers[0](x))
    torch.testing.assert_close(head(x), ref, atol=0, rtol=0)
    center = LocalFrameTemporalHead(8, depth=2, heads=2, select="center")
    center.load_state_dict(head.state_dict())
    torch.testing.assert_close(center(x), ref[:, 2], atol=0, rtol=0)
    assert "select='center'" in repr(center) and "radius=1" in repr(center)


def test_local_attention_meta_and_errors():
    layer = LocalFrameAttention(8, heads=2, device="meta")
    assert all(p.device.type == "meta" for p in layer.parameters())
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    x = _x(0, 1, 3, 8)
    assert torch.equal(layer(x), x)
    with pytest.raises(ValueError, match=r"expected dim % heads == 0, got dim=10, heads=4"):
        LocalFrameAttention(10, heads=4)
    with pytest.raises(ValueError, match=r"expected a value in \(0, 1\], got 1.5"):
        LocalFrameAttention(8, heads=2, max_update=1.5)
    with pytest.raises(ValueError, match=r"radius.*expected an int >= 1, got 0"):
        LocalFrameAttention(8, heads=2, radius=0)
    with pytest.raises(ValueError, match=r"expected shape \[B, T, 8\], got shape \(1, 3, 7\)"):
        layer(torch.randn(1, 3, 7))


# ============================================================================= GatedClsTemporalHead


def _gated_cls_reference(head: GatedClsTemporalHead, x: torch.Tensor) -> torch.Tensor:
    """The release's ``Temporal_Transformer_Cls.forward`` written out (explicit softmax, tanh GELU)."""
    b, t, d = x.shape
    h = torch.cat([head.cls_token.expand(b, -1, -1), x], 1) + head.pos_embed[:, : t + 1]
    res = h
    for blk in head.blocks:
        n = F.layer_norm(h, (d,), blk.norm1.weight, blk.norm1.bias)
        q, k, v = (n @ blk.qkv.weight.t()).chunk(3, dim=-1)
        split = lambda z: z.view(b, t + 1, blk.heads, blk.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) * blk.head_dim**-0.5, -1) @ v
        a = a.transpose(1, 2).reshape(b, t + 1, -1)
        h = h + (a @ blk.proj.weight.t() + blk.proj.bias if isinstance(blk.proj, torch.nn.Linear) else a)
        n = F.layer_norm(h, (d,), blk.norm2.weight, blk.norm2.bias)
        z = n @ blk.fc1.weight.t() + blk.fc1.bias
        z = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
        h = h + z @ blk.fc2.weight.t() + blk.fc2.bias
    return F.layer_norm(h[:, 0] + head.gate * res[:, 0], (d,), head.norm.weight, head.norm.bias)


@pytest.mark.parametrize(
    "dim, heads, head_dim, depth, t",
    [(16, 4, 8, 1, 6), (12, 3, None, 2, 1), (8, 1, 8, 1, 5), (10, 2, 3, 1, 4)],
    ids=["inner!=dim", "depth2-T1", "no-out-proj", "odd-head"],
)
def test_gated_cls_matches_release_formula(dim, heads, head_dim, depth, t):
    head = GatedClsTemporalHead(
        dim, heads=heads, head_dim=head_dim, depth=depth, mlp_dim=2 * dim + 1, max_frames=6, dtype=torch.float64
    )
    assert head.gate.item() == 1.0 and head.gate.shape == (1,)
    _perturb(head, 9)
    x = _x(10, 2, t, dim, dtype=torch.float64)
    torch.testing.assert_close(head(x), _gated_cls_reference(head, x), **TOL[torch.float64])
    if heads == 1 and head_dim == dim:  # the release drops to_out in exactly this case
        assert not any("proj" in n for n, _ in head.named_parameters())


def test_gated_cls_release_layout_and_init():
    torch.manual_seed(0)
    head = GatedClsTemporalHead(64, heads=8, head_dim=8, mlp_dim=128, max_frames=16)
    shapes = {n: tuple(p.shape) for n, p in head.named_parameters()}
    assert shapes["cls_token"] == (1, 1, 64) and shapes["pos_embed"] == (1, 17, 64) and shapes["gate"] == (1,)
    assert shapes["blocks.0.qkv.weight"] == (3 * 64, 64) and "blocks.0.qkv.bias" not in shapes
    assert shapes["blocks.0.fc1.weight"] == (128, 64)
    # the release draws the CLS token and positions with randn (std 1)
    assert 0.8 < float(head.pos_embed.detach().std()) < 1.2
    head = GatedClsTemporalHead(8, heads=2, max_frames=4, init_std=0.02, gate_init=0.5)
    assert float(head.pos_embed.detach().std()) < 0.05 and head.gate.item() == 0.5


def test_gated_cls_gate_and_padding():
    head = GatedClsTemporalHead(8, heads=2, mlp_dim=16, max_frames=6).eval()
    _perturb(head, 11)
    x = _x(12, 2, 6, 8)
    # gate = 0: the output is LN of the transformer's CLS output only
    with torch.no_grad():
        head.gate.zero_()
    g0 = head(x)
    with torch.no_grad():
        head.gate.fill_(1.0)
    assert not torch.allclose(g0, head(x))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    torch.testing.assert_close(head(x, mask), head(x[:, :4]), **TOL[torch.float32])


def test_gated_cls_gradcheck_float64_and_errors():
    head = GatedClsTemporalHead(4, heads=2, mlp_dim=6, max_frames=3, dtype=torch.float64)
    _perturb(head, 13, scale=0.1)
    assert _gradcheck_module(head, _x(14, 2, 3, 4, dtype=torch.float64), fast=True)
    with pytest.raises(ValueError, match=r"T=4.*max_frames=3"):
        head(torch.randn(1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dim=10, heads=4"):
        GatedClsTemporalHead(10, heads=4)
    assert GatedClsTemporalHead(10, heads=4, head_dim=5)(torch.randn(1, 2, 10)).shape == (1, 10)


def test_gated_cls_meta_reset_and_repr():
    head = GatedClsTemporalHead(8, heads=2, max_frames=4, device="meta")
    head.to_empty(device="cpu")
    head.reset_parameters()
    assert head.gate.item() == 1.0 and torch.isfinite(head(torch.randn(1, 4, 8))).all()
    assert "head_dim=4" in repr(head) and "max_frames=4" in repr(head)


# ============================================================================= injectable transformer


def test_heads_take_an_injected_transformer():
    body = TemporalTransformer(8, heads=2, max_frames=5)
    clip = ClipTemporalHead(8, transformer=body, pool="mean")
    frame = FrameTemporalHead(8, transformer=body, select="all")
    assert clip.temporal is body and frame.temporal is body
    x = _x(0, 2, 5, 8)
    torch.testing.assert_close(clip(x), body(x).mean(1), atol=0, rtol=0)
    torch.testing.assert_close(frame(x), body(x), atol=0, rtol=0)
    # agreeing build arguments are accepted, disagreeing ones are errors
    assert ClipTemporalHead(8, heads=2, max_frames=5, transformer=body).temporal is body
    with pytest.raises(ValueError, match=r"expected heads=2 or no heads, got heads=4"):
        ClipTemporalHead(8, heads=4, transformer=body)
    with pytest.raises(ValueError, match=r"expected dim=16, got 8"):
        FrameTemporalHead(16, transformer=body)
    with pytest.raises(TypeError, match="TemporalTransformer"):
        FrameTemporalHead(8, transformer=torch.nn.Identity())


def test_built_and_injected_heads_are_the_same_module():
    torch.manual_seed(0)
    built = ClipTemporalHead(8, heads=2, max_frames=4, pool="cls")
    torch.manual_seed(0)
    injected = ClipTemporalHead(8, pool="cls", transformer=TemporalTransformer(8, heads=2, max_frames=4))
    assert list(built.state_dict()) == list(injected.state_dict())
    injected.load_state_dict(built.state_dict())
    x = _x(1, 2, 4, 8)
    torch.testing.assert_close(built(x), injected(x), atol=0, rtol=0)


# ============================================================================= LinearCosineHead


@given(b=st.integers(1, 3), t=st.integers(0, 3), k=st.integers(1, 5), d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_linear_cosine_formula(b, t, k, d, seed):
    head = LinearCosineHead(d, k, dtype=torch.float64)
    shape = (b, d) if t == 0 else (b, t, d)
    z = _x(seed, *shape, dtype=torch.float64)
    text = _x(seed + 1, k, d, dtype=torch.float64)
    logits, text_term = head(z, text, return_text=True)
    cos = F.normalize(z, dim=-1) @ F.normalize(text, dim=-1).t()
    torch.testing.assert_close(text_term, 0.1 * cos / 0.01)
    torch.testing.assert_close(logits, z @ head.linear.weight.t() + head.linear.bias + 0.1 * cos / 0.01)
    torch.testing.assert_close(head(z, text), logits, atol=0, rtol=0)
    assert logits.shape == (*shape[:-1], k)


def test_linear_cosine_release_normalised_text_path():
    """The release divides z by its norm and uses already-normalised text as is."""
    head = LinearCosineHead(8, 3, normalize_text=False)
    z = _x(0, 4, 8)
    text = F.normalize(_x(1, 3, 8), dim=-1)
    release = head.linear(z) + 0.1 * ((z / z.norm(dim=-1, keepdim=True)) @ text.t() / 0.01)
    torch.testing.assert_close(head(z, text), release, atol=1e-6, rtol=1e-6)
    scaled = LinearCosineHead(8, 3, scale=0.0)
    assert torch.equal(scaled(z, text), scaled.linear(z))


def test_linear_cosine_gradcheck_and_errors():
    head = LinearCosineHead(4, 3, learnable_tau=True, tau=0.3, dtype=torch.float64)
    z, text = _x(2, 2, 4, dtype=torch.float64), _x(3, 3, 4, dtype=torch.float64)
    assert _gradcheck_module(head, z, text)
    with pytest.raises(ValueError, match=r"expected \[K=3, 4\], got shape \(5, 4\)"):
        head(z, _x(4, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"D=4.*\(2, 5\)"):
        head(torch.randn(2, 5, dtype=torch.float64), text)
    with pytest.raises(ValueError, match="num_classes"):
        LinearCosineHead(4, 0)
    assert "scale=0.1" in repr(head)


# ============================================================================= AUPairSmoothing


def _pair_reference(w: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
    """Zero-padded depthwise correlation inside each group, written as loops."""
    m, _, ks = w.shape
    pad = ks // 2
    flat = x.reshape(-1, group, m)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for i in range(group):
            for j in range(ks):
                src = i + j - pad
                if 0 <= src < group:
                    out[n, i] += w[:, 0, j] * flat[n, src]
    return out.reshape(x.shape)


def test_pair_smoothing_release_init_is_0_4_pair_mean():
    s = AUPairSmoothing(12)
    assert s.weight.shape == (12, 1, 5) and torch.equal(s.weight, torch.full((12, 1, 5), 0.2))
    x = _x(0, 3, 16, 12)
    pair_mean = x.view(3, 8, 2, 12).mean(2, keepdim=True).expand(3, 8, 2, 12).reshape(3, 16, 12)
    torch.testing.assert_close(s(x), 0.4 * pair_mean)
    # the release's flat [B*T, M] rows pair the same frames
    torch.testing.assert_close(s(x.reshape(48, 12)), s(x).reshape(48, 12), atol=0, rtol=0)


@given(
    group=st.integers(1, 4), ks=st.sampled_from([1, 3, 5, 7]), m=st.integers(1, 4), n=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pair_smoothing_matches_reference(group, ks, m, n, seed):
    s = AUPairSmoothing(m, group_size=group, kernel_size=ks, dtype=torch.float64)
    _perturb(s, seed)
    x = _x(seed, 2, n * group, m, dtype=torch.float64)
    torch.testing.assert_close(s(x), _pair_reference(s.weight, x, group))


def test_pair_smoothing_groups_do_not_mix_and_outer_taps_get_no_gradient():
    s = AUPairSmoothing(3)
    x = _x(1, 1, 6, 3)
    x2 = x.clone()
    x2[0, 2:] += 5.0
    torch.testing.assert_close(s(x)[0, :2], s(x2)[0, :2], atol=0, rtol=0)
    s(x).pow(2).sum().backward()
    assert torch.equal(s.weight.grad[:, :, [0, 4]], torch.zeros(3, 1, 2)), "taps +-2 never reach a pair"
    assert (s.weight.grad[:, :, 1:4] != 0).all()


def test_pair_smoothing_gradcheck_errors_and_options():
    s = AUPairSmoothing(2, dtype=torch.float64)
    _perturb(s, 2)
    assert _gradcheck_module(s, _x(3, 2, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected T % 2 == 0, got T=5"):
        s(torch.randn(1, 5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected \[..., T, 2\], got shape \(1, 4, 3\)"):
        s(torch.randn(1, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected 1, 3, 5, ..., got 4"):
        AUPairSmoothing(2, kernel_size=4)
    frozen = AUPairSmoothing(2, learnable=False, init_value=0.5)
    assert list(frozen.parameters()) == [] and torch.equal(frozen.weight, torch.full((2, 1, 5), 0.5))
    assert "group_size=2" in repr(frozen)


# ============================================================================= ReleasePriorMapping + factory


def _release_compute_maps(init_map, delta1, delta2, neutral, eps=1e-8, clamp=True):
    """The release's ``_compute_maps`` (BP4D: clamp of the remaining mass; DISFA: none)."""
    a = F.softmax(torch.log(init_map + eps) + delta1, dim=1) * init_map.sum(1).unsqueeze(1)
    a = torch.cat([a[:neutral], init_map[neutral : neutral + 1], a[neutral + 1 :]], 0)
    pt = init_map.t()
    keep = torch.ones(pt.shape[1], dtype=torch.bool)
    keep[neutral] = False
    col = pt[:, neutral : neutral + 1]
    rem = init_map.sum(0).unsqueeze(1) - col
    rem = rem.clamp_min(0.0) if clamp else rem
    b_free = F.softmax(torch.log(pt[:, keep] + eps) + delta2[:, keep], dim=1) * rem
    b = torch.zeros_like(pt)
    b[:, keep] = b_free
    b[:, neutral : neutral + 1] = col
    return a, b


@pytest.mark.parametrize("au_ds, k", [("bp4d", 7), ("bp4d", 11), ("disfa", 7), ("disfa", 11)])
def test_release_mapping_equals_release_compute_maps(au_ds, k):
    exprs = facs.EXPRESSIONS_7 if k == 7 else facs.EXPRESSIONS_11
    aus = facs.BP4D_AUS if au_ds == "bp4d" else facs.DISFA_AUS
    dpm = ReleasePriorMapping.from_facs(exprs, aus, dtype=torch.float64)
    neutral = exprs.index("neutral")
    assert dpm.fixed_rows == (neutral,)
    assert torch.equal(dpm.prior, facs.release_prior_table(au_ds, k).double())
    _perturb(dpm, 17, scale=1.0)
    ref_a, ref_b = _release_compute_maps(
        dpm.prior, dpm.delta_au2exp.detach(), dpm.delta_exp2au.detach(), neutral, clamp=au_ds == "bp4d"
    )
    a, b = dpm.maps()
    torch.testing.assert_close(a, ref_a, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(b, ref_b, rtol=1e-6, atol=1e-12)
    t_exp, t_au = _x(1, k, 8, dtype=torch.float64), _x(2, len(aus), 8, dtype=torch.float64)
    t_exp, t_au = F.normalize(t_exp, dim=-1), F.normalize(t_au, dim=-1)
    e, u = dpm(t_exp, t_au)
    ref_e = t_exp + torch.sigmoid(dpm.alpha_param) * (ref_a @ t_au)
    ref_u = t_au + torch.sigmoid(dpm.beta_param) * (ref_b @ t_exp)
    torch.testing.assert_close(e, ref_e / ref_e.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(u, ref_u / ref_u.norm(dim=-1, keepdim=True))
    # the fixed row / column get no gradient, as in the release
    (e.sum() + u.sum()).backward()
    assert torch.equal(dpm.delta_au2exp.grad[neutral], torch.zeros(len(aus)))
    assert torch.equal(dpm.delta_exp2au.grad[:, neutral], torch.zeros(len(aus)))


def test_release_mapping_parameter_layout():
    dpm = ReleasePriorMapping.from_facs(facs.EXPRESSIONS_7, facs.DISFA_AUS)
    shapes = {n: tuple(p.shape) for n, p in dpm.named_parameters()}
    assert shapes == {"delta_au2exp": (7, 8), "delta_exp2au": (8, 7), "alpha_param": (), "beta_param": ()}
    assert dpm.alpha.item() == pytest.approx(0.1) and dpm.alpha_param.item() == pytest.approx(math.log(0.1 / 0.9))
    assert ReleasePriorMapping.from_facs(facs.EXPRESSIONS_7, facs.DISFA_AUS, fix_neutral=False).fixed_rows == ()
    assert ReleasePriorMapping.from_facs(["anger", "neutral"], facs.DISFA_AUS).fixed_rows == (1,)
    assert "fixed_rows=(2,)" in repr(dpm)


def test_factory_and_compat_dispatch():
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS, source="ssm_release")
    assert type(build_prior_mapping(prior)) is DynamicPriorMapping
    assert type(build_prior_mapping(prior, variant="ssm_release")) is ReleasePriorMapping
    assert type(build_prior_mapping(prior, variant="linear")) is LinearSemanticMapping
    mlp = build_prior_mapping(prior, variant="mlp", hidden_dim=5)
    assert type(mlp) is MLPSemanticMapping and mlp.num_expressions == 7 and mlp.num_aus == 12
    # the single-class call form still builds the release class, with identical state
    old = DynamicPriorMapping(prior, variant="ssm_release", fixed_rows=(2,))
    new = ReleasePriorMapping(prior, fixed_rows=(2,))
    assert type(old) is ReleasePriorMapping
    assert list(old.state_dict()) == list(new.state_dict())
    for (n, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), n
    assert type(DynamicPriorMapping.from_facs(facs.EXPRESSIONS_7, facs.BP4D_AUS, variant="ssm_release")) is ReleasePriorMapping
    assert type(DynamicPriorMapping(prior, variant="paper")) is DynamicPriorMapping
    with pytest.warns(UserWarning, match="tau=0.5 applies to the paper"):
        build_prior_mapping(prior, variant="ssm_release", tau=0.5)
    with pytest.raises(ValueError, match=r"expected one of \('paper', 'ssm_release', 'linear', 'mlp'\), got 'fancy'"):
        build_prior_mapping(prior, variant="fancy")
    with pytest.raises(TypeError, match="tau"):
        ReleasePriorMapping(prior, tau=0.01)  # the release class has the release's arguments only
    paper_args = set(inspect.signature(DynamicPriorMapping.__init__).parameters)
    assert not paper_args & {"variant", "fixed_rows", "eps"}, "the paper class has the paper's arguments only"


def test_paper_and_release_share_the_residual_base():
    """One residual forward (t + alpha * f(other), optional renormalisation) serves every mapping."""
    forwards = {cls.forward for cls in (DynamicPriorMapping, ReleasePriorMapping, LinearSemanticMapping, MLPSemanticMapping)}
    assert len(forwards) == 1
    for cls in (DynamicPriorMapping, ReleasePriorMapping, LinearSemanticMapping, MLPSemanticMapping):
        assert "forward" not in cls.__dict__, f"{cls.__name__} must use the shared residual forward"
