"""Tests of facelayers.training: ParameterEMA, clip mixup, MovingMeanLossBalance, sigmoid_ramp."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from facelayers.training import (
    ClipMixup,
    MovingMeanLossBalance,
    ParameterEMA,
    mix_clips,
    mixup_loss,
    sigmoid_ramp,
)


def _release_fixture_jsons() -> list[Path]:
    """Release fixtures with a training record (`FACELAYERS_RELEASE_FIXTURES` or tests/data/ssm_release)."""
    folder = Path(os.environ.get("FACELAYERS_RELEASE_FIXTURES", Path(__file__).parent / "data" / "ssm_release"))
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if (folder / f"{p.stem}_train.safetensors").is_file())


# ----------------------------------------------------------------------------- EMA


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x)) * self.frozen


def _set_params(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))


def test_ema_matches_independent_formula():
    torch.manual_seed(0)
    model = _Tiny()
    gen = torch.Generator().manual_seed(1)
    decay = 0.9
    ema = ParameterEMA(model, decay=decay)
    assert set(ema.shadow) == {"lin.weight", "lin.bias", "bn.weight", "bn.bias"}  # frozen not tracked
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        _set_params(model, gen)
        ema.update()
        for n, p in model.named_parameters():
            if p.requires_grad:
                expected[n] = decay * expected[n] + (1 - decay) * p.detach().double()
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s.double(), expected[n], rtol=0, atol=1e-6, msg=f"shadow {n}")
    assert ema.num_updates == 3


def test_ema_release_expression_bitwise():
    """Same float32 operations as the release: shadow = d * shadow + (1 - d) * param."""
    model = nn.Linear(4, 3)
    ema = ParameterEMA(model, decay=0.99)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        _set_params(model, gen)
        ema.update()
        for n, p in model.named_parameters():
            ref[n] = (0.99 * ref[n] + (1 - 0.99) * p.detach()).clone()
    for n in ref:
        assert torch.equal(ema.shadow[n], ref[n]), n


def test_ema_skips_params_frozen_later_and_extremes():
    model = nn.Linear(2, 2)
    ema = ParameterEMA(model, decay=0.5)
    start_bias = model.bias.detach().clone()
    model.bias.requires_grad_(False)
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(1.0)
    ema.update()
    assert torch.equal(ema.shadow["bias"], start_bias), "a parameter that stopped training must keep its shadow"
    keep = ParameterEMA(model, decay=1.0)
    copy = ParameterEMA(model, decay=0.0)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(3.0)
    keep.update()
    copy.update()
    assert torch.equal(keep.shadow["weight"], w0)
    assert torch.equal(copy.shadow["weight"], model.weight.detach())


def test_ema_swap_context_and_errors():
    model = nn.Linear(2, 2)
    ema = ParameterEMA(model, decay=0.0)
    live = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    ema.update()  # shadow = zeros
    with torch.no_grad():
        model.weight.copy_(live)
    with ema.average_parameters() as m:
        assert m is model and torch.equal(model.weight, torch.zeros_like(live))
    assert torch.equal(model.weight, live), "restore after the context"
    with pytest.raises(ZeroDivisionError):
        with ema.average_parameters():
            raise ZeroDivisionError
    assert torch.equal(model.weight, live), "restore after an exception"
    ema.store()
    with pytest.raises(RuntimeError, match="store"):
        ema.store()
    ema.restore()
    with pytest.raises(RuntimeError, match="store"):
        ema.restore()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            ParameterEMA(model, decay=bad)


def test_ema_state_dict_roundtrip_and_checks(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = _Tiny()
    ema = ParameterEMA(model, decay=0.8, include_buffers=True)
    gen = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(2):
        _set_params(model, gen)
        model(torch.randn(5, 3, generator=gen))  # moves the BatchNorm statistics
        ema.update()
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, tmp_path / "ema.safetensors")
    other = ParameterEMA(model, decay=0.8, include_buffers=True)
    other.load_state_dict(load_file(tmp_path / "ema.safetensors"))
    assert other.num_updates == 2
    for k in ema.shadow:
        assert torch.equal(other.shadow[k], ema.shadow[k]), k
    for k in ema.buffer_shadow:
        assert torch.equal(other.buffer_shadow[k], ema.buffer_shadow[k]), k
    # integer buffers are copied, float buffers averaged
    assert int(ema.buffer_shadow["bn.num_batches_tracked"]) == int(model.bn.num_batches_tracked) == 2
    assert not torch.equal(ema.buffer_shadow["bn.running_mean"], model.bn.running_mean)
    bad = dict(state)
    bad.pop("param:lin.bias")
    with pytest.raises(KeyError, match="lin.bias"):
        other.load_state_dict(bad)
    bad = dict(state)
    bad["param:lin.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"lin.bias.*\(5,\).*\(2,\)"):
        other.load_state_dict(bad)


@settings(max_examples=20, deadline=None)
@given(decay=st.floats(0.0, 1.0), steps=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_ema_shadow_stays_in_hull_property(decay, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 1)
    ema = ParameterEMA(model, decay=decay)
    history = [model.weight.detach().clone()]
    for _ in range(steps):
        _set_params(model, gen)
        history.append(model.weight.detach().clone())
        ema.update()
    h = torch.stack(history)
    s = ema.shadow["weight"]
    assert bool((s >= h.min(0).values - 1e-6).all() and (s <= h.max(0).values + 1e-6).all())


# ----------------------------------------------------------------------------- mixup


def test_mix_clips_exact_values():
    x = torch.arange(3 * 2, dtype=torch.float32).reshape(3, 2)  # clip b, frame t: 2b + t
    perm = torch.tensor([2, 0, 1])
    out = mix_clips(x, 0.25, perm)
    expected = torch.tensor([[0.25 * (2 * b + t) + 0.75 * (2 * int(perm[b]) + t) for t in range(2)] for b in range(3)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 4), lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_mix_clips_whole_clip_property(b, t, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, 3, generator=gen, dtype=torch.float64)
    perm = torch.randperm(b, generator=gen)
    out = mix_clips(x, lam, perm)
    for i in range(b):
        for j in range(t):  # every frame of clip i mixes with the same frame of ONE partner, same lam
            torch.testing.assert_close(out[i, j], lam * x[i, j] + (1 - lam) * x[perm[i], j])


def test_clip_mixup_seeding_and_perm():
    x = torch.randn(6, 4, 2)
    a = ClipMixup(0.4, generator=torch.Generator().manual_seed(5))
    b = ClipMixup(0.4, generator=torch.Generator().manual_seed(5))
    c = ClipMixup(0.4, generator=torch.Generator().manual_seed(6))
    ra, rb, rc = a(x), b(x), c(x)
    assert ra[2] == rb[2] and torch.equal(ra[1], rb[1]) and torch.equal(ra[0], rb[0])
    assert ra[2] != rc[2]
    mixed, perm, lam = ra
    assert torch.equal(perm.sort().values, torch.arange(6)), "perm must be a permutation"
    assert 0.0 <= lam <= 1.0
    assert torch.equal(mixed, mix_clips(x, lam, perm))


def test_clip_mixup_alpha_zero_is_off_and_draws_nothing():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    mix = ClipMixup(0.0, generator=gen)
    x = torch.randn(3, 2)
    mixed, perm, lam = mix(x)
    assert mixed is x and lam == 1.0 and torch.equal(perm, torch.arange(3)) and not mix.enabled
    assert torch.equal(gen.get_state(), state), "alpha=0 must not consume random numbers"


def _beta_cdf(x: float, a: float) -> float:
    """CDF of Beta(a, a) at x, by quadrature after the substitution x = t**(1/a) (no singularity)."""
    t = np.linspace(0.0, x**a, 20001)
    f = (1.0 - t ** (1.0 / a)) ** (a - 1.0) / a
    integral = float(np.sum((f[1:] + f[:-1]) * np.diff(t)) / 2)
    return integral * math.gamma(2 * a) / math.gamma(a) ** 2


def test_clip_mixup_lam_distribution_is_beta():
    alpha = 0.4
    mix = ClipMixup(alpha, generator=torch.Generator().manual_seed(123))
    lams = np.array([mix.sample_lam() for _ in range(1500)])
    assert abs(lams.mean() - 0.5) < 0.03
    assert abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.012
    for x in (0.05, 0.2, 0.4):  # empirical CDF vs Beta(alpha, alpha)
        assert abs((lams < x).mean() - _beta_cdf(x, alpha)) < 0.04, x


def test_mixup_loss_two_terms_and_errors():
    crit = nn.BCEWithLogitsLoss()
    out = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    ya = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    yb = torch.tensor([[0.0, 0.0], [1.0, 1.0]])

    def bce(z, y):  # independent BCE-with-logits
        p = 1 / (1 + np.exp(-z))
        return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))

    got = float(mixup_loss(crit, out, ya, yb, 0.3))
    want = 0.3 * bce(out.numpy().astype(np.float64), ya.numpy()) + 0.7 * bce(out.numpy().astype(np.float64), yb.numpy())
    assert math.isclose(got, want, rel_tol=1e-6)
    assert torch.equal(mixup_loss(crit, out, ya, yb, 1.0), crit(out, ya))
    with pytest.raises(ValueError, match=r"expected \(2, 2\), got \(4,\)"):
        mixup_loss(crit, out, ya, yb.reshape(-1), 0.5)
    with pytest.raises(ValueError, match=r"lam out of range \(expected 0 <= lam <= 1, got 1.5\)"):
        mix_clips(out, 1.5, torch.arange(2))
    with pytest.raises(ValueError, match=r"perm must be an integer tensor of shape \[B\]=\[2\]"):
        mix_clips(out, 0.5, torch.arange(3))
    with pytest.raises(ValueError, match="alpha"):
        ClipMixup(-0.1)
    with pytest.raises(ValueError, match="non-empty batch"):
        ClipMixup(0.4)(torch.zeros(0, 2))


# ----------------------------------------------------------------------------- moving-mean balance


def test_moving_mean_exact_sequence_update_then_divide():
    bal = MovingMeanLossBalance(2, momentum=0.9, eps=1e-8)
    seq = [(2.0, 4.0), (1.0, 8.0), (3.0, 3.0)]
    means = None
    for values in seq:
        out = bal(*(torch.tensor(v) for v in values))
        # independent reference in float64: first value starts the mean, then m = .9 m + .1 L; divide by new m
        means = list(values) if means is None else [0.9 * m + 0.1 * v for m, v in zip(means, values)]
        for o, v, m in zip(out, values, means):
            assert math.isclose(float(o), v / (m + 1e-8), rel_tol=1e-6)
        torch.testing.assert_close(bal.means.double(), torch.tensor(means, dtype=torch.float64), rtol=1e-6, atol=0)


def test_moving_mean_gradient_uses_detached_mean():
    bal = MovingMeanLossBalance(1)
    w = torch.tensor(3.0, requires_grad=True)
    bal(w.detach() * 0 + 2.0)  # mean = 2
    (out,) = bal(w * w)  # L = 9, mean = .95 * 2 + .05 * 9 = 2.35
    out.backward()
    assert math.isclose(float(w.grad), 2 * 3.0 / (2.35 + 1e-8), rel_tol=1e-6)


def test_moving_mean_reset_and_state():
    bal = MovingMeanLossBalance(2)
    bal(torch.tensor(1.0), torch.tensor(1.0))
    bal(torch.tensor(5.0), torch.tensor(9.0))
    sd = bal.state_dict()
    assert set(sd) == {"means", "started"} and bool(sd["started"])
    other = MovingMeanLossBalance(2)
    other.load_state_dict(sd)
    a = bal(torch.tensor(2.0), torch.tensor(2.0))
    b = other(torch.tensor(2.0), torch.tensor(2.0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    bal.reset()
    assert not bool(bal.started)
    out = bal(torch.tensor(7.0), torch.tensor(0.5))  # restarts from the values: outputs ~1
    assert all(math.isclose(float(o), 1.0, rel_tol=1e-6) for o in out)
    assert torch.equal(bal.means, torch.tensor([7.0, 0.5]))
    assert "n_terms=2" in repr(bal)


def test_moving_mean_errors():
    bal = MovingMeanLossBalance(2)
    with pytest.raises(ValueError, match="expected 2 loss terms, got 1"):
        bal(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"loss term 1 must be a scalar tensor \(expected shape \(\), got \(3,\)\)"):
        bal(torch.tensor(1.0), torch.ones(3))
    for kwargs, match in ((dict(n_terms=0), "n_terms"), (dict(n_terms=2, momentum=1.0), "momentum"),
                          (dict(n_terms=2, eps=-1.0), "eps")):
        with pytest.raises(ValueError, match=match):
            MovingMeanLossBalance(**kwargs)


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.lists(st.floats(0.01, 100.0), min_size=3, max_size=3), min_size=1, max_size=6))
def test_moving_mean_bounds_property(values):
    bal = MovingMeanLossBalance(3)
    first = bal(*(torch.tensor(v) for v in values[0]))
    assert all(math.isclose(float(o), 1.0, rel_tol=1e-5) for o in first)
    for row in values[1:]:
        bal(*(torch.tensor(v) for v in row))
    seen = torch.tensor(values)
    assert bool((bal.means >= seen.min(0).values * (1 - 1e-5)).all())
    assert bool((bal.means <= seen.max(0).values * (1 + 1e-5)).all())


# ----------------------------------------------------------------------------- ramp


def test_sigmoid_ramp_values_and_errors():
    assert sigmoid_ramp(0, 30) == 0.0
    for e in (1, 3, 15, 29, 45):
        assert math.isclose(sigmoid_ramp(e, 30), 2 / (1 + np.exp(-10 * e / 30)) - 1, rel_tol=1e-12)
    assert math.isclose(sigmoid_ramp(3, 30), (1 - math.e ** -1) / (1 + math.e ** -1), rel_tol=1e-12)  # tanh(1/2)
    for args, match in (((-1, 30), "epoch"), ((1, 0), "total"), ((float("nan"), 30), "epoch")):
        with pytest.raises(ValueError, match=match):
            sigmoid_ramp(*args)


@settings(max_examples=30, deadline=None)
@given(a=st.floats(0, 200), b=st.floats(0, 200), total=st.floats(1, 100))
def test_sigmoid_ramp_monotone_property(a, b, total):
    lo, hi = sorted((a, b))
    assert 0.0 <= sigmoid_ramp(lo, total) <= sigmoid_ramp(hi, total) <= 1.0


# ----------------------------------------------------------------------------- release fixture


@pytest.mark.parametrize("meta_path", _release_fixture_jsons(), ids=lambda p: p.stem)
def test_release_fixture_ramp_first_total_and_moving_mean(meta_path):
    """Against the released code's two training steps: the ramp, the step-1 total and term 1's mean."""
    from safetensors.torch import load_file

    meta = json.loads(meta_path.read_text())["train_steps"]
    train = load_file(meta_path.with_name(f"{meta_path.stem}_train.safetensors"))
    a = sigmoid_ramp(meta["epoch"], 30)
    assert math.isclose(a, meta["ramp_a"], rel_tol=1e-6)
    # Step 1: every normalised term is L / (L + eps), so the total is (1 + 2 + 2a) / 3 whatever L is.
    bal = MovingMeanLossBalance(4)
    l1, l2, l3, l4 = bal(*(torch.tensor(v) for v in (2.3, 0.7, 1.9, 0.8)))
    total = (l1 + 2.0 * l2 + a * (l3 + l4)) / 3.0
    assert math.isclose(float(total), meta["total_loss_per_step"][0], rel_tol=1e-5)
    # Term 1 (expression CE) is recorded for both steps: its moving mean after step 2.
    ce = meta["loss_exp_ce_per_step"]
    bal.reset()
    for v in ce:
        bal(*(torch.tensor(x, dtype=torch.float32) for x in (v, 1.0, 1.0, 1.0)))
    torch.testing.assert_close(bal.means[0], train["moving_losses"][0], rtol=1e-6, atol=0)
