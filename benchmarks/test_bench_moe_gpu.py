"""MoE private experts on the GPU, bf16 forward + backward: Triton kernel vs the alternatives.

Sizes: N = 6304 (2 clips x 16 frames x 197 tokens) and 25216 (8 clips); D=768, H=512, E=4, k=2, bf16.
Rows of each group ``moe gpu bf16 fwd+bwd N=...``:

- ``triton``: ``grouped_expert_mlp_triton`` (``op.py``): sort once, grouped GEMMs, no host sync.
- ``triton_cuda_graph``: the same step captured with ``torch.cuda.make_graphed_callables`` (possible
  only because nothing syncs with the host): GPU time without Python/launch overhead.
- ``masked_loop`` (baseline): the released SSM code's dispatch -- a Python loop over (slot, expert)
  with ``unique()`` (a host sync) and boolean masks -- with correct routing.
- ``torch_backend``: ``grouped_expert_mlp(..., backend="torch")`` (sort once, per-expert ``addmm``,
  one host sync for the split sizes).
- ``grouped_mm``: ``torch._grouped_mm`` (cuBLAS / CUTLASS grouped GEMM) on inputs that are already
  permuted into expert order; bias added by a gathered row; no un-permute and no k-sum, so it is a
  lower bound of what a ``_grouped_mm`` backend would cost (skipped where unavailable).
- ``dense_ffn``: the shared ViT-B/16 FFN, 768 -> 3072 -> 768 with GELU, over the N tokens (the
  issue's target: the private experts should cost at most half of it).
- ``dense_same_flops`` (roofline): one plain MLP 768 -> 512 -> 768 over N*k rows, i.e. the same
  FLOPs as the experts with no routing at all.

``test_bf16_matmul_peak`` measures the card's bf16 matmul throughput (8192^3 ``torch.mm``); every
row records its model FLOPs in ``extra_info`` so ``benchmarks/gpu_check.sh`` can print TFLOP/s and the
fraction of that measured peak. Every timed function synchronises CUDA before returning.

Run ``pytest benchmarks/test_bench_moe_gpu.py --benchmark``; without CUDA every test is skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_report import set_role
from release_dispatch import RELEASE_BACKEND, masked_loop

D, H, E, K = 768, 512, 4, 2
D_FFN = 3072
SIZES = [6304, 25216]
ROUNDS = 20
DTYPE = torch.bfloat16


def each_size(test):
    """The GPU benchmarks' marks: needs CUDA, one case per token count ``n`` of ``SIZES``."""
    return pytest.mark.requires_cuda(pytest.mark.parametrize("n", SIZES)(test))


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def moe_flops(n: int) -> float:
    """Model FLOPs of the private experts, forward + backward (3x forward; 2 GEMMs of N*k x D x H)."""
    return 3 * 2 * 2 * n * K * D * H


def dense_ffn_flops(n: int) -> float:
    return 3 * 2 * 2 * n * D * D_FFN


def make_case(n: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    top_p, idx = torch.softmax(torch.randn(n, E, generator=g), -1).topk(K, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    bound = (6 / (D + H)) ** 0.5
    w1 = (torch.rand(E, D, H, generator=g) * 2 - 1) * bound
    w2 = (torch.rand(E, H, D, generator=g) * 2 - 1) * bound
    b1, b2 = torch.randn(E, H, generator=g) * 0.01, torch.randn(E, D, generator=g) * 0.01
    gout = torch.randn(n, D, generator=g)
    leaves = [t.to(device=device, dtype=DTYPE).requires_grad_(True) for t in (x, gates, w1, b1, w2, b2)]
    return leaves, idx.to(device), gout.to(device=device, dtype=DTYPE)




def _triton_fn():
    pytest.importorskip("triton", reason="Triton is not installed")
    from facelayers.ops.grouped_experts.op import grouped_expert_mlp_triton

    return lambda x, idx, g, w1, b1, w2, b2: grouped_expert_mlp_triton(x, idx, g, w1, b1, w2, b2, "gelu")


def _backend_fn(backend: str):
    """``grouped_expert_mlp`` with a named backend of the registry (built-in or registered)."""
    from facelayers.ops.grouped_experts import grouped_expert_mlp

    return lambda x, idx, g, w1, b1, w2, b2: grouped_expert_mlp(x, idx, g, w1, b1, w2, b2, "gelu", backend=backend)


def _torch_backend_fn():
    return _backend_fn("torch")


def _step(params, fwd_bwd):
    """A timed step: clear the grads of ``params``, run ``fwd_bwd()``, synchronise CUDA."""

    def step():
        for t in params:
            t.grad = None
        fwd_bwd()
        torch.cuda.synchronize()

    return step


def _bench(benchmark, step, flops: float, *, rounds: int = ROUNDS, warmup_rounds: int = 3) -> None:
    """Record the model FLOPs of one ``step`` and time it (one call per round)."""
    benchmark.extra_info["flops"] = flops
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)


def _time_moe(benchmark, fn, n: int, device: torch.device) -> None:
    """``fn`` on the N = ``n`` case, forward + backward, in the group of that size."""
    benchmark.group = f"moe gpu bf16 fwd+bwd N={n}"
    leaves, idx, gout = make_case(n, device)
    x, gates, w1, b1, w2, b2 = leaves
    _bench(benchmark, _step(leaves, lambda: fn(x, idx, gates, w1, b1, w2, b2).backward(gout)), moe_flops(n))


def _time_dense_mlp(benchmark, device: torch.device, rows: int, hidden: int, seed: int, flops: float) -> None:
    """One plain MLP ``D -> hidden -> D`` (GELU) over ``rows`` rows, forward + backward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D, generator=g).to(device=device, dtype=DTYPE).requires_grad_(True)
    fc1 = torch.nn.Linear(D, hidden, device=device, dtype=DTYPE)
    fc2 = torch.nn.Linear(hidden, D, device=device, dtype=DTYPE)
    gout = torch.randn(rows, D, generator=g).to(device=device, dtype=DTYPE)
    params = [x, *fc1.parameters(), *fc2.parameters()]
    _bench(benchmark, _step(params, lambda: fc2(F.gelu(fc1(x))).backward(gout)), flops)


@each_size
def test_gpu_moe_triton(benchmark, cuda, n):
    _time_moe(benchmark, _triton_fn(), n, cuda)


@each_size
def test_gpu_moe_triton_cuda_graph(benchmark, cuda, n):
    """The Triton step captured in a CUDA graph (possible because it never syncs with the host): the
    GPU-bound time, without Python and launch overhead. The masked loop cannot be captured."""
    benchmark.group = f"moe gpu bf16 fwd+bwd N={n}"
    fn = _triton_fn()
    leaves, idx, gout = make_case(n, cuda)

    def moe(x, gates, w1, b1, w2, b2):
        return fn(x, idx, gates, w1, b1, w2, b2)

    try:
        graphed = torch.cuda.make_graphed_callables(moe, tuple(leaves))
    except Exception as exc:  # noqa: BLE001 - report why, do not fail the benchmark session
        pytest.skip(f"CUDA graph capture failed: {type(exc).__name__}: {exc}")

    _bench(benchmark, _step(leaves, lambda: graphed(*leaves).backward(gout)), moe_flops(n))


@each_size
def test_gpu_moe_masked_loop(benchmark, cuda, n):
    set_role(benchmark, "baseline")
    _time_moe(benchmark, _backend_fn(RELEASE_BACKEND), n, cuda)


@each_size
def test_gpu_moe_torch_backend(benchmark, cuda, n):
    _time_moe(benchmark, _torch_backend_fn(), n, cuda)


@each_size
def test_gpu_moe_grouped_mm(benchmark, cuda, n):
    """``torch._grouped_mm`` on pre-permuted rows (routing, un-permute and k-sum not timed)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not available in this torch")
    benchmark.group = f"moe gpu bf16 fwd+bwd N={n}"
    leaves, idx, _ = make_case(n, cuda)
    _, _, w1, b1, w2, b2 = leaves
    sorted_experts, order = torch.sort(idx.reshape(-1), stable=True)
    offs = torch.cumsum(torch.bincount(sorted_experts, minlength=E), 0).to(torch.int32)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(n * K, D, generator=g).to(device=cuda, dtype=DTYPE).requires_grad_(True)
    gout = torch.randn(n * K, D, generator=g).to(device=cuda, dtype=DTYPE)

    def fwd_bwd():
        h = torch._grouped_mm(xs, w1, offs=offs) + b1[sorted_experts]
        y = torch._grouped_mm(F.gelu(h), w2, offs=offs) + b2[sorted_experts]
        y.backward(gout)

    step = _step([xs, w1, b1, w2, b2], fwd_bwd)
    try:
        step()
    except RuntimeError as exc:  # e.g. a card/dtype combination without grouped GEMM support
        pytest.skip(f"torch._grouped_mm failed here: {exc}")
    _bench(benchmark, step, moe_flops(n))


@each_size
def test_gpu_dense_ffn(benchmark, cuda, n):
    """The shared ViT-B/16 FFN 768 -> 3072 -> 768 (GELU), forward + backward."""
    benchmark.group = f"moe gpu bf16 fwd+bwd N={n}"
    _time_dense_mlp(benchmark, cuda, n, D_FFN, 2, dense_ffn_flops(n))


@each_size
def test_gpu_dense_same_flops(benchmark, cuda, n):
    """Roofline: one plain MLP 768 -> 512 -> 768 over N*k rows (the experts' FLOPs, no routing)."""
    benchmark.group = f"moe gpu bf16 fwd+bwd N={n}"
    set_role(benchmark, "roofline")
    _time_dense_mlp(benchmark, cuda, n * K, H, 3, moe_flops(n))


@pytest.mark.requires_cuda
def test_bf16_matmul_peak(benchmark, cuda):
    """Measured bf16 matmul peak of this card: 8192 x 8192 x 8192 ``torch.mm``, 10 per timed call."""
    benchmark.group = "bf16 matmul peak"
    size, reps = 8192, 10
    a = torch.randn(size, size, device=cuda, dtype=DTYPE)
    b = torch.randn(size, size, device=cuda, dtype=DTYPE)
    out = torch.empty(size, size, device=cuda, dtype=DTYPE)

    def mms():
        for _ in range(reps):
            torch.mm(a, b, out=out)

    _bench(benchmark, _step([], mms), 2.0 * size**3 * reps, rounds=10, warmup_rounds=2)


def test_masked_loop_matches_triton_semantics_cpu():
    """The GPU baseline computes the same function as the library (checked on CPU with the torch backend)."""
    from facelayers.ops.grouped_experts import grouped_expert_mlp

    g = torch.Generator().manual_seed(4)
    n = 23
    x = torch.randn(n, 16, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    gates = torch.rand(n, K, generator=g)
    w1, b1 = torch.randn(E, 16, 8, generator=g), torch.randn(E, 8, generator=g)
    w2, b2 = torch.randn(E, 8, 16, generator=g), torch.randn(E, 16, generator=g)
    want = grouped_expert_mlp(x, idx, gates, w1, b1, w2, b2, "gelu", backend="torch")
    torch.testing.assert_close(masked_loop(x, idx, gates, w1, b1, w2, b2), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_backend_fn(RELEASE_BACKEND)(x, idx, gates, w1, b1, w2, b2), masked_loop(x, idx, gates, w1, b1, w2, b2))
