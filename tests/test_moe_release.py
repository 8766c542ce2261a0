"""The released SSM code's MoE, reproduced on purpose: misrouted dispatch router, shared-expert GELU, settings.

The slow re-statement below is written from the released code's behaviour (``ssm/models/moe.py``,
``TrueMoE_FFN``): tokens flattened in the order the OpenAI-CLIP blocks see them (``[L, N]``), a
linear gate, softmax, top-k values NOT renormalised, and the dispatch that reads the ``[N_tok, k]``
top-k index matrix back flat in ``k`` chunks of ``N_tok``; the shared expert runs exact GELU.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from _testutils import tiny_clip_kwargs
from torch import nn

from facelayers.moe import (
    SSM_RELEASE_MOE_KWARGS,
    MoEFFN,
    ReleaseMisroutedTopKRouter,
    TaskTopKRouter,
    TokenLayout,
    inject_moe_,
    set_shared_activation_,
)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def clip_mlp(d: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=QuickGELU(), c_proj=nn.Linear(4 * d, d)))


def release_layer(d: int, seed: int, *, batch_first: bool, dtype=torch.float64) -> MoEFFN:
    torch.manual_seed(seed)
    kw = dict(SSM_RELEASE_MOE_KWARGS, hidden_dim=5)
    layer = MoEFFN(clip_mlp(d).to(dtype), d, router_layer=ReleaseMisroutedTopKRouter, batch_first=batch_first,
                   dtype=dtype, **kw)
    set_shared_activation_(layer.shared, "gelu")
    with torch.no_grad():  # spread the router logits (distinct top-k) and make alpha matter
        layer.router.weight.normal_(0, 1.0)
        layer.router.bias.normal_(0, 0.3)
        layer.experts.b1.normal_(0, 0.2)
        layer.experts.b2.normal_(0, 0.2)
        layer.gamma.fill_(0.7)
    return layer.eval()


def release_restatement(layer: MoEFFN, x_seq_first: torch.Tensor) -> torch.Tensor:
    """Slow loop over the release's computation for ``x`` of shape ``[L, N, D]`` (OpenAI-CLIP block order)."""
    length, n_img, d = x_seq_first.shape
    rows = x_seq_first.reshape(length * n_img, d)  # token r = l * N + n
    n_tok, k = rows.shape[0], layer.top_k
    gate_w, gate_b = layer.router.weight[0], layer.router.bias[0]  # [E, D], [E]
    w1, b1, w2, b2 = (p[0] for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2))
    chosen, values = [], []
    for r in range(n_tok):
        probs = torch.softmax(rows[r] @ gate_w.T + gate_b, dim=-1)
        v, i = torch.topk(probs, k)  # kept as they are: no renormalisation
        chosen.append(i)
        values.append(v)
    flat_choices = torch.cat(chosen)  # row-major: token 0's k choices, then token 1's, ...
    out = []
    for r in range(n_tok):
        side = torch.zeros(d, dtype=rows.dtype)
        for j in range(k):
            e = int(flat_choices[j * n_tok + r])  # slot j of token r: the j-th chunk of n_tok entries
            hidden = F.gelu(rows[r] @ w1[e] + b1[e])
            side = side + values[r][j] * (hidden @ w2[e] + b2[e])
        c_fc, c_proj = layer.shared.c_fc, layer.shared.c_proj
        shared = c_proj(F.gelu(c_fc(rows[r])))  # exact GELU in the release's shared expert
        out.append(shared + layer.gamma * side)
    return torch.stack(out).view(length, n_img, d)


@pytest.mark.parametrize("batch_first", [True, False], ids=["BLD", "LBD"])
def test_misrouted_router_matches_release_restatement(batch_first):
    layer = release_layer(6, 0, batch_first=batch_first)
    g = torch.Generator().manual_seed(1)
    x_seq = torch.randn(5, 3, 6, generator=g, dtype=torch.float64)  # [L=5, N=3, D]
    want = release_restatement(layer, x_seq)
    with torch.no_grad():
        if batch_first:
            got = layer(x_seq.transpose(0, 1).contiguous()).transpose(0, 1)
        else:
            got = layer(x_seq)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_misrouting_makes_images_depend_on_each_other_and_the_fix_does_not():
    layer = release_layer(6, 2, batch_first=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)  # [B, L, D]
    other = x.clone()
    other[1:] = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(layer(x)[0], layer(other)[0]), "release dispatch: image 0 depends on the others"
        fixed = MoEFFN(layer.shared, 6, batch_first=True, dtype=torch.float64,
                       **dict(SSM_RELEASE_MOE_KWARGS, hidden_dim=5)).eval()
        fixed.load_state_dict(layer.state_dict())
        assert isinstance(fixed.router, TaskTopKRouter) and not isinstance(fixed.router, ReleaseMisroutedTopKRouter)
        torch.testing.assert_close(fixed(x)[0], fixed(other)[0], rtol=0, atol=0)
        assert not torch.allclose(fixed(x), layer(x))


def test_misread_index_formula_on_a_known_matrix():
    router = ReleaseMisroutedTopKRouter(4, 3, top_k=2)
    top_i = torch.tensor([[0, 1], [2, 0], [1, 2]])  # 3 tokens, k = 2; flat = 0 1 2 0 1 2
    assert router.assign(top_i, TokenLayout((3,), None)).tolist() == [[0, 0], [1, 1], [2, 2]]
    # [B=1, L=3] input: the same tokens in seq-major order, so the same result
    assert router.assign(top_i, TokenLayout((1, 3), 0)).tolist() == [[0, 0], [1, 1], [2, 2]]
    with pytest.raises(ValueError, match=r"expected MoEFFN.batch_first True or False"):
        router.assign(top_i, TokenLayout((1, 3), None))


def test_release_settings_noise_gates_gamma_init():
    """SSM_RELEASE_MOE_KWARGS against the release: noise in training only, raw top-k softmax values
    (sum < 1), scalar γ = 0.1, gate init Xavier-uniform with gain 0.1 and zero bias, exact-GELU experts
    with Xavier-uniform weights and zero biases, 4 experts of width 512, top-2, one pool."""
    kw = SSM_RELEASE_MOE_KWARGS
    assert (kw["num_experts"], kw["top_k"], kw["hidden_dim"], kw["num_tasks"]) == (4, 2, 512, 1)
    assert kw["renormalize"] is False and kw["noise_std"] == 1e-2 and kw["activation"] == "gelu"
    layer = MoEFFN(clip_mlp(16), 16, router_layer=ReleaseMisroutedTopKRouter, **kw)
    assert layer.gamma.shape == () and float(layer.gamma.detach()) == pytest.approx(0.1)
    assert layer.router.weight.abs().max() <= 0.1 * (6 / (16 + 4)) ** 0.5 and not layer.router.bias.any()
    assert layer.experts.w1.abs().max() <= (6 / (16 + 512)) ** 0.5 and not layer.experts.b1.any()
    x = torch.randn(2, 3, 16)
    out = layer.router(x.reshape(-1, 16), None, TokenLayout((2, 3), 0))
    assert (out.gates.sum(-1) < 1).all()
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_shared_activation_option_on_open_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_kwargs(), quick_gelu=True)
    keys = list(model.state_dict())
    inject_moe_(model, blocks="all", hidden_dim=8, shared_activation="gelu", router_layer=ReleaseMisroutedTopKRouter)
    moe = model.visual.transformer.resblocks[0].mlp
    assert isinstance(moe.shared.gelu, nn.GELU) and moe.shared.gelu.approximate == "none"
    assert isinstance(moe.router, ReleaseMisroutedTopKRouter)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe.shared(x), moe.shared.c_proj(F.gelu(moe.shared.c_fc(x))), rtol=0, atol=0)
    assert all(k in model.state_dict() or ".mlp." in k for k in keys)
    default = open_clip.CLIP(**tiny_clip_kwargs(), quick_gelu=True)
    inject_moe_(default, blocks="all", hidden_dim=8)
    assert type(default.visual.transformer.resblocks[0].mlp.shared.gelu).__name__ == "QuickGELU"


def test_shared_activation_errors():
    with pytest.raises(ValueError, match=r"expected exactly one parameter-free activation child, got 2"):
        set_shared_activation_(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.ReLU()), "gelu")
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'swish'"):
        set_shared_activation_(nn.Sequential(nn.Linear(2, 2), nn.GELU()), "swish")
    with pytest.raises(TypeError, match=r"expected None/str/nn.Module, got int"):
        inject_moe_(nn.Sequential(clip_mlp(4)), filter_fn=lambda m, n: n == "0", hidden_dim=2, shared_activation=3)
