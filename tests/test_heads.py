"""Tests of the cosine (text-aligned) classifier, paper eqs. 12, 13, 25."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from facelayers.heads import CosineClassifier


def _naive_logits(z, text, tau):
    out = torch.empty(*z.shape[:-1], text.shape[0], dtype=z.dtype)
    flat_z = z.reshape(-1, z.shape[-1])
    flat_out = out.reshape(-1, text.shape[0])
    for i, zi in enumerate(flat_z):
        for k, tk in enumerate(text):
            flat_out[i, k] = (zi @ tk) / (zi.norm() * tk.norm()) / tau
    return out


@given(
    b=st.integers(1, 4), t=st.integers(0, 3), k=st.integers(1, 6), d=st.integers(1, 8),
    scale=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1),
)
def test_cosine_logits_property(b, t, k, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (b, d) if t == 0 else (b, t, d)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    text = torch.randn(k, d, generator=g, dtype=torch.float64)
    head = CosineClassifier(d)
    logits = head(z, text)
    assert logits.shape == (*shape[:-1], k)
    torch.testing.assert_close(logits, _naive_logits(z, text, 0.01))
    assert logits.abs().max() <= 1.0 / 0.01 + 1e-9
    # invariant to the scale of both features
    torch.testing.assert_close(head(z * scale, text / scale), logits)


def test_fixed_tau_is_exact_division_and_has_no_parameters():
    z, text = torch.randn(3, 8), torch.randn(5, 8)
    head = CosineClassifier(8, tau=0.07)
    assert list(head.parameters()) == []
    expected = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t() / 0.07
    assert torch.equal(head(z, text), expected)


def test_learnable_tau_trains():
    head = CosineClassifier(8, tau=0.05, learnable_tau=True)
    assert head.tau.item() == pytest.approx(0.05)
    z, text = torch.randn(3, 8), torch.randn(5, 8)
    head(z, text).pow(2).sum().backward()
    assert head.log_tau.grad is not None and head.log_tau.grad.abs() > 0
    assert "learnable_tau=True" in repr(head)


def test_gradcheck_fp64():
    head = CosineClassifier(tau=0.3, learnable_tau=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (z, text))
    log_tau = head.log_tau.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lt: torch.func.functional_call(head, {"log_tau": lt}, (z.detach(), text.detach())), (log_tau,)
    )


def test_bad_inputs():
    head = CosineClassifier(8)
    with pytest.raises(ValueError, match=r"\(3, 7\).*\(5, 8\)"):
        head(torch.randn(3, 7), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"D=8.*\(3, 6\).*\(5, 6\)"):
        head(torch.randn(3, 6), torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        head(torch.randn(3, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        head(torch.randn(8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="tau"):
        CosineClassifier(tau=-1.0)


def test_meta_and_to():
    head = CosineClassifier(4, learnable_tau=True, device="meta")
    assert head.log_tau.device.type == "meta"
    head.to_empty(device="cpu")
    head.reset_parameters()
    assert head.log_tau.item() == pytest.approx(math.log(0.01))
    head = head.to(torch.float64)
    assert head(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64
