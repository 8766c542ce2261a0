"""Tests for facelayers.losses: eqs. 7/8/14, masking, gradients, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _testutils import one_thread  # noqa: F401  (autouse: one intra-op thread)

from facelayers.losses import au_loss, expression_loss, joint_loss


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- expression loss


@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.1, 0.3]))
def test_expression_loss_matches_eq7_with_smoothing(b, k, seed, eps):
    g = _gen(seed)
    logits = torch.randn(b, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (b,), generator=g)
    # eq. 7 with the smoothed target q = (1 - eps) onehot + eps / K, written out in numpy
    lz = logits.numpy()
    logp = lz - lz.max(1, keepdims=True) - np.log(np.exp(lz - lz.max(1, keepdims=True)).sum(1, keepdims=True))
    q = np.full((b, k), eps / k)
    q[np.arange(b), y.numpy()] += 1 - eps
    ref = -(q * logp).sum(1).mean()
    got = expression_loss(logits, y, label_smoothing=eps)
    assert math.isclose(float(got), ref, rel_tol=1e-10), (float(got), ref)


def test_expression_loss_class_weights_and_soft_targets():
    g = _gen(0)
    logits = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    logp = torch.log_softmax(logits, 1)
    nll = -logp[torch.arange(8), y]
    ref = (w[y] * nll).sum() / w[y].sum()
    torch.testing.assert_close(expression_loss(logits, y, weight=w), ref)
    torch.testing.assert_close(expression_loss(logits, y, weight=torch.ones(4, dtype=torch.float64)), nll.mean())
    onehot = torch.nn.functional.one_hot(y, 4).double()
    torch.testing.assert_close(expression_loss(logits, onehot), nll.mean())
    torch.testing.assert_close(expression_loss(logits, y, reduction="none"), nll)


@pytest.mark.parametrize(
    "logits, target, kw, err, match",
    [
        (torch.randn(4), torch.tensor([0, 1, 2, 3]), {}, ValueError, r"\[B, K\]"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), {}, ValueError, r"\[0, 3\).*\[0, 3\]"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2]), {}, ValueError, r"\[B\]=\[4\]"),
        (torch.randn(4, 3), torch.tensor([0.0, 1, 2, 1]), {}, TypeError, "integer"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(4)}, ValueError, r"\[K\]=\[3\]"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ],
    ids=["1d-logits", "index-out-of-range", "batch-mismatch", "float-index", "weight-shape", "smoothing"],
)
def test_expression_loss_validation(logits, target, kw, err, match):
    with pytest.raises(err, match=match):
        expression_loss(logits, target, **kw)


@given(st.integers(1, 6), st.integers(3, 9), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.2]),
       st.booleans(), st.booleans())
def test_expression_loss_classes_is_the_softmax_over_those_classes(b, k, seed, eps, weighted, soft):
    """``classes=``: a softmax over the kept logits only (numpy without class weights; with them,
    PyTorch's weighted CE on the hand-sliced logits); the left-out logits get no gradient."""
    g = _gen(seed)
    keep = sorted(torch.randperm(k, generator=g)[: max(2, k - 2)].tolist())
    logits = torch.randn(b, k, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, len(keep), (b,), generator=g)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    if soft:
        p = torch.rand(b, len(keep), generator=g, dtype=torch.float64).softmax(1)
        target = torch.zeros(b, k, dtype=torch.float64)
        target[:, keep] = p
        sliced_target = p
    else:
        target = torch.tensor(keep)[pos]
        sliced_target = pos
    z = logits.detach()[:, keep]
    if w is None:
        zn = z.numpy()
        logp = zn - zn.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        q = sliced_target.numpy() if soft else np.eye(len(keep))[pos.numpy()]
        q = (1 - eps) * q + eps / len(keep)
        ref = float(-(q * logp).sum(1).mean())
    else:
        ref = float(torch.nn.functional.cross_entropy(z, sliced_target, weight=w[keep], label_smoothing=eps))
    got = expression_loss(logits, target, classes=keep, label_smoothing=eps, weight=w)
    assert math.isclose(float(got.detach()), ref, rel_tol=1e-9, abs_tol=1e-12)
    got.backward()
    dropped = [c for c in range(k) if c not in keep]
    assert torch.all(logits.grad[:, dropped] == 0)
    assert torch.any(logits.grad[:, keep] != 0)
    # all classes kept == no restriction; a Tensor of indices == the list
    full = expression_loss(logits.detach(), target, classes=list(range(k)), label_smoothing=eps, weight=w)
    torch.testing.assert_close(full, expression_loss(logits.detach(), target, label_smoothing=eps, weight=w))
    torch.testing.assert_close(expression_loss(logits.detach(), target, classes=torch.tensor(keep),
                                               label_smoothing=eps, weight=w), got.detach())


def test_expression_loss_classes_gradcheck():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, 2])
    assert torch.autograd.gradcheck(lambda z: expression_loss(z, target, classes=[4, 0, 2]), (logits,))


@pytest.mark.parametrize(
    "target, classes, err, match",
    [
        (torch.tensor([0, 1, 3]), [0, 1], ValueError, r"expected targets among \[0, 1\], got \[3\]"),
        (torch.tensor([0, 1, 1]), [0, 5], ValueError, r"out of range for K=4.*got \[5\]"),
        (torch.tensor([0, 1, 1]), [0, 1, 1], ValueError, "repeated"),
        (torch.tensor([0, 1, 1]), [], ValueError, "empty"),
        (torch.tensor([0, 1, 1]), [0.5, 1], TypeError, "integer"),
        (torch.tensor([0, 1, 1]), torch.tensor([[0, 1]]), ValueError, "1-D integer"),
        (torch.tensor([[0.5, 0.0, 0.0, 0.5]] * 3), [0, 1], ValueError, "mass outside"),
    ],
    ids=["target-outside", "class-out-of-range", "repeated", "empty", "float-class", "2d-classes", "soft-mass-outside"],
)
def test_expression_loss_classes_validation(target, classes, err, match):
    with pytest.raises(err, match=match):
        expression_loss(torch.randn(3, 4), target, classes=classes)


# ---------------------------------------------------------------- AU loss


def _bce_numpy(z: np.ndarray, y: np.ndarray, pw: np.ndarray | None) -> np.ndarray:
    s = 1 / (1 + np.exp(-z))
    pw = np.ones(z.shape[-1]) if pw is None else pw
    return -(pw * y * np.log(s) + (1 - y) * np.log(1 - s))


@given(
    st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1)
)
def test_au_loss_matches_numpy(b, t, m, frames, use_pw, seed):
    g = _gen(seed)
    shape = (b, t, m) if frames else (b, m)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, shape, generator=g).double()
    pw = torch.rand(m, generator=g, dtype=torch.float64) * 3 + 0.1 if use_pw else None
    ref = _bce_numpy(z.numpy(), y.numpy(), None if pw is None else pw.numpy())
    assert math.isclose(float(au_loss(z, y, pos_weight=pw)), ref.mean(), rel_tol=1e-10)
    assert math.isclose(float(au_loss(z, y, pos_weight=pw, reduction="sum")), ref.sum(), rel_tol=1e-10)
    # eq. 8 literally: sum over AUs, mean over samples == M * mean
    eq8 = ref.reshape(-1, m).sum(1).mean()
    assert math.isclose(float(au_loss(z, y, pos_weight=pw)) * m, eq8, rel_tol=1e-10)
    # mask [B, T] (or [B]): only the valid frames count
    mask = torch.rand(shape[:-1], generator=g) < 0.6
    mask.view(-1)[0] = True
    got = au_loss(z, y, pos_weight=pw, mask=mask)
    ref_masked = ref[mask.numpy()].mean()
    assert math.isclose(float(got), ref_masked, rel_tol=1e-10), (float(got), ref_masked)


def test_au_loss_masked_frames_never_count():
    g = _gen(3)
    z = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (2, 5, 4), generator=g).double()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = au_loss(z, y, mask=mask)
    loss.backward()
    assert bool((z.grad[~mask] == 0).all()), "masked frames received gradient"
    # garbage (even inf / nan) in padded frames changes nothing
    z2 = z.detach().clone()
    z2[~mask] = float("nan")
    y2 = y.clone()
    y2[~mask] = 1 - y2[~mask]
    torch.testing.assert_close(au_loss(z2, y2, mask=mask), loss.detach(), atol=0, rtol=0)
    # clip-level mask [B] on [B, T, M] logits; element mask [B, T, M]
    clip_mask = torch.tensor([False, True])
    torch.testing.assert_close(au_loss(z, y, mask=clip_mask), au_loss(z[1], y[1]))
    el = torch.zeros(2, 5, 4, dtype=torch.bool)
    el[0, 0, 2] = True
    torch.testing.assert_close(au_loss(z, y, mask=el), au_loss(z[0, 0, 2:3], y[0, 0, 2:3]))
    # nothing counts -> zero, attached to the graph
    zero = au_loss(z, y, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    none = au_loss(z, y, mask=mask, reduction="none")
    assert none.shape == (2, 5, 4) and bool((none[~mask] == 0).all())


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"target": torch.ones(2, 4)}, ValueError, r"\(2, 3\)"),
        ({"target": torch.full((2, 3), 2.0)}, ValueError, r"\[0, 1\]"),
        ({"pos_weight": torch.ones(4)}, ValueError, r"\[M\]=\[3\]"),
        ({"pos_weight": torch.tensor([1.0, 0.0, 1.0])}, ValueError, "> 0"),
        ({"mask": torch.ones(3, dtype=torch.bool)}, ValueError, "leading part"),
        ({"mask": torch.full((2,), 0.5)}, TypeError, "bool"),
        ({"reduction": "avg"}, ValueError, "reduction"),
    ],
    ids=[
        "target-shape", "target-range", "pos-weight-shape", "pos-weight-zero", "mask-shape", "mask-float", "reduction",
    ],
)
def test_au_loss_validation(kw, err, match):
    args = {"target": torch.ones(2, 3)} | kw
    target = args.pop("target")
    with pytest.raises(err, match=match):
        au_loss(torch.randn(2, 3), target, **args)


# ---------------------------------------------------------------- joint loss


@given(st.floats(0.0, 10.0), st.floats(0.0, 5.0), st.floats(0.0, 5.0))
def test_joint_loss_formula_and_gradient_split(lam, a, b):
    l_exp = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    l_au = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    total = joint_loss(l_exp, l_au, lam=lam)
    assert math.isclose(float(total.detach()), a / (1 + lam) + lam * b / (1 + lam), rel_tol=1e-12, abs_tol=1e-12)
    total.backward()
    assert math.isclose(float(l_exp.grad), 1 / (1 + lam), rel_tol=1e-12), "d total / d l_exp"
    assert math.isclose(float(l_au.grad), lam / (1 + lam), rel_tol=1e-12, abs_tol=1e-15), "d total / d l_au"


def test_joint_loss_default_lambda_is_two():
    l_exp, l_au = torch.tensor(0.9, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    joint_loss(l_exp, l_au).backward()
    assert math.isclose(float(l_exp.grad), 1 / 3, rel_tol=1e-6) and math.isclose(float(l_au.grad), 2 / 3, rel_tol=1e-6)


def test_joint_loss_missing_task_keeps_its_weight():
    l = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    out = joint_loss(None, l, lam=2.0)
    assert math.isclose(float(out.detach()), 1.0)
    out.backward()
    assert math.isclose(float(l.grad), 2 / 3)
    assert math.isclose(float(joint_loss(l, None, lam=2.0).detach()), 0.5)
    assert math.isclose(float(joint_loss(l, None, lam=2.0, renormalize_missing=True).detach()), 1.5)
    assert math.isclose(float(joint_loss(None, l, lam=2.0, renormalize_missing=True).detach()), 1.5)


def test_joint_loss_validation():
    with pytest.raises(ValueError, match="None for both"):
        joint_loss(None, None)
    with pytest.raises(ValueError, match="lam"):
        joint_loss(torch.tensor(1.0), torch.tensor(1.0), lam=-1)
    with pytest.raises(ValueError, match=r"l_au must be a scalar.*\(3,\)"):
        joint_loss(torch.tensor(1.0), torch.ones(3))


def test_losses_end_to_end_gradients_split_through_heads():
    """d total/d params of each head = coefficient x d L_task/d params."""
    g = _gen(5)
    w_exp = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_au = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y_exp = torch.randint(0, 3, (6,), generator=g)
    y_au = torch.randint(0, 2, (6, 5), generator=g).double()
    lam = 2.0
    l_exp, l_au = expression_loss(x @ w_exp, y_exp), au_loss(x @ w_au, y_au)
    g_exp, = torch.autograd.grad(l_exp, w_exp, retain_graph=True)
    g_au, = torch.autograd.grad(l_au, w_au, retain_graph=True)
    joint_loss(l_exp, l_au, lam=lam).backward()
    torch.testing.assert_close(w_exp.grad, g_exp / (1 + lam), msg="dW_exp")
    torch.testing.assert_close(w_au.grad, g_au * lam / (1 + lam), msg="dW_au")
