"""Tests for facelayers.metrics against numpy / scikit-learn references, streaming and DDP (gloo)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from metrics_ddp_worker import ddp_inputs, ddp_worker

from _testutils import one_thread  # noqa: F401  (autouse: one intra-op thread)

from facelayers.metrics import (
    seen_unseen_curve,
    AUMeter,
    ExpressionMeter,
    au_auc,
    au_f1,
    confusion_matrix,
    per_class_recall,
    tuned_au_f1,
    uar,
    war,
)


# ---------------------------------------------------------------- data + references


def _au_data(seed: int, n: int, m: int, levels: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities on a coarse grid k/levels (so many equal the threshold exactly) and labels.

    Column 0 is all-negative and never predicted positive (undefined F1) when m >= 3; column 1 is
    all-negative but predicted positive somewhere (F1 = 0, AUC undefined).
    """
    g = torch.Generator().manual_seed(seed)
    probs = torch.randint(0, levels + 1, (n, m), generator=g).float() / levels
    target = torch.rand(n, m, generator=g) < probs * 0.8 + 0.1  # correlated with probs
    if m >= 3:
        target[:, 0] = False
        probs[:, 0] = probs[:, 0] * 0.4  # < 0.5 everywhere
        target[:, 1] = False
        probs[0, 1] = 0.9
    return probs, target


def _f1_numpy(probs: np.ndarray, target: np.ndarray, th: float, zero_division: float = math.nan) -> np.ndarray:
    pred = probs >= th
    out = []
    for j in range(probs.shape[1]):
        tp = int(np.sum(pred[:, j] & target[:, j]))
        fp = int(np.sum(pred[:, j] & ~target[:, j]))
        fn = int(np.sum(~pred[:, j] & target[:, j]))
        out.append(zero_division if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return np.array(out, dtype=np.float64)


def _auc_pairs_numpy(score: np.ndarray, pos: np.ndarray) -> float:
    sp, sn = score[pos], score[~pos]
    if len(sp) == 0 or len(sn) == 0:
        return math.nan
    diff = sp[:, None] - sn[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _assert_same_nan(got: torch.Tensor, ref: np.ndarray, what: str, tol: float = 1e-12) -> None:
    got = got.numpy()
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{what}: undefined entries differ {got} vs {ref}"
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=tol, atol=tol, err_msg=what)


def _mean_or_nan(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if (~np.isnan(x)).any() else math.nan


def _same_float(a: float, b: float, tol: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ---------------------------------------------------------------- au_f1


@given(st.integers(1, 40), st.integers(1, 6), st.sampled_from([0.25, 0.5, 0.75]), st.integers(0, 2**31 - 1))
def test_au_f1_matches_numpy_and_sklearn(n, m, th, seed):
    probs, target = _au_data(seed, n, m)
    p, t = probs.numpy(), target.numpy()
    res = au_f1(probs, target, threshold=th)
    ref = _f1_numpy(p, t, th)
    _assert_same_nan(res["per_au"], ref, "per_au vs numpy")
    assert _same_float(res["mean"], _mean_or_nan(ref)), (res["mean"], ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = np.array([skm.f1_score(t[:, j], p[:, j] >= th, zero_division=np.nan) for j in range(m)], dtype=float)
        sk0 = np.array([skm.f1_score(t[:, j], p[:, j] >= th, zero_division=0.0) for j in range(m)], dtype=float)
    _assert_same_nan(res["per_au"], sk, "per_au vs sklearn(zero_division=nan)")
    res0 = au_f1(probs, target, threshold=th, zero_division=0.0)
    _assert_same_nan(res0["per_au"], sk0, "per_au vs sklearn(zero_division=0)")
    assert math.isclose(res0["mean"], float(sk0.mean()), abs_tol=1e-12)


def test_au_f1_edge_cases_and_tie_convention():
    # ties exactly at the threshold count as positive
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.2]])
    target = torch.tensor([[1, 0], [1, 0]])
    res = au_f1(probs, target, threshold=0.5)
    assert res["per_au"][0] == 1.0  # both 0.5 predicted positive, both positive
    assert res["per_au"][1] == 0.0  # one false positive, no positives -> defined, 0
    # all-negative AU that is never predicted: undefined, excluded from the mean
    res = au_f1(torch.tensor([[0.9, 0.1], [0.2, 0.3]]), torch.tensor([[1, 0], [0, 0]]))
    assert res["per_au"][0] == 1.0 and math.isnan(float(res["per_au"][1])) and res["mean"] == 1.0
    # every AU undefined -> mean NaN
    assert math.isnan(au_f1(torch.zeros(3, 2), torch.zeros(3, 2))["mean"])
    # values are fractions, target may be bool / int / float
    for tgt in (target.bool(), target.long(), target.float()):
        assert 0.0 <= au_f1(probs, tgt)["mean"] <= 1.0


# ---------------------------------------------------------------- au_auc


@given(st.integers(2, 40), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_au_auc_matches_sklearn_and_pairwise(n, m, seed):
    probs, target = _au_data(seed, n, m)  # coarse grid: many tied scores
    p, t = probs.numpy(), target.numpy()
    res = au_auc(probs, target)
    pairs = np.array([_auc_pairs_numpy(p[:, j], t[:, j]) for j in range(m)])
    sk = np.array([skm.roc_auc_score(t[:, j], p[:, j]) if 0 < t[:, j].sum() < n else math.nan for j in range(m)])
    _assert_same_nan(res["per_au"], pairs, "AUC vs pairwise numpy")
    _assert_same_nan(res["per_au"], sk, "AUC vs sklearn")
    assert _same_float(res["mean"], _mean_or_nan(sk))


def test_au_auc_single_class_is_undefined():
    res = au_auc(torch.tensor([[0.1, 0.2], [0.7, 0.9]]), torch.tensor([[0, 1], [0, 0]]))
    assert math.isnan(float(res["per_au"][0])) and res["per_au"][1] == 0.0 and res["mean"] == 0.0


# ---------------------------------------------------------------- expression metrics


def _cls_data(seed: int, n: int, k: int, absent: int | None):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (n,), generator=g)
    if absent is not None:
        target[target == absent] = (absent + 1) % k
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), target] += torch.rand(n, generator=g) * 2  # better than chance
    return logits, target


@given(st.integers(1, 50), st.integers(2, 8), st.booleans(), st.integers(0, 2**31 - 1))
def test_expression_metrics_match_sklearn(n, k, make_absent, seed):
    absent = seed % k if make_absent else None
    logits, target = _cls_data(seed, n, k, absent)
    pred = logits.argmax(1)
    y, yp = target.numpy(), pred.numpy()
    cm_ref = skm.confusion_matrix(y, yp, labels=list(range(k)))
    assert np.array_equal(confusion_matrix(pred, target, k).numpy(), cm_ref)
    assert np.array_equal(confusion_matrix(logits, target, k).numpy(), cm_ref)
    present = np.unique(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uar_ref = skm.recall_score(y, yp, labels=present, average="macro", zero_division=0)
        bal = skm.balanced_accuracy_score(y, yp)
    # numpy: mean over classes with support of (correct in class / support)
    uar_np = float(np.mean([np.mean(yp[y == c] == c) for c in present]))
    for p in (pred, logits):
        assert math.isclose(uar(p, target, k), uar_ref, abs_tol=1e-12)
        assert math.isclose(uar(p, target, k), uar_np, abs_tol=1e-12)
        assert math.isclose(uar(p, target, k), bal, abs_tol=1e-12)
        assert math.isclose(war(p, target), skm.accuracy_score(y, yp), abs_tol=1e-12)
    rec = per_class_recall(pred, target, k)
    if absent is not None:
        assert math.isnan(float(rec[absent])), "a class absent from the targets must be undefined"
    assert int(torch.isnan(rec).sum()) == k - len(present)


def test_uar_ignores_absent_class_and_war_is_accuracy():
    pred = torch.tensor([0, 0, 1, 1, 2])
    target = torch.tensor([0, 1, 1, 1, 1])  # class 2 absent from the targets, but predicted once
    assert math.isclose(uar(pred, target, 3), (1.0 + 2 / 4) / 2)
    assert math.isclose(war(pred, target), 3 / 5)
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 0, 0], [1, 2, 1], [0, 0, 0]]


# ---------------------------------------------------------------- tuned_au_f1


def _vote_numpy(binary: np.ndarray, k: int, p: float, seg: np.ndarray) -> np.ndarray:
    out = np.zeros_like(binary)
    w = 2 * k + 1
    for s in np.unique(seg):
        rows = np.nonzero(seg == s)[0]
        padded = np.pad(binary[rows].astype(int), ((k, k), (0, 0)), mode="edge")
        counts = np.stack([padded[i : i + w].sum(0) for i in range(len(rows))])
        out[rows] = counts >= p * w
    return out


def _tuned_candidates(p, t, ths, ks, fracs, seg, zd):
    cands = []
    for k in ks:
        for fr in fracs:
            for th in ths:
                voted = _vote_numpy(p >= th, k, fr, seg)
                cands.append(((th, k, fr), _f1_numpy(voted.astype(float), t, 0.5, zd)))
    return cands


@given(st.integers(1, 30), st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_tuned_au_f1_matches_bruteforce(n, m, per_au, segmented, seed):
    probs, target = _au_data(seed, n, m, levels=10)
    p, t = probs.numpy(), target.numpy()
    seg = (np.arange(n) // 7) if segmented else np.zeros(n, dtype=int)
    ths, ks, fracs = [0.3, 0.5, 0.7], [0, 1, 2], [0.3, 0.5, 1.0]
    res = tuned_au_f1(
        probs, target, ths, ks, vote_fractions=fracs, per_au=per_au,
        segment_ids=torch.from_numpy(seg) if segmented else None,
    )
    assert res["optimistic"] is True and "optimistic" in res["note"]
    cands = _tuned_candidates(p, t, ths, ks, fracs, seg, math.nan)
    if not per_au:
        best = max(_mean_or_nan(f) if not np.isnan(_mean_or_nan(f)) else -np.inf for _, f in cands)
        assert _same_float(res["mean"], best if best > -np.inf else math.nan)
        # the reported choice reproduces the reported scores
        voted = _vote_numpy(p >= res["threshold"], res["vote_window"], res["vote_fraction"], seg)
        _assert_same_nan(res["per_au"], _f1_numpy(voted.astype(float), t, 0.5), "global choice")
    else:
        grid = np.stack([f for _, f in cands])  # [C, M]
        # undefined (no positives, nothing predicted) is the best outcome for an AU
        best = np.where(np.isnan(grid).any(0), np.nan, grid.max(0))
        _assert_same_nan(res["per_au"], best, "per-AU best")
        for j in range(m):
            voted = _vote_numpy(p >= float(res["threshold"][j]), int(res["vote_window"][j]),
                                float(res["vote_fraction"][j]), seg)
            ref = _f1_numpy(voted.astype(float), t, 0.5)[j]
            assert _same_float(float(res["per_au"][j]), ref), f"AU {j}: choice does not reproduce its score"


def test_tuned_au_f1_is_at_least_f1_at_half_and_reproduces_release_protocol():
    probs, target = _au_data(11, 60, 4, levels=20)
    plain = au_f1(probs, target)
    tuned = tuned_au_f1(probs, target, vote_windows=(0, 1, 3))
    assert tuned["mean"] >= plain["mean"] - 1e-12
    assert tuned_au_f1(probs, target, per_au=True)["mean"] >= tuned_au_f1(probs, target)["mean"] - 1e-12
    # the release: one global threshold in 0.01..0.99, vote K=3 / p=0.3 over the concatenated test set,
    # undefined F1 counted as 0 (sklearn default); re-implemented here from its description
    p, t = probs.numpy(), target.numpy()
    best = -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(1, 100):
            voted = _vote_numpy(p >= i * 0.01, 3, 0.3, np.zeros(len(p), dtype=int))
            best = max(best, float(np.mean([skm.f1_score(t[:, j], voted[:, j]) for j in range(p.shape[1])])))
    rel = tuned_au_f1(probs, target, [i / 100 for i in range(1, 100)], (3,), vote_fractions=(0.3,), zero_division=0.0)
    assert math.isclose(rel["mean"], best, abs_tol=1e-12), (rel["mean"], best)


def test_tuned_vote_does_not_cross_segments():
    # segment 0 is all positive, segment 1 all negative; unanimous 3-frame vote
    probs = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    target = torch.tensor([[1], [1], [1], [0], [0], [0]])
    kw = dict(thresholds=[0.5], vote_windows=(1,), vote_fractions=(1.0,))
    res_seg = tuned_au_f1(probs, target, segment_ids=torch.tensor([7, 7, 7, 3, 3, 3]), **kw)
    # frame 2 sees [1, 1, 1 (edge of its own segment)] -> stays positive
    assert res_seg["mean"] == 1.0
    # one sequence: frame 2 sees [1, 1, 0] across the boundary -> dropped (TP 2, FN 1)
    assert tuned_au_f1(probs, target, **kw)["mean"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="consecutive run"):
        tuned_au_f1(probs, target, segment_ids=torch.tensor([0, 1, 0, 1, 1, 1]))


# ---------------------------------------------------------------- streaming meters


@st.composite
def _splits(draw, max_n: int = 40):
    n = draw(st.integers(1, max_n))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))
    return n, [0] + cuts + [n]


@given(_splits(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_au_meter_streaming_equals_one_shot(split, m, seed):
    n, bounds = split
    probs, target = _au_data(seed, n, m)
    meter = AUMeter(m)
    for a, b in zip(bounds[:-1], bounds[1:]):
        meter.update(probs[a:b], target[a:b])  # empty slices allowed
    res = meter.compute()
    f1, auc = au_f1(probs, target), au_auc(probs, target)
    torch.testing.assert_close(res["f1_per_au"], f1["per_au"], equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(res["auc_per_au"], auc["per_au"], equal_nan=True, atol=0, rtol=0)
    assert _same_float(res["f1"], f1["mean"], 0) and _same_float(res["auc"], auc["mean"], 0)
    assert res["num_samples"] == n
    # compute() does not change the state; reset() forgets
    assert meter.compute()["num_samples"] == n
    meter.reset()
    with pytest.raises(ValueError, match="before any sample"):
        meter.compute()


def test_au_meter_frames_and_mask():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 4, 5, generator=g)
    target = torch.rand(3, 4, 5, generator=g) < 0.5
    valid = torch.rand(3, 4, generator=g) < 0.7
    meter = AUMeter(5, threshold=0.4)
    meter.update(probs, target, mask=valid)
    res = meter.compute()
    ref = au_f1(probs[valid], target[valid], threshold=0.4)
    torch.testing.assert_close(res["f1_per_au"], ref["per_au"], equal_nan=True)
    torch.testing.assert_close(res["auc_per_au"], au_auc(probs[valid], target[valid])["per_au"], equal_nan=True)
    assert res["num_samples"] == int(valid.sum())
    no_auc = AUMeter(5, store_scores=False)
    no_auc.update(probs, target)
    assert no_auc.compute()["auc"] is None


@given(_splits(), st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_expression_meter_streaming_equals_one_shot(split, k, seed):
    n, bounds = split
    logits, target = _cls_data(seed, n, k, absent=seed % k)
    meter = ExpressionMeter(k)
    for a, b in zip(bounds[:-1], bounds[1:]):
        meter.update(logits[a:b], target[a:b])
    res = meter.compute()
    assert res["uar"] == uar(logits, target, k) and res["war"] == war(logits, target)
    assert torch.equal(res["confusion_matrix"], confusion_matrix(logits, target, k))
    torch.testing.assert_close(res["per_class_recall"], per_class_recall(logits, target, k), equal_nan=True)


# ---------------------------------------------------------------- DDP (gloo, 2 processes)


def test_meters_reduce_across_two_gloo_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    # fork where available: spawn re-imports torch in every child (~20 s on the loaded 2-core CI
    # machine vs < 1 s); the children use CPU tensors only, so forking is safe even after CUDA init.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method=method
    )
    probs, target, logits, y = ddp_inputs()
    f1, auc = au_f1(probs, target), au_auc(probs, target)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            r = json.load(f)
        np.testing.assert_allclose(r["f1_per_au"], f1["per_au"].numpy(), rtol=0, atol=0, err_msg=f"rank {rank} f1")
        np.testing.assert_allclose(r["auc_per_au"], auc["per_au"].numpy(), rtol=0, atol=0, err_msg=f"rank {rank} auc")
        assert r["n_au"] == len(probs) and r["n_ex"] == len(y)
        assert r["uar"] == uar(logits, y, 5) and r["war"] == war(logits, y)
        assert r["cm"] == confusion_matrix(logits, y, 5).tolist()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: au_f1(torch.tensor([[1.5, 0.2]]), torch.tensor([[1, 0]])), ValueError, r"sigmoid.*\[0.2, 1.5\]"),
        (lambda: au_f1(torch.rand(3, 2), torch.ones(3, 3)), ValueError, r"\(3, 2\).*\(3, 3\)"),
        (lambda: au_f1(torch.rand(3, 2), torch.full((3, 2), 2)), ValueError, "only 0 and 1"),
        (lambda: au_f1(torch.rand(3), torch.ones(3)), ValueError, r"\[N, M\]"),
        (lambda: au_f1(torch.rand(3, 2), torch.ones(3, 2), threshold=2), ValueError, "threshold"),
        (lambda: au_f1(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2)), TypeError, "floating"),
        (lambda: au_auc(torch.tensor([[float("nan")]]), torch.ones(1, 1)), ValueError, "finite"),
        (lambda: uar(torch.tensor([0, 3]), torch.tensor([0, 1]), 3), ValueError, r"\[0, 3\).*\[0, 3\]"),
        (lambda: uar(torch.randn(2, 4), torch.tensor([0, 1]), 3), ValueError, r"K=3.*\(2, 4\)"),
        (lambda: uar(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3), TypeError, "integer"),
        (lambda: war(torch.tensor([0, 1, 1]), torch.tensor([0, 1])), ValueError, r"\[N\]=\[3\]"),
        (lambda: confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0), ValueError, "num_classes"),
        (lambda: tuned_au_f1(torch.rand(3, 2), torch.ones(3, 2), vote_windows=(-1,)), ValueError, "K >= 0"),
        (lambda: tuned_au_f1(torch.rand(3, 2), torch.ones(3, 2), vote_fractions=(0.0,)), ValueError, r"\(0, 1\]"),
        (lambda: AUMeter(3).update(torch.rand(2, 4), torch.ones(2, 4)), ValueError, r"M=3.*\(2, 4\)"),
        (lambda: ExpressionMeter(3).update(torch.tensor([5]), torch.tensor([0])), ValueError, r"\[0, 3\)"),
    ],
    ids=[
        "f1-logits", "f1-shape", "f1-target-values", "f1-1d", "f1-threshold", "f1-int-probs", "auc-nan",
        "uar-index-range", "uar-K", "uar-float-indices", "war-length", "cm-K0", "tuned-K", "tuned-p",
        "aumeter-M", "exmeter-range",
    ],
)
def test_bad_inputs_raise(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---------------------------------------------------------------- the release's reported AU F1


def _release_segment_safe_search(segments, thresholds, k_values):
    """Brute-force reading of the release's ``search_segment_safe_vote`` (adaptive_vote.py): one global
    threshold, K and vote count r in 1..2K+1, voting inside each segment, undefined F1 = 0, plain mean."""
    targets = np.concatenate([t for t, _ in segments])
    best = -1.0
    for k in k_values:
        w = 2 * k + 1
        for r in range(1, w + 1):
            for th in thresholds:
                voted = []
                for _, prob in segments:
                    padded = np.pad(prob >= th, ((k, k), (0, 0)), mode="edge").astype(int)
                    counts = np.stack([padded[i : i + w].sum(0) for i in range(len(prob))])
                    voted.append(counts >= r)
                pred = np.concatenate(voted)
                tp = (pred & (targets == 1)).sum(0)
                fp = (pred & (targets == 0)).sum(0)
                fn = (~pred & (targets == 1)).sum(0)
                den = 2 * tp + fp + fn
                f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
                best = max(best, float(f1.mean()))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuned_au_f1_reproduces_release_reported_f1(seed):
    """The documented recipe (docs/metrics.md) gives the release's segment-safe, every-vote-count F1."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=3)
    m = 3
    segments = [
        ((rng.random((n, m)) < 0.4).astype(np.uint8), np.round(rng.random((n, m)), 2)) for n in lengths
    ]
    ths = [i / 10 for i in range(1, 10)]
    ks = range(3)
    expected = _release_segment_safe_search(segments, ths, ks)
    probs = torch.tensor(np.concatenate([p for _, p in segments]))
    target = torch.tensor(np.concatenate([t for t, _ in segments]))
    seg_ids = torch.tensor(np.repeat(np.arange(len(lengths)), lengths))
    fractions = sorted({r / (2 * k + 1) for k in ks for r in range(1, 2 * k + 2)})
    got = tuned_au_f1(probs, target, ths, vote_windows=ks, vote_fractions=fractions, segment_ids=seg_ids,
                      zero_division=0.0)
    assert got["mean"] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- generalised zero-shot: seen-unseen curve


def _brute_uars(z: np.ndarray, t: np.ndarray, unseen: list[int], gamma: float) -> tuple[float, float]:
    """Seen / unseen UAR of argmax(z - gamma * [class is seen]) by plain loops."""
    k = z.shape[1]
    shifted = z - gamma * np.array([0.0 if c in unseen else 1.0 for c in range(k)])
    pred = shifted.argmax(1)
    rec = {}
    for c in range(k):
        m = t == c
        if m.any():
            rec[c] = float((pred[m] == c).mean())
    seen = [r for c, r in rec.items() if c not in unseen]
    uns = [r for c, r in rec.items() if c in unseen]
    return sum(seen) / len(seen), sum(uns) / len(uns)


@given(st.integers(4, 40), st.integers(3, 7), st.integers(0, 2**31 - 1))
def test_seen_unseen_curve_matches_brute_force_calibration(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    n_unseen = 1 + int(torch.randint(0, k - 1, (1,), generator=g))
    unseen = sorted(torch.randperm(k, generator=g)[:n_unseen].tolist())
    seen = [c for c in range(k) if c not in unseen]
    # every group has at least one sample
    t = torch.cat([torch.tensor([seen[0], unseen[0]]), torch.randint(0, k, (n - 2,), generator=g)])
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    z[: n // 3, 0] = z[: n // 3, 0].round()  # some exact ties between samples' gaps
    out = seen_unseen_curve(z, t, unseen)
    zn, tn = z.numpy(), t.numpy()
    gaps = np.sort(np.unique(zn[:, seen].max(1) - zn[:, unseen].max(1)))
    assert len(out["gamma"]) == len(gaps) + 1 and math.isinf(float(out["gamma"][0]))
    np.testing.assert_allclose(out["gamma"][1:].numpy(), gaps)
    # each point: the brute-force UARs just above its gamma (argmax ties are measure zero there)
    probe = np.concatenate([[gaps[0] - 1.0], gaps + 1e-9])
    ref = np.array([_brute_uars(zn, tn, unseen, gm) for gm in probe])
    np.testing.assert_allclose(out["seen_uar"].numpy(), ref[:, 0], atol=1e-12)
    np.testing.assert_allclose(out["unseen_uar"].numpy(), ref[:, 1], atol=1e-12)
    assert math.isclose(out["ausuc"], float(np.trapezoid(ref[:, 0], ref[:, 1])), abs_tol=1e-12)
    s0, u0 = _brute_uars(zn, tn, unseen, 0.0)
    if not np.any(np.isclose(gaps, 0.0)):
        assert math.isclose(out["seen_uar_at_0"], s0, abs_tol=1e-12)
        assert math.isclose(out["unseen_uar_at_0"], u0, abs_tol=1e-12)
    # the curve ends: all seen predictions first, all unseen last; the area is within [0, 1]
    assert float(out["unseen_uar"][0]) == 0.0 and float(out["seen_uar"][-1]) == 0.0
    assert 0.0 <= out["ausuc"] <= 1.0


def test_seen_unseen_curve_perfect_and_errors():
    # a perfect classifier with a margin: every sample right at gamma = 0, area 1
    t = torch.tensor([0, 1, 2, 3, 2])
    z = torch.nn.functional.one_hot(t, 4).double() * 5
    out = seen_unseen_curve(z, t, [2, 3])
    assert out["ausuc"] == 1.0 and out["seen_uar_at_0"] == 1.0 and out["unseen_uar_at_0"] == 1.0
    with pytest.raises(ValueError, match="at least one and not all"):
        seen_unseen_curve(z, t, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least one and not all"):
        seen_unseen_curve(z, t, [4])
    with pytest.raises(ValueError, match="seen and of unseen"):
        seen_unseen_curve(z[:2], t[:2], [2])
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        seen_unseen_curve(z[0], t, [2])
