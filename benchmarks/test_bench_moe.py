"""MoE private experts, forward + backward: sort-once ``torch`` backend vs the release-style masked loop.

Sizes: N = 394 (2 frames x 197 tokens), 6304 (2 clips x 16 frames x 197), 25216 (8 clips); D=768,
H=512, E=4, k=2, fp32, CPU. Rows of each group:

- ``torch_backend``: ``grouped_expert_mlp(..., backend="torch")``.
- ``masked_loop`` (baseline): the released SSM code's dispatch -- a Python loop over (slot, expert)
  with ``unique()`` and boolean masks -- but with CORRECT routing (each token goes to the experts it
  picked; the release indexes a row-major flattening, see docs/moe.md). It runs through the op's
  backend registry (``release_dispatch.RELEASE_BACKEND``), like any other backend.
- ``dense_matmul`` (roofline): the same FLOPs as one plain MLP over N*k rows (no routing at all).

Run ``pytest benchmarks --benchmark`` for timings; without ``--benchmark`` each body runs once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_report import set_role
from release_dispatch import RELEASE_BACKEND, masked_loop

from facelayers.ops.grouped_experts import grouped_expert_mlp

D, H, E, K = 768, 512, 4, 2
SIZES = [394, 6304, 25216]
ROUNDS = {394: 30, 6304: 7, 25216: 5}
SMOKE_N = {6304: 788, 25216: 788}  # smoke mode only (4 frames x 197 tokens): keeps `pytest benchmarks` fast




def make_case(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g).requires_grad_(True)
    logits = torch.randn(n, E, generator=g)
    top_p, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    gates = (top_p / top_p.sum(-1, keepdim=True)).requires_grad_(True)
    bound1, bound2 = (6 / (D + H)) ** 0.5, (6 / (D + H)) ** 0.5
    w1 = (torch.rand(E, D, H, generator=g) * 2 - 1).mul_(bound1).requires_grad_(True)
    b1 = torch.zeros(E, H, requires_grad=True)
    w2 = (torch.rand(E, H, D, generator=g) * 2 - 1).mul_(bound2).requires_grad_(True)
    b2 = torch.zeros(E, D, requires_grad=True)
    gout = torch.randn(n, D, generator=g)
    return x, idx, gates, w1, b1, w2, b2, gout


def _fwd_bwd(fn, case):
    x, idx, gates, w1, b1, w2, b2, gout = case
    for t in (x, gates, w1, b1, w2, b2):
        t.grad = None
    out = fn(x, idx, gates, w1, b1, w2, b2)
    out.backward(gout)
    return out


def _run(benchmark, fn, n):
    case = make_case(n)
    rounds = ROUNDS.get(n, 5)
    return benchmark.pedantic(_fwd_bwd, args=(fn, case), rounds=rounds, iterations=1, warmup_rounds=1)


def _size(n: int, timed: bool) -> int:
    return n if timed else SMOKE_N.get(n, n)


@pytest.mark.parametrize("n", SIZES)
def test_moe_torch_backend(benchmark, bench_timed, n):
    n = _size(n, bench_timed)
    benchmark.group = f"moe fwd+bwd N={n}"
    _run(benchmark, lambda *a: grouped_expert_mlp(*a, activation="gelu", backend="torch"), n)


@pytest.mark.parametrize("n", SIZES)
def test_moe_masked_loop(benchmark, bench_timed, n):
    n = _size(n, bench_timed)
    benchmark.group = f"moe fwd+bwd N={n}"
    set_role(benchmark, "baseline")
    _run(benchmark, lambda *a: grouped_expert_mlp(*a, activation="gelu", backend=RELEASE_BACKEND), n)


@pytest.mark.parametrize("n", SIZES)
def test_moe_dense_matmul(benchmark, bench_timed, n):
    """Roofline: one plain MLP over N*k rows (same FLOPs, no routing)."""
    n = _size(n, bench_timed)
    benchmark.group = f"moe fwd+bwd N={n}"
    set_role(benchmark, "roofline")
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(n * K, D, generator=g).requires_grad_(True)
    w1 = (torch.randn(D, H, generator=g) * 0.03).requires_grad_(True)
    b1 = torch.zeros(H, requires_grad=True)
    w2 = (torch.randn(H, D, generator=g) * 0.03).requires_grad_(True)
    b2 = torch.zeros(D, requires_grad=True)
    gout = torch.randn(n * K, D, generator=g)

    def step():
        for t in (rows, w1, b1, w2, b2):
            t.grad = None
        out = torch.addmm(b2, F.gelu(torch.addmm(b1, rows, w1)), w2)
        out.backward(gout)

    benchmark.pedantic(step, rounds=ROUNDS.get(n, 5), iterations=1, warmup_rounds=1)


def test_masked_loop_baseline_is_a_faithful_reimplementation():
    """The baseline computes the same thing as the op (so the comparison is apples to apples)."""
    case = make_case(97, seed=1)
    x, idx, gates, w1, b1, w2, b2, _ = case
    with torch.no_grad():
        want = grouped_expert_mlp(x, idx, gates, w1, b1, w2, b2, backend="torch")
        got = masked_loop(x, idx, gates, w1, b1, w2, b2)
        via_registry = grouped_expert_mlp(x, idx, gates, w1, b1, w2, b2, backend=RELEASE_BACKEND)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(via_registry, got)
