"""Tests of DynamicPriorMapping (paper eqs. 19-24, and the released code's map) and Table VII siblings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from facelayers import facs
from facelayers.prior_mapping import DynamicPriorMapping, LinearSemanticMapping, MLPSemanticMapping

RELEASE_TABLES = [("bp4d", 7), ("bp4d", 11), ("disfa", 7), ("disfa", 11)]
K7, M12 = len(facs.EXPRESSIONS_7), len(facs.BP4D_AUS)
NEUTRAL = facs.EXPRESSIONS_7.index("neutral")


def _text(k, m, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)


def _release_reference(p, d1, d2, fixed, eps=1e-8):
    """The released code's maps, written directly from its formulas (softmax of log-prior + delta)."""
    k, m = p.shape
    a = F.softmax(torch.log(p + eps) + d1, dim=1) * p.sum(1, keepdim=True)
    for r in fixed:
        a[r] = p[r]
    pt = p.t()
    free = [j for j in range(k) if j not in fixed]
    b = torch.zeros(m, k, dtype=p.dtype)
    b[:, free] = F.softmax(torch.log(pt[:, free] + eps) + d2[:, free], dim=1) * pt[:, free].sum(1, keepdim=True)
    for r in fixed:
        b[:, r] = pt[:, r]
    return a, b


def _steps(module, t_exp, t_au, n=3, lr=0.05):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(123)
    target_e, target_a = torch.randn(t_exp.shape, generator=g), torch.randn(t_au.shape, generator=g)
    for _ in range(n):
        opt.zero_grad()
        e, a = module(t_exp, t_au)
        ((e - target_e) ** 2).sum().add(((a - target_a) ** 2).sum()).backward()
        opt.step()


# ----------------------------------------------------------------------------- ssm_release


@pytest.mark.parametrize("table", RELEASE_TABLES, ids=[f"{a}-{k}" for a, k in RELEASE_TABLES])
def test_release_maps_equal_prior_at_init(table):
    exprs = facs.EXPRESSIONS_7 if table[1] == 7 else facs.EXPRESSIONS_11
    aus = facs.BP4D_AUS if table[0] == "bp4d" else facs.DISFA_AUS
    prior = facs.prior_matrix(exprs, aus, source="ssm_release")
    for dpm in (
        DynamicPriorMapping.from_facs(exprs, aus, variant="ssm_release"),
        DynamicPriorMapping(prior, variant="ssm_release"),
    ):
        a, b = dpm.maps()
        assert torch.equal(a, prior), f"A != P at init (fixed_rows={dpm.fixed_rows})"
        assert torch.equal(b, prior.t()), f"B != P^T at init (fixed_rows={dpm.fixed_rows})"
    assert DynamicPriorMapping.from_facs(exprs, aus, variant="ssm_release").fixed_rows == (NEUTRAL,)
    assert torch.sigmoid(dpm.alpha_param).item() == pytest.approx(0.1, abs=1e-7)


@pytest.mark.parametrize("fixed", [(), (NEUTRAL,), (0, 5)], ids=["none", "neutral", "two-rows"])
def test_release_matches_reference_formula(fixed):
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS, source="ssm_release").double()
    dpm = DynamicPriorMapping(prior, variant="ssm_release", fixed_rows=fixed, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        dpm.delta_au2exp.copy_(torch.randn(K7, M12, generator=g, dtype=torch.float64))
        dpm.delta_exp2au.copy_(torch.randn(M12, K7, generator=g, dtype=torch.float64))
        dpm.alpha_param.fill_(0.3)
        dpm.beta_param.fill_(-1.2)
    ref_a, ref_b = _release_reference(prior, dpm.delta_au2exp.detach(), dpm.delta_exp2au.detach(), fixed)
    a, b = dpm.maps()
    torch.testing.assert_close(a, ref_a, rtol=1e-6, atol=1e-12, msg="A vs release formula")
    torch.testing.assert_close(b, ref_b, rtol=1e-6, atol=1e-12, msg="B vs release formula")
    t_exp, t_au = _text(K7, M12, 16, dtype=torch.float64)
    out_e, out_a = dpm(t_exp, t_au)
    ref_e = F.normalize(t_exp + torch.sigmoid(torch.tensor(0.3, dtype=torch.float64)) * ref_a @ t_au, dim=-1)
    ref_u = F.normalize(t_au + torch.sigmoid(torch.tensor(-1.2, dtype=torch.float64)) * ref_b @ t_exp, dim=-1)
    torch.testing.assert_close(out_e, ref_e, msg="t_exp' vs release formula")
    torch.testing.assert_close(out_a, ref_u, msg="t_au' vs release formula")


def test_release_with_zero_prior_entries():
    """Table S4's 0/1 prior through the release map: zeros stay (numerically) zero, all-zero rows exactly."""
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
    a, b = DynamicPriorMapping(prior, variant="ssm_release").maps()
    torch.testing.assert_close(a, prior, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, prior.t(), rtol=1e-6, atol=1e-7)
    assert torch.equal(a[NEUTRAL], torch.zeros(M12)), "an all-zero prior row must map to zero"


# ----------------------------------------------------------------------------- paper


def test_paper_maps_are_row_softmax_of_normalised_prior():
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
    dpm = DynamicPriorMapping(prior)
    row_sum = prior.sum(1, keepdim=True)
    live = row_sum.squeeze(1) > 0
    w0 = torch.zeros_like(prior)
    w0[live] = prior[live] / row_sum[live]
    expected_a = torch.softmax(w0 / 0.01, dim=1)
    expected_a[~live] = 0.0
    w0t = w0.t()
    live_b = w0t.sum(1) > 0
    expected_b = torch.softmax(w0t / 0.01, dim=1)
    expected_b[~live_b] = 0.0
    a, b = dpm.maps()
    torch.testing.assert_close(a, expected_a, rtol=1e-6, atol=0, msg="A vs softmax(W0/tau_m)")
    torch.testing.assert_close(b, expected_b, rtol=1e-6, atol=0, msg="B vs softmax(W0^T/tau_m)")
    torch.testing.assert_close(a[live].sum(1), torch.ones(int(live.sum())))
    assert not live[NEUTRAL] and torch.equal(a[NEUTRAL], torch.zeros(M12))
    # AU17 and AU24 are in no Table S4 expression: their rows of B are zero
    for au in (17, 24):
        assert torch.equal(b[facs.BP4D_AUS.index(au)], torch.zeros(K7))
    # alpha, beta start at 0.1 and are plain learnable scalars
    assert dpm.alpha.item() == pytest.approx(0.1) and dpm.alpha_param.requires_grad


def test_paper_neutral_prototype_gets_no_residual():
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
    dpm = DynamicPriorMapping(prior)
    t_exp, t_au = _text(K7, M12, 16)
    _steps(dpm, t_exp, t_au)
    out_e, _ = dpm(t_exp, t_au)
    assert torch.equal(out_e[NEUTRAL], t_exp[NEUTRAL])
    assert not torch.equal(out_e[0], t_exp[0])


def test_paper_empty_rows_uniform():
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
    a, b = DynamicPriorMapping(prior, empty_rows="uniform").maps()
    torch.testing.assert_close(a[NEUTRAL], torch.full((M12,), 1.0 / M12))
    torch.testing.assert_close(a.sum(1), torch.ones(K7))
    torch.testing.assert_close(b.sum(1), torch.ones(M12))


@pytest.mark.parametrize("variant", ["paper", "ssm_release"])
def test_forward_is_residual_of_maps(variant):
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.DISFA_AUS, source="table_s4")
    dpm = DynamicPriorMapping(prior, variant=variant)
    t_exp, t_au = _text(K7, 8, 10)
    a, b = dpm.maps()
    out_e, out_a = dpm(t_exp, t_au)
    ref_e, ref_a = t_exp + dpm.alpha * (a @ t_au), t_au + dpm.beta * (b @ t_exp)
    if variant == "ssm_release":
        ref_e, ref_a = F.normalize(ref_e, dim=-1), F.normalize(ref_a, dim=-1)
    torch.testing.assert_close(out_e, ref_e)
    torch.testing.assert_close(out_a, ref_a)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("variant", ["paper", "ssm_release"])
def test_dual_false_ties_b_to_a_transpose(variant):
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS, source=variant if variant == "ssm_release" else "table_s4")
    tau = {} if variant == "ssm_release" else {"tau": 0.5}  # the release's map has no temperature
    dpm = DynamicPriorMapping(prior, variant=variant, dual=False, **tau)
    a0, _ = dpm.maps()
    a0 = a0.detach().clone()
    t_exp, t_au = _text(K7, M12, 8)
    _steps(dpm, t_exp, t_au, n=4)
    a, b = dpm.maps()
    assert not torch.allclose(a, a0), "A did not train"
    assert torch.equal(b, a.t()), "dual=False must keep B = A^T"
    assert not any("exp2au" in n for n, _ in dpm.named_parameters())


@pytest.mark.parametrize("variant", ["paper", "ssm_release"])
@pytest.mark.parametrize("init", ["prior", "random"])
def test_learnable_false_keeps_maps_fixed(variant, init):
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.DISFA_AUS)
    dpm = DynamicPriorMapping(prior, variant=variant, learnable=False, init=init)
    assert sorted(n for n, _ in dpm.named_parameters()) == ["alpha_param", "beta_param"]
    a0, b0 = (x.clone() for x in dpm.maps())
    alpha0 = dpm.alpha.item()
    t_exp, t_au = _text(K7, 8, 8)
    _steps(dpm, t_exp, t_au)
    a, b = dpm.maps()
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert dpm.alpha.item() != alpha0, "alpha should still learn"
    frozen = DynamicPriorMapping(prior, learnable=False, learnable_factors=False)
    assert list(frozen.parameters()) == []


@pytest.mark.parametrize("variant", ["paper", "ssm_release"])
def test_random_init_differs_from_prior_and_learns(variant):
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
    rnd = DynamicPriorMapping(prior, variant=variant, init="random")
    pri = DynamicPriorMapping(prior, variant=variant)
    assert not torch.allclose(rnd.maps()[0], pri.maps()[0])
    a, b = rnd.maps()
    assert (a > 0).all() and (b > 0).all()  # no prior zeros
    if variant == "paper":
        torch.testing.assert_close(a.sum(1), torch.ones(K7))


@pytest.mark.parametrize("variant", ["paper", "ssm_release"])
@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_gradcheck_fp64(variant, tau):
    prior = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 1.0, 0.0, 1.0]], dtype=torch.float64)
    kwargs = dict(fixed_rows=(1,)) if variant == "ssm_release" else {}
    if variant != "ssm_release":  # the release's map has no temperature (passing one warns)
        kwargs["tau"] = tau
    dpm = DynamicPriorMapping(prior, variant=variant, dtype=torch.float64, **kwargs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dpm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    names = [n for n, _ in dpm.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in dpm.parameters()]
    t_exp, t_au = _text(3, 4, 5, dtype=torch.float64)

    def fn(te, ta, *ps):
        return functional_call(dpm, dict(zip(names, ps)), (te, ta))

    # fast_mode: random-projection check (full mode costs ~100 softmax calls, slow on a loaded 2-core CPU)
    assert torch.autograd.gradcheck(fn, (t_exp.requires_grad_(), t_au.requires_grad_(), *params), fast_mode=True)


# ----------------------------------------------------------------------------- properties


@st.composite
def _priors(draw):
    k, m = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["binary", "release", "dense"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":
        p = (torch.rand(k, m, generator=g) < 0.4).float()
    elif kind == "release":
        p = torch.where(torch.rand(k, m, generator=g) < 0.4, 1.0, 0.02)
    else:
        p = torch.rand(k, m, generator=g) + 0.01
    if draw(st.booleans()):  # an all-zero row (neutral-like) and an all-zero column (unused AU)
        p[draw(st.integers(0, k - 1))] = 0.0
        p[:, draw(st.integers(0, m - 1))] = 0.0
    return p, seed


@given(prior_seed=_priors(), d=st.integers(1, 9), variant=st.sampled_from(["paper", "ssm_release"]),
       perturb=st.booleans(), fix=st.booleans())
def test_dpm_properties(prior_seed, d, variant, perturb, fix):
    prior, seed = prior_seed
    k, m = prior.shape
    fixed = (seed % k,) if (fix and variant == "ssm_release") else ()
    dpm = DynamicPriorMapping(prior, variant=variant, fixed_rows=fixed)
    g = torch.Generator().manual_seed(seed)
    if perturb:
        with torch.no_grad():
            for n, p in dpm.named_parameters():
                if "2" in n:  # the map parameters
                    p.add_(torch.randn(p.shape, generator=g) * (0.01 if variant == "paper" else 1.0))
    a, b = dpm.maps()
    assert a.shape == (k, m) and b.shape == (m, k)
    assert (a >= 0).all() and (b >= 0).all() and torch.isfinite(a).all() and torch.isfinite(b).all()
    if variant == "paper":
        live_a, live_b = prior.sum(1) > 0, prior.sum(0) > 0
        torch.testing.assert_close(a.sum(1), live_a.float(), msg="paper A rows: 1 (live) / 0 (empty)")
        # B's live rows are AUs used by some live expression (rows of W0^T that are non-zero)
        torch.testing.assert_close(b.sum(1), live_b.float(), msg="paper B rows: 1 (live) / 0 (empty)")
    else:
        torch.testing.assert_close(a.sum(1), prior.sum(1), rtol=1e-5, atol=1e-6, msg="release A row mass")
        torch.testing.assert_close(b.sum(1), prior.sum(0), rtol=1e-5, atol=1e-6, msg="release B row mass")
        for r in fixed:
            assert torch.equal(a[r], prior[r]) and torch.equal(b[:, r], prior[r])
        if not perturb:
            torch.testing.assert_close(a, prior, rtol=1e-6, atol=1e-7)
            if not (prior == 0).any():
                assert torch.equal(a, prior) and torch.equal(b, prior.t())
    # forward: shapes, consistency with maps(), permutation equivariance over expressions
    t_exp, t_au = _text(k, m, d, seed=seed)
    out_e, out_a = dpm(t_exp, t_au)
    assert out_e.shape == (k, d) and out_a.shape == (m, d)
    perm = torch.randperm(k, generator=g)
    inv = {int(r): i for i, r in enumerate(perm)}
    pdpm = DynamicPriorMapping(prior[perm], variant=variant, fixed_rows=tuple(inv[r] for r in fixed))
    with torch.no_grad():
        for (n, p), (_, q) in zip(dpm.named_parameters(), pdpm.named_parameters()):
            if n.endswith("au2exp"):
                q.copy_(p[perm])
            elif n.endswith("exp2au"):
                q.copy_(p[:, perm])
            else:
                q.copy_(p)
    pe, pa = pdpm(t_exp[perm], t_au)
    torch.testing.assert_close(pe, out_e[perm], msg="t_exp' not permutation-equivariant")
    torch.testing.assert_close(pa, out_a, msg="t_au' not permutation-invariant to expression order")


# ----------------------------------------------------------------------------- errors, meta


@pytest.mark.parametrize("cls", ["dpm", "linear", "mlp"])
def test_shape_mismatch_errors(cls):
    mod = {
        "dpm": lambda: DynamicPriorMapping(torch.ones(7, 12)),
        "linear": lambda: LinearSemanticMapping(7, 12),
        "mlp": lambda: MLPSemanticMapping(7, 12),
    }[cls]()
    t_exp, t_au = _text(7, 12, 16)
    with pytest.raises(ValueError, match=r"\(6, 16\).*\(12, 16\)"):
        mod(t_exp[:6], t_au)
    with pytest.raises(ValueError, match=r"\(7, 16\).*\(11, 16\)"):
        mod(t_exp, t_au[:11])
    with pytest.raises(ValueError, match=r"\(7, 16\).*\(12, 15\)"):
        mod(t_exp, t_au[:, :15])
    with pytest.raises(ValueError, match="K=7"):
        mod(t_exp[None], t_au)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="fancy"), "variant"),
        (dict(init="zeros"), "init"),
        (dict(empty_rows="nan"), "empty_rows"),
        (dict(fixed_rows=(1,)), "fixed_rows applies"),
        (dict(variant="ssm_release", fixed_rows=(9,)), "out of range"),
        (dict(variant="ssm_release", alpha=1.5), "0 < alpha < 1"),
        (dict(tau=0.0), "tau"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicPriorMapping(torch.ones(3, 4), **kwargs)


def test_bad_priors():
    with pytest.raises(ValueError, match="non-negative"):
        DynamicPriorMapping(-torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\[K, M\]"):
        DynamicPriorMapping(torch.ones(3))
    with pytest.raises(ValueError, match="neutral"):
        DynamicPriorMapping.from_facs(["happiness", "anger"], facs.BP4D_AUS, variant="ssm_release", fix_neutral=True)
    assert DynamicPriorMapping.from_facs(["happiness", "anger"], facs.BP4D_AUS, variant="ssm_release").fixed_rows == ()


@pytest.mark.parametrize("variant", ["paper", "ssm_release"])
def test_meta_construction_and_to(variant):
    prior = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS, source="ssm_release")
    ref = DynamicPriorMapping(prior, variant=variant, fixed_rows=(NEUTRAL,) if variant == "ssm_release" else ())
    meta = DynamicPriorMapping(prior, variant=variant, fixed_rows=ref.fixed_rows, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    for (n, x), (_, y) in zip(ref.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(x, y), n
    moved = meta.to(torch.float64)
    t_exp, t_au = _text(K7, M12, 8, dtype=torch.float64)
    out = moved(t_exp, t_au)
    assert out[0].dtype == torch.float64 and moved.maps()[0].dtype == torch.float64
    assert "variant=" in repr(moved)
    for mod in (LinearSemanticMapping(3, 4, device="meta"), MLPSemanticMapping(3, 4, device="meta")):
        assert all(p.device.type == "meta" for p in mod.parameters())
        mod.to_empty(device="cpu")
        mod.reset_parameters()
        assert mod.alpha.item() == pytest.approx(0.1)
        assert mod(*_text(3, 4, 5))[0].shape == (3, 5)


# ----------------------------------------------------------------------------- Table VII siblings


def test_linear_mapping_formula_and_training():
    lin = LinearSemanticMapping(5, 6, bias=False)
    t_exp, t_au = _text(5, 6, 7)
    a, b = lin.maps()
    out_e, out_a = lin(t_exp, t_au)
    torch.testing.assert_close(out_e, t_exp + 0.1 * a @ t_au)
    torch.testing.assert_close(out_a, t_au + 0.1 * b @ t_exp)
    before = a.detach().clone()
    _steps(lin, t_exp, t_au)
    assert not torch.equal(lin.maps()[0], before)


def test_mlp_mapping_gradients():
    mlp = MLPSemanticMapping(5, 6, hidden_dim=9)
    t_exp, t_au = _text(5, 6, 7)
    out_e, out_a = mlp(t_exp, t_au)
    (out_e.sum() + out_a.sum()).backward()
    missing = [n for n, p in mlp.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    assert "hidden_dim=9" in repr(mlp)
    with pytest.raises(ValueError, match="hidden_dim"):
        MLPSemanticMapping(5, 6, hidden_dim=0)
