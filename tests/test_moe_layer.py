"""MoEFFN: routing semantics, backend parity (outputs and every gradient), task routing, layouts, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from facelayers.moe import (
    SSM_RELEASE_MOE_KWARGS,
    MoEFFN,
    moe_aux_loss,
    moe_load_stats,
    moe_task_context,
)

PARAM_NAMES = ("router_weight", "router_bias", "w1", "b1", "w2", "b2", "gamma")
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make_layer(seed: int, d: int, h: int, e: int, k: int, t: int, dtype=torch.float64, **kw) -> MoEFFN:
    g = torch.Generator().manual_seed(seed)
    shared = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)).to(dtype)
    layer = MoEFFN(shared, d, num_experts=e, hidden_dim=h, top_k=k, num_tasks=t, dtype=dtype, **kw)
    with torch.no_grad():  # well-separated router logits (no top-k ties) and non-trivial biases
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
    return layer


def layer_reference(layer: MoEFFN, x: torch.Tensor, task_of_token: torch.Tensor) -> torch.Tensor:
    """Independent slow version of the paper's eqs. S1-S2 for x: [N, D] (each token its own experts)."""
    out = []
    for n in range(x.shape[0]):
        t = int(task_of_token[n])
        logits = x[n] @ layer.router_weight[t].T + layer.router_bias[t]
        probs = torch.softmax(logits, -1)
        top_p, top_i = probs.topk(layer.top_k)
        if layer.renormalize:
            top_p = top_p / top_p.sum()
        acc = torch.zeros_like(x[n])
        for j in range(layer.top_k):
            e = int(top_i[j])
            hid = F.gelu(x[n] @ layer.w1[t, e] + layer.b1[t, e])
            acc = acc + top_p[j] * (hid @ layer.w2[t, e] + layer.b2[t, e])
        out.append(layer.shared(x[n]) + layer.gamma * acc)
    return torch.stack(out)


def grads_of(layer: MoEFFN, x: torch.Tensor, gout: torch.Tensor, **fw):
    layer.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    out = layer(xx, **fw)
    (out * gout).sum().backward()
    grads = {"x": xx.grad}
    grads.update({n: getattr(layer, n).grad.clone() for n in PARAM_NAMES})
    return out.detach(), grads


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("gamma", ["vector", "scalar"])
def test_layer_matches_independent_reference(renormalize, gamma):
    """Every token is processed by the experts IT picked (the released code's mix-up is not reproduced)."""
    layer = make_layer(0, 6, 5, 4, 2, 2, renormalize=renormalize, gamma=gamma).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    tasks = torch.tensor([1, 0, 1])
    out = layer(x, task_ids=tasks)
    want = layer_reference(layer, x.reshape(-1, 6), tasks.repeat_interleave(4)).view_as(x)
    torch.testing.assert_close(out, want, **TOL[torch.float64])


@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    seq=st.integers(1, 4),
    d=st.integers(1, 8),
    h=st.integers(1, 8),
    e=st.integers(1, 4),
    k_raw=st.integers(1, 3),
    t=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    gamma=st.sampled_from(["vector", "scalar"]),
)
def test_torch_backend_matches_reference_backend(seed, b, seq, d, h, e, k_raw, t, dtype, gamma):
    k = min(k_raw, e)
    layer = make_layer(seed, d, h, e, k, t, dtype=dtype, gamma=gamma).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, seq, d, generator=g, dtype=torch.float64).to(dtype)
    gout = torch.randn(b, seq, d, generator=g, dtype=torch.float64).to(dtype)
    tasks = torch.randint(0, t, (b,), generator=g)
    layer.backend = "torch"
    out_t, g_t = grads_of(layer, x, gout, task_ids=tasks)
    layer.backend = "reference"
    out_r, g_r = grads_of(layer, x, gout, task_ids=tasks)
    torch.testing.assert_close(out_t, out_r, **TOL[dtype], msg=lambda m: f"out: {m}")
    for name in ("x",) + PARAM_NAMES:
        torch.testing.assert_close(g_t[name], g_r[name], **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), e=st.integers(2, 4))
def test_bf16_layer_close_to_fp64(seed, e):
    layer64 = make_layer(seed, 16, 12, e, 2, 2).eval()
    layer16 = make_layer(seed, 16, 12, e, 2, 2, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p16, p64 in zip(layer16.parameters(), layer64.parameters()):
            p64.copy_(p16.double())  # identical values, so only precision differs
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).bfloat16()
    tasks = torch.tensor([0, 1])
    out16 = layer16(x, task_ids=tasks)
    out64 = layer64(x.double(), task_ids=tasks)
    assert out16.dtype == torch.bfloat16
    rel = ((out16.double() - out64).norm() / out64.norm()).item()
    assert rel < 3e-2, f"bf16 layer relative error {rel:.3g}"


def test_gradcheck_layer_fp64():
    layer = make_layer(2, 3, 2, 3, 2, 2).eval()
    params = {n: getattr(layer, n).detach().clone().requires_grad_(True) for n in PARAM_NAMES}
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([1, 0])

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(PARAM_NAMES, ps)), (x,), {"task_ids": tasks})

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-6, fast_mode=True)


def test_mixed_task_batch_equals_each_task_separately():
    layer = make_layer(3, 8, 6, 4, 2, 2).eval()
    x = torch.randn(5, 7, 8, dtype=torch.float64)
    tasks = torch.tensor([0, 1, 1, 0, 1])
    with moe_task_context(layer, tasks):
        mixed = layer(x)
    for t in (0, 1):
        sel = tasks == t
        with moe_task_context(layer, t):
            alone = layer(x[sel])
        torch.testing.assert_close(mixed[sel], alone, rtol=1e-12, atol=1e-12)
    # and the two tasks really differ
    assert not torch.allclose(layer(x, task_ids=0), layer(x, task_ids=1))


def test_layouts_batch_first_seq_first_and_tokens():
    layer = make_layer(4, 6, 5, 3, 2, 3).eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)  # [B, L, D]
    tasks = torch.tensor([2, 0])
    ref = layer(x, task_ids=tasks)
    layer.batch_first = False
    torch.testing.assert_close(layer(x.transpose(0, 1), task_ids=tasks).transpose(0, 1), ref)
    layer.batch_first = None  # detection from the number of task ids
    torch.testing.assert_close(layer(x.transpose(0, 1), task_ids=tasks).transpose(0, 1), ref)
    torch.testing.assert_close(layer(x, task_ids=tasks), ref)
    with pytest.raises(ValueError, match="cannot detect the batch dimension"):
        layer(torch.randn(2, 2, 6, dtype=torch.float64), task_ids=tasks)
    tokens = x.reshape(-1, 6)
    torch.testing.assert_close(layer(tokens, task_ids=tasks.repeat_interleave(5)), ref.reshape(-1, 6))


def test_default_task_is_zero_and_context_restores():
    from facelayers.moe import MissingTaskIdsWarning

    layer = make_layer(5, 4, 4, 2, 1, 2).eval()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with pytest.warns(MissingTaskIdsWarning, match="ran without task ids"):  # two tasks, no ids: said once
        no_ids = layer(x)
    torch.testing.assert_close(no_ids, layer(x, task_ids=0))
    with moe_task_context(layer, [1, 1, 1]):
        with moe_task_context(layer, 0):
            torch.testing.assert_close(layer(x), layer(x, task_ids=0))
        torch.testing.assert_close(layer(x), layer(x, task_ids=1))
    assert layer._task_ids is None


def test_zero_gamma_or_zero_private_is_bit_identical_to_shared():
    layer = make_layer(6, 8, 6, 4, 2, 2, dtype=torch.float32).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        layer.gamma.zero_()
    assert torch.equal(layer(x, task_ids=[0, 1, 1]), layer.shared(x))
    with torch.no_grad():
        layer.gamma.fill_(0.3)
        for n in ("w1", "b1", "w2", "b2"):
            getattr(layer, n).zero_()
    assert torch.equal(layer(x, task_ids=[0, 1, 1]), layer.shared(x))


def test_load_stats_and_switch_aux_loss():
    layer = make_layer(7, 6, 4, 4, 2, 2, aux_loss="switch").eval()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([0, 0, 1])
    layer(x, task_ids=tasks)
    load = layer.last_load
    assert load.shape == (2, 4)
    assert load.sum(1).tolist() == [2 * 4 * 2, 1 * 4 * 2]  # tokens of the task * top_k
    # manual Switch loss: mean over tasks of E * sum_e f_e * P_e
    tok_task = tasks.repeat_interleave(4)
    manual = []
    for t in (0, 1):
        xt = x.reshape(-1, 6)[tok_task == t]
        probs = torch.softmax(xt @ layer.router_weight[t].T + layer.router_bias[t], -1)
        frac = load[t].double() / (xt.shape[0] * 2)
        manual.append(4 * (frac * probs.mean(0)).sum())
    torch.testing.assert_close(layer.aux_loss, torch.stack(manual).mean())
    torch.testing.assert_close(layer.last_router_prob[1], probs.mean(0).detach())
    layer.aux_loss.backward()
    assert layer.router_weight.grad.abs().sum() > 0
    assert moe_aux_loss(layer) is not None and set(moe_load_stats(nn.Sequential(layer))) == {"0"}
    plain = make_layer(7, 6, 4, 4, 2, 2).eval()
    plain(x.detach(), task_ids=tasks)
    assert plain.aux_loss is None and moe_aux_loss(plain) is None


def test_router_noise_only_in_training():
    layer = make_layer(8, 6, 4, 4, 2, 1, noise_std=1e-2)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_release_options_scalar_gamma_and_unnormalised_gates():
    shared = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    kw = dict(SSM_RELEASE_MOE_KWARGS, hidden_dim=4)
    layer = MoEFFN(shared, 8, **kw).eval()
    assert layer.gamma.shape == () and layer.num_tasks == 1 and not layer.renormalize
    assert layer.noise_std == pytest.approx(1e-2)
    _, gates, _ = layer._route(torch.randn(5, 8), None)
    assert (gates.sum(-1) < 1).all()
    assert layer(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_autocast_bf16_cpu():
    layer = make_layer(9, 16, 8, 4, 2, 2, dtype=torch.float32).eval()
    x = torch.randn(2, 6, 16)
    ref = layer(x, task_ids=[0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, task_ids=[0, 1])
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, f"autocast relative error {rel:.3g}"


def test_torch_compile_eager_backend_runs_layer():
    layer = make_layer(10, 8, 6, 4, 2, 2, dtype=torch.float32).eval()
    x = torch.randn(2, 3, 8)
    tasks = torch.tensor([1, 0])
    compiled = torch.compile(layer, backend="eager")
    out = compiled(x, task_ids=tasks)
    torch.testing.assert_close(out, layer(x, task_ids=tasks))
    out.sum().backward()
    assert layer.w1.grad is not None


def test_meta_device_reset_parameters_and_repr():
    shared = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).to("meta")
    layer = MoEFFN(shared, 8, num_experts=3, hidden_dim=5, num_tasks=2, device="meta")
    assert layer.w1.shape == (2, 3, 8, 5) and layer.w1.is_meta
    cpu = MoEFFN(nn.Linear(8, 8), 8, num_experts=3, hidden_dim=5, num_tasks=2)
    assert torch.equal(cpu.b1, torch.zeros_like(cpu.b1)) and torch.allclose(cpu.gamma, torch.full((8,), 0.1))
    assert cpu.w1.abs().max() <= (6 / 13) ** 0.5
    r = repr(cpu)
    for field in ("dim=8", "hidden_dim=5", "num_experts=3", "top_k=2", "num_tasks=2", "gamma='vector'"):
        assert field in r


def test_attribute_delegation_to_shared():
    shared = nn.Sequential()
    shared.add_module("c_fc", nn.Linear(4, 8))
    shared.add_module("gelu", nn.GELU())
    shared.add_module("c_proj", nn.Linear(8, 4))
    layer = MoEFFN(shared, 4, num_experts=2, hidden_dim=3)
    assert layer.c_fc is shared.c_fc and layer.c_fc.weight.dtype == torch.float32
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        layer.nonexistent


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(top_k=5, num_experts=4), r"top_k must be <= num_experts \(4\)"),
        (dict(num_experts=0), "num_experts must be a positive int"),
        (dict(gamma="matrix"), "gamma must be"),
        (dict(aux_loss="zloss"), "aux_loss must be"),
        (dict(activation="swish"), "activation must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(noise_std=-1.0), "noise_std must be >= 0"),
    ],
)
def test_bad_constructor_args(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEFFN(nn.Linear(4, 4), 4, **kwargs)


def test_bad_forward_inputs():
    layer = make_layer(11, 6, 4, 3, 2, 2).eval()
    with pytest.raises(ValueError, match=r"built for dim=6, got input with last dim 5"):
        layer(torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank 2"):
        layer(torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank 2"):
        layer(torch.randn(1, 2, 3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\)"):
        layer(torch.randn(2, 3, 6, dtype=torch.float64), task_ids=[0, 2])
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\)"):
        with moe_task_context(layer, torch.tensor([-1, 0])):
            pass
    with pytest.raises(ValueError, match="B=2"):
        layer(torch.randn(2, 3, 6, dtype=torch.float64), task_ids=[0, 1, 1])
    with pytest.raises(ValueError, match="N=4"):
        layer(torch.randn(4, 6, dtype=torch.float64), task_ids=[0, 1])
    with pytest.raises(TypeError, match="integer tensor"):
        layer(torch.randn(2, 3, 6, dtype=torch.float64), task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="contains no MoEFFN"):
        with moe_task_context(nn.Linear(2, 2), 0):
            pass


@pytest.mark.requires_triton
def test_layer_triton_backend_matches_torch_backend_on_cpu():
    """Integration with the Triton op (issue 4): CPU tensors run the kernels in the interpreter."""
    pytest.importorskip("triton")
    try:
        from facelayers.ops.grouped_experts.op import grouped_expert_mlp_triton  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Triton op unavailable: {exc}")
    layer = make_layer(12, 16, 12, 3, 2, 2, dtype=torch.float32).eval()
    x = torch.randn(2, 5, 16)
    gout = torch.randn(2, 5, 16)
    tasks = torch.tensor([0, 1])
    layer.backend = "torch"
    out_t, g_t = grads_of(layer, x, gout, task_ids=tasks)
    layer.backend = "triton"
    out_k, g_k = grads_of(layer, x, gout, task_ids=tasks)
    torch.testing.assert_close(out_k, out_t, **TOL[torch.float32], msg=lambda m: f"out: {m}")
    for name in ("x",) + PARAM_NAMES:
        torch.testing.assert_close(g_k[name], g_t[name], **TOL[torch.float32], msg=lambda m, n=name: f"d{n}: {m}")


# ---------------------------------------------------------------- composition by injection (issue 13)
from facelayers.moe import (  # noqa: E402
    LEGACY_PARAMETER_NAMES,
    GroupedExperts,
    RouterOutput,
    TaskTopKRouter,
    inject_moe_,
)
from facelayers.ops.grouped_experts import register_backend, unregister_backend  # noqa: E402


class FixedFirstExpertsRouter(TaskTopKRouter):
    """Always experts 0..k-1 with equal gates (a custom router by subclassing: no patching)."""

    def select(self, probs):
        n = probs.shape[0]
        top_i = torch.arange(self.top_k, device=probs.device).expand(n, self.top_k)
        return probs.new_full((n, self.top_k), 1.0 / self.top_k), top_i


class ConstantRouter(nn.Module):
    """A router written from scratch against the protocol (no TaskTopKRouter base)."""

    def __init__(self, dim, num_experts, *, top_k, num_tasks, expert, **_unused):
        super().__init__()
        self.num_experts, self.top_k, self.num_tasks, self.expert = num_experts, top_k, num_tasks, expert

    def forward(self, tokens, task_of_token=None, layout=None):
        n = tokens.shape[0]
        idx = torch.full((n, self.top_k), self.expert, dtype=torch.long)
        if task_of_token is not None:
            idx = idx + (task_of_token * self.num_experts).unsqueeze(1)
        probs = torch.full((n, self.num_experts), 1.0 / self.num_experts, dtype=torch.float64)
        return RouterOutput(idx, torch.full((n, self.top_k), 0.5, dtype=torch.float64), probs)


def test_custom_router_class_swaps_in_without_patching():
    base = make_layer(20, 6, 5, 4, 2, 2)
    layer = MoEFFN(base.shared, 6, num_experts=4, hidden_dim=5, top_k=2, num_tasks=2, dtype=torch.float64,
                   router_layer=FixedFirstExpertsRouter).eval()
    layer.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    tasks = torch.tensor([1, 0])
    out = layer(x, task_ids=tasks)
    want = []
    for b in range(2):
        t = int(tasks[b])
        acc = sum(0.5 * (F.gelu(x[b] @ layer.w1[t, e] + layer.b1[t, e]) @ layer.w2[t, e] + layer.b2[t, e])
                  for e in (0, 1))
        want.append(layer.shared(x[b]) + layer.gamma * acc)
    torch.testing.assert_close(out, torch.stack(want))
    assert layer.last_load[1].tolist() == [3, 3, 0, 0] and layer.last_load[0].tolist() == [3, 3, 0, 0]


def test_protocol_router_factory_and_built_modules():
    shared = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    layer = MoEFFN(shared, 4, num_experts=3, hidden_dim=2, num_tasks=2,
                   router_layer=lambda **kw: ConstantRouter(**kw, expert=2))
    layer(torch.randn(2, 5, 4), task_ids=[0, 1])
    assert layer.last_load.tolist() == [[0, 0, 10], [0, 0, 10]]
    built = TaskTopKRouter(4, 3, top_k=1, num_tasks=2)
    bank = GroupedExperts(4, 2, 3, num_tasks=2, backend="reference")
    layer = MoEFFN(shared, 4, num_experts=3, top_k=1, num_tasks=2, router_layer=built, experts_layer=bank)
    assert layer.router is built and layer.experts is bank and layer.backend == "reference"
    with pytest.raises(ValueError, match=r"does not match the layer's num_experts \(expected num_experts=4, got 3\)"):
        MoEFFN(shared, 4, router_layer=TaskTopKRouter(4, 3))
    with pytest.raises(TypeError, match=r"expected nn.Module or callable, got int"):
        MoEFFN(shared, 4, experts_layer=3)
    with pytest.raises(ValueError, match=r"expected a class or factory building one per layer"):
        inject_moe_(nn.Sequential(shared, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))),
                    filter_fn=lambda m, n: n in ("0", "1"), router_layer=TaskTopKRouter(4, 4))


def test_router_forward_hook_replaces_routing_publicly():
    """What a debugging aid (drop one expert) needs, through nn.Module's public hook API."""
    layer = make_layer(21, 6, 5, 4, 2, 2).eval()

    def drop_expert_0(module, args, out):
        masked = out.probs.masked_fill(torch.arange(module.num_experts) == 0, -1.0)
        top_i = masked.topk(module.top_k, dim=-1).indices
        tasks = args[1]
        return RouterOutput(top_i + (tasks * module.num_experts).unsqueeze(1), out.probs.gather(1, top_i), out.probs)

    x = torch.randn(3, 4, 6, dtype=torch.float64)
    handle = layer.router.register_forward_hook(drop_expert_0)
    layer(x, task_ids=[0, 1, 1])
    assert layer.last_load[:, 0].tolist() == [0, 0] and layer.last_load.sum() == 3 * 4 * 2
    handle.remove()
    layer(x, task_ids=[0, 1, 1])
    assert layer.last_load[:, 0].sum() > 0


def test_old_checkpoint_names_load():
    """A state dict in the older flat naming (generated through the documented LEGACY_PARAMETER_NAMES)."""
    assert LEGACY_PARAMETER_NAMES == {"router_weight": "router.weight", "router_bias": "router.bias",
                                      "w1": "experts.w1", "b1": "experts.b1", "w2": "experts.w2", "b2": "experts.b2"}
    source = nn.Sequential(make_layer(22, 6, 5, 4, 2, 2))
    new_to_old = {new: old for old, new in LEGACY_PARAMETER_NAMES.items()}
    old_sd = {}
    for key, value in source.state_dict().items():
        local = key[len("0."):]
        old_sd["0." + new_to_old.get(local, local)] = value.clone()
    assert "0.router_weight" in old_sd and "0.experts.w1" not in old_sd and "0.gamma" in old_sd
    target = nn.Sequential(make_layer(23, 6, 5, 4, 2, 2))
    result = target.load_state_dict(old_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(target[0](x, task_ids=[1, 0]), source[0](x, task_ids=[1, 0]), rtol=0, atol=0)


def test_registered_backend_reaches_the_layer():
    calls = []

    def counting(x, idx, w, w1, b1, w2, b2, activation):
        calls.append(tuple(idx.shape))
        from facelayers.ops.grouped_experts.torch_backend import grouped_expert_mlp_torch

        return grouped_expert_mlp_torch(x, idx, w, w1, b1, w2, b2, activation)

    register_backend("counting_test", counting)
    try:
        layer = make_layer(24, 6, 5, 4, 2, 2).eval()
        ref = layer(torch.ones(2, 3, 6, dtype=torch.float64), task_ids=[0, 1])
        layer.backend = "counting_test"
        out = layer(torch.ones(2, 3, 6, dtype=torch.float64), task_ids=[0, 1])
        assert calls == [(6, 2)]
        torch.testing.assert_close(out, ref)
    finally:
        unregister_backend("counting_test")
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'counting_test'"):
        layer.backend = "counting_test"


# ---------------------------------------------------------------- bad input (issue 15)
def test_input_dtype_must_match_parameters():
    layer = make_layer(25, 6, 5, 4, 2, 2)  # float64
    with pytest.raises(TypeError, match=r"expected torch.float64, got torch.float32"):
        layer(torch.randn(2, 3, 6), task_ids=[0, 1])


def test_dim_must_match_shared_ffn():
    with pytest.raises(ValueError, match=r"dim does not match the shared FFN's input width \(expected dim=8.*got dim=6\)"):
        MoEFFN(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), 6)
    with pytest.raises(ValueError, match=r"output width \(expected dim=5.*got dim=8\)"):
        MoEFFN(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5)), 8)


@pytest.mark.parametrize("blocks, pattern", [
    (["0"], r"block indices must be ints \(expected int, got str '0'\)"),
    ([0.0], r"block indices must be ints \(expected int, got float 0.0\)"),
    ([True], r"block indices must be ints \(expected int, got bool True\)"),
    (2.5, r"expected one of those, got float"),
    ({0}, r"expected one of those, got set"),
])
def test_inject_rejects_bad_blocks(blocks, pattern):
    open_clip = pytest.importorskip("open_clip")
    from _testutils import tiny_clip_kwargs

    with pytest.raises(TypeError, match=pattern):
        inject_moe_(open_clip.CLIP(**tiny_clip_kwargs()), blocks=blocks, hidden_dim=4)


def _expected_private_draws(seed: int, d: int, h: int, e: int, t: int) -> tuple[torch.Tensor, ...]:
    """The layer's documented draw order, computed independently: w1, w2 (Xavier bound sqrt(6/(D+H))),
    then the router weight (gain 0.1, bound 0.1*sqrt(6/(D+E))), all from the global generator."""
    torch.manual_seed(seed)
    bound, rbound = (6.0 / (d + h)) ** 0.5, 0.1 * (6.0 / (d + e)) ** 0.5
    w1 = torch.empty(t, e, d, h).uniform_(-bound, bound)
    w2 = torch.empty(t, e, h, d).uniform_(-bound, bound)
    rw = torch.empty(t, e, d).uniform_(-rbound, rbound)
    return w1, w2, rw, torch.rand(3)  # the next draws after construction


def test_construction_draws_the_documented_sequence_at_a_seed():
    d, h, e, t = 6, 5, 4, 2
    w1, w2, rw, after = _expected_private_draws(7, d, h, e, t)
    shared = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    torch.manual_seed(7)
    layer = MoEFFN(shared, d, num_experts=e, hidden_dim=h, top_k=2, num_tasks=t)
    assert torch.equal(layer.experts.w1, w1) and torch.equal(layer.experts.w2, w2)
    assert torch.equal(layer.router.weight, rw)
    assert torch.equal(torch.rand(3), after)  # construction consumed exactly those three draws
    assert not layer.router.bias.any() and not layer.experts.b1.any() and not layer.experts.b2.any()
    # reset_parameters() redraws the same sequence
    torch.manual_seed(7)
    layer.reset_parameters()
    assert torch.equal(layer.experts.w1, w1) and torch.equal(layer.router.weight, rw)
    assert torch.equal(torch.rand(3), after)


def test_injected_built_parts_keep_their_weights_and_draw_nothing():
    d, h, e, t = 6, 5, 4, 2
    from facelayers.moe import GroupedExperts, TaskTopKRouter

    shared = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    router = TaskTopKRouter(d, e, top_k=2, num_tasks=t)
    bank = GroupedExperts(d, h, e, num_tasks=t)
    r_w, b_w1 = router.weight.detach().clone(), bank.w1.detach().clone()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    layer = MoEFFN(shared, d, num_experts=e, hidden_dim=h, num_tasks=t, router_layer=router, experts_layer=bank)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    assert torch.equal(layer.router.weight, r_w) and torch.equal(layer.experts.w1, b_w1)
    # a built router with a default bank: only the bank draws (w1, w2), the router keeps its weight
    w1, w2, _, _ = _expected_private_draws(11, d, h, e, t)
    torch.manual_seed(11)
    layer = MoEFFN(shared, d, num_experts=e, hidden_dim=h, num_tasks=t, router_layer=router)
    assert torch.equal(layer.experts.w1, w1) and torch.equal(layer.experts.w2, w2)
    assert torch.equal(layer.router.weight, r_w)


def test_parameter_order_is_the_pre_composition_layers():
    """parameters() lists router, experts, gamma, then the shared FFN (positional optimizer state and
    order-dependent reductions such as clip_grad_norm_'s total norm stay as before the composition)."""
    shared = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
    model = nn.Sequential(nn.Linear(6, 6), MoEFFN(shared, 6, num_experts=3, hidden_dim=4, num_tasks=2), nn.LayerNorm(6))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.router.weight", "1.router.bias", "1.experts.w1", "1.experts.b1",
                     "1.experts.w2", "1.experts.b2", "1.gamma", "1.shared.0.weight", "1.shared.0.bias",
                     "1.shared.2.weight", "1.shared.2.bias", "2.weight", "2.bias"]
    assert [p for p in model.parameters()] == [p for _, p in model.named_parameters()]
    # the same modules and names as nn.Module's pre-order, each once
    mods = [n for n, _ in model.named_modules()]
    assert sorted(mods) == sorted(["", "0", "1", "1.shared", "1.shared.0", "1.shared.1", "1.shared.2", "1.router",
                                   "1.experts", "2"]) and len(set(mods)) == len(mods)
    assert model.get_submodule("1.router") is model[1].router
    # a shared (tied) layer appears once; remove_duplicate=False lists it again
    layer = model[1]
    tied = nn.Sequential(layer, layer)
    assert len([m for m in tied.modules() if m is layer]) == 1
    assert len([m for _, m in tied.named_modules(remove_duplicate=False) if m is layer]) == 2


@pytest.mark.requires_cuda
def test_construction_on_cuda_draws_the_documented_sequence():
    """On a CUDA device the draws come from that device's generator; the CPU generator is untouched."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    d, h, e, t = 6, 5, 4, 2
    bound, rbound = (6.0 / (d + h)) ** 0.5, 0.1 * (6.0 / (d + e)) ** 0.5
    torch.manual_seed(5)  # seeds the CPU and every CUDA generator
    w1 = torch.empty(t, e, d, h, device="cuda").uniform_(-bound, bound)
    w2 = torch.empty(t, e, h, d, device="cuda").uniform_(-bound, bound)
    rw = torch.empty(t, e, d, device="cuda").uniform_(-rbound, rbound)
    after = torch.rand(3, device="cuda")
    shared = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)).cuda()
    torch.manual_seed(5)
    cpu_state = torch.get_rng_state()
    layer = MoEFFN(shared, d, num_experts=e, hidden_dim=h, num_tasks=t, device="cuda")
    assert torch.equal(layer.experts.w1, w1) and torch.equal(layer.experts.w2, w2)
    assert torch.equal(layer.router.weight, rw) and torch.equal(torch.rand(3, device="cuda"), after)
    assert torch.equal(torch.get_rng_state(), cpu_state)
