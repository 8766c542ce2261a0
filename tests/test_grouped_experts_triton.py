"""Parity tests of the Triton grouped-expert kernels (``facelayers/ops/grouped_experts/op.py``).

CPU (default ``pytest``): the kernels run in Triton's interpreter. ``op.py`` selects the interpreter
per call from the tensor device (``InterpretedFunction`` built from the kernel's Python source), so
these tests do not depend on ``TRITON_INTERPRET=1`` having been set before some other module imported
``triton``; we deliberately do NOT set it here, because in a GPU session it would turn the compiled
kernels of the CUDA tests below (same process) into interpreted ones.

Every kernel output buffer is NaN-poisoned (``op._new_output`` patched), so an element a kernel forgets
to write (e.g. the weight gradient of an expert that received no token) fails the test.

GPU tests (``requires_cuda``) compare bf16/fp16/fp32 at ViT-B/16 sizes against the ``torch`` backend,
with the tolerance rule of ``shared/STYLE.md`` #11, and check bitwise determinism.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="Triton is not installed: the 'triton' grouped-expert backend cannot run")

from facelayers.ops.grouped_experts import op  # noqa: E402

pytestmark = pytest.mark.requires_triton

GRAD_NAMES = ("dx", "dweights", "dw1", "db1", "dw2", "db2")

# Absolute floor of the tolerance, relative to the largest reference magnitude, per dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _local_reference(x, expert_idx, weights, w1, b1, w2, b2, activation):
    """Per-(token, slot) loop, written independently of ``reference.py``."""
    act = _activation_fn(activation)
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for j in range(expert_idx.shape[1]):
            e = int(expert_idx[n, j])
            acc = acc + weights[n, j] * (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e])
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros((0, x.shape[1]))


def _activation_fn(activation: str | Callable) -> Callable:
    if callable(activation):
        return activation
    return {
        "gelu": torch.nn.functional.gelu,
        "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
        "relu": torch.relu,
    }[activation]


def _reference() -> tuple[str, Callable]:
    """The library's ``reference.py`` loop when present, else the local one (kept as a fallback)."""
    try:
        from facelayers.ops.grouped_experts.reference import grouped_expert_mlp_reference
    except ImportError:  # pragma: no cover - reference.py is written by the MoE issue
        return "local reference", _local_reference
    return "reference.py", grouped_expert_mlp_reference


def _routing(kind: str, n: int, e: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, k]`` int64 expert ids: "random" (distinct per token), "empty" (expert 1 never chosen),
    "one" (every slot of every token on the last expert)."""
    if kind == "one":
        return torch.full((n, k), e - 1, dtype=torch.int64)
    choices = list(range(e)) if kind == "random" else [c for c in range(e) if c != 1]
    assert len(choices) >= k
    scores = torch.rand(n, len(choices), generator=gen)
    picks = scores.argsort(dim=1)[:, :k]
    return torch.tensor(choices, dtype=torch.int64)[picks]


def _make_inputs(n, d, h, e, k, routing, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    expert_idx = _routing(routing, n, e, k, gen)
    tensors = {
        "x": torch.randn(n, d, generator=gen),
        "weights": torch.rand(n, k, generator=gen),
        "w1": torch.randn(e, d, h, generator=gen) / math.sqrt(d),
        "b1": torch.randn(e, h, generator=gen) * 0.1,
        "w2": torch.randn(e, h, d, generator=gen) / math.sqrt(h),
        "b2": torch.randn(e, d, generator=gen) * 0.1,
    }
    tensors = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    return expert_idx.to(device), tensors


def _run(fn, expert_idx, tensors, activation, grad_out):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    out = fn(leaves["x"], expert_idx, leaves["weights"], leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"],
             activation)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), dict(zip(GRAD_NAMES, grads))


def _assert_bitwise_same(fn_a, fn_b, expert_idx, tensors, grad_out, out_msg: str, grad_msg: str) -> torch.Tensor:
    """``fn_a`` and ``fn_b`` give bitwise-equal outputs and gradients (``grad_msg`` formats ``{name}``).
    Returns ``fn_a``'s output."""
    out_a, grads_a = _run(fn_a, expert_idx, tensors, "gelu", grad_out)
    out_b, grads_b = _run(fn_b, expert_idx, tensors, "gelu", grad_out)
    assert torch.equal(out_a, out_b), out_msg
    for name in GRAD_NAMES:
        assert torch.equal(grads_a[name], grads_b[name]), grad_msg.format(name=name)
    return out_a


def _check_close(name: str, got: torch.Tensor, same_dtype_ref: torch.Tensor, ref64: torch.Tensor,
                 dtype: torch.dtype, label: str) -> None:
    """Kernel error vs fp64 at most 2x PyTorch's own same-dtype error plus a small floor."""
    assert got is not None, f"{label}: {name} is None (no gradient)"
    assert got.shape == ref64.shape, f"{label}: {name} shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{label}: {name} has non-finite values (unwritten NaN-poisoned elements?)"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err_kernel = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    err_torch = (same_dtype_ref.double() - ref64).abs().max().item() if got.numel() else 0.0
    tol = 2.0 * err_torch + FLOOR[dtype] * max(scale, 1.0)
    assert err_kernel <= tol, (
        f"{label}: {name} max|triton - fp64 reference| = {err_kernel:.3e} > tol {tol:.3e} "
        f"(PyTorch {dtype} error {err_torch:.3e}, scale {scale:.3e})"
    )


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer a kernel must fill starts as NaN."""

    def _nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(op, "_new_output", _nan_output)


# --------------------------------------------------------------------------------------------------
# CPU (interpreter) parity on a fixed small grid
# --------------------------------------------------------------------------------------------------

F32, F16 = torch.float32, torch.float16

# (N, D, H, E, k, routing, activation, dtype). Interpreter blocks are 16 x 32 x 32 (op._INTERP_*):
# D=40/H=72 give partial tiles, several K iterations and several N tiles; D=33/H=20 give H < block.
CPU_CASES = [
    pytest.param(1, 40, 72, 1, 1, "random", "gelu", F32, id="N1-E1-k1-d40-h72-fp32"),
    pytest.param(1, 33, 20, 3, 2, "random", "relu", F16, id="N1-E3-k2-d33-h20-fp16"),
    pytest.param(5, 40, 72, 3, 2, "empty", "quick_gelu", F16, id="N5-E3-k2-empty-fp16"),
    pytest.param(5, 33, 20, 4, 2, "empty", "gelu", F32, id="N5-E4-k2-empty-d33-h20-fp32"),
    pytest.param(37, 40, 72, 4, 1, "one", "relu", F32, id="N37-E4-k1-one-expert-fp32"),
    pytest.param(37, 33, 20, 4, 2, "one", "gelu", F16, id="N37-E4-k2-one-expert-fp16"),
    pytest.param(37, 40, 72, 1, 2, "one", "quick_gelu", F32, id="N37-E1-k2-fp32"),
    pytest.param(130, 40, 72, 4, 2, "empty", "gelu", F32, id="N130-E4-k2-empty-fp32"),
    pytest.param(130, 33, 20, 3, 1, "random", torch.tanh, F16, id="N130-E3-k1-callable-fp16"),
]


@pytest.mark.parametrize("n,d,h,e,k,routing,activation,dtype", CPU_CASES)
def test_triton_matches_reference_cpu(poison_outputs, n, d, h, e, k, routing, activation, dtype):
    label = f"N={n} D={d} H={h} E={e} k={k} {routing} {dtype}"
    expert_idx, tensors = _make_inputs(n, d, h, e, k, routing, dtype, seed=n * 100 + e * 10 + k)
    grad_out = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    out, grads = _run(op.grouped_expert_mlp_triton, expert_idx, tensors, activation, grad_out)
    ref_name, ref_fn = _reference()
    ref_out, ref_grads = _run(ref_fn, expert_idx, tensors, activation, grad_out)
    t64 = {name: t.double() for name, t in tensors.items()}
    out64, grads64 = _run(ref_fn, expert_idx, t64, activation, grad_out.double())
    where = f"{label} vs {ref_name}"
    _check_close("out", out, ref_out, out64, dtype, where)
    for name in GRAD_NAMES:
        _check_close(name, grads[name], ref_grads[name], grads64[name], dtype, where)
    if routing == "empty":  # expert 1 received no token: its gradients are exact zeros
        for name in ("dw1", "db1", "dw2", "db2"):
            assert torch.equal(grads[name][1], torch.zeros_like(grads[name][1])), f"{label}: {name}[empty expert] != 0"


@settings(max_examples=6, deadline=None)  # each example runs the interpreter: keep it small
@given(
    n=st.integers(1, 24),
    d=st.integers(1, 40),
    h=st.integers(1, 40),
    e=st.integers(1, 5),
    k=st.integers(1, 3),
    routing=st.sampled_from(["random", "empty", "one"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference_property_cpu(n, d, h, e, k, routing, seed):
    k = min(k, e - 1 if (routing == "empty" and e > 2) else e)
    if routing == "empty" and e < 3:
        routing = "one"
    label = f"N={n} D={d} H={h} E={e} k={k} {routing} seed={seed}"
    expert_idx, tensors = _make_inputs(n, d, h, e, k, routing, F32, seed=seed)
    grad_out = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    out, grads = _run(op.grouped_expert_mlp_triton, expert_idx, tensors, "gelu", grad_out)
    ref_name, ref_fn = _reference()
    ref_out, ref_grads = _run(ref_fn, expert_idx, tensors, "gelu", grad_out)
    out64, grads64 = _run(ref_fn, expert_idx, {m: t.double() for m, t in tensors.items()}, "gelu", grad_out.double())
    _check_close("out", out, ref_out, out64, F32, label)
    for name in GRAD_NAMES:
        _check_close(name, grads[name], ref_grads[name], grads64[name], F32, label)


def test_local_reference_agrees_with_library_reference():
    name, ref_fn = _reference()
    if ref_fn is _local_reference:
        pytest.skip("facelayers/ops/grouped_experts/reference.py not present")
    expert_idx, tensors = _make_inputs(5, 6, 7, 3, 2, "empty", torch.float64, seed=2)
    grad_out = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out_l, grads_l = _run(_local_reference, expert_idx, tensors, "quick_gelu", grad_out)
    out_r, grads_r = _run(ref_fn, expert_idx, tensors, "quick_gelu", grad_out)
    torch.testing.assert_close(out_l, out_r, msg="local reference out != reference.py out")
    for g in GRAD_NAMES:
        torch.testing.assert_close(grads_l[g], grads_r[g], msg=f"local reference {g} != reference.py {g}")


def test_triton_deterministic_cpu(poison_outputs):
    expert_idx, tensors = _make_inputs(37, 40, 72, 4, 2, "random", F32, seed=3)
    grad_out = torch.randn(37, 40, generator=torch.Generator().manual_seed(4))
    _assert_bitwise_same(op.grouped_expert_mlp_triton, op.grouped_expert_mlp_triton, expert_idx, tensors, grad_out,
                         "out differs between two identical runs", "{name} differs between two identical runs")


def test_dispatch_backend_triton_cpu(poison_outputs):
    from facelayers.ops.grouped_experts import grouped_expert_mlp

    expert_idx, tensors = _make_inputs(5, 33, 20, 3, 2, "random", F32, seed=5)
    grad_out = torch.randn(5, 33, generator=torch.Generator().manual_seed(6))

    def via_dispatch(x, idx, w, w1, b1, w2, b2, act):
        return grouped_expert_mlp(x, idx, w, w1, b1, w2, b2, activation=act, backend="triton")

    _assert_bitwise_same(via_dispatch, op.grouped_expert_mlp_triton, expert_idx, tensors, grad_out,
                         "dispatch(backend='triton') output != op.grouped_expert_mlp_triton",
                         "dispatch {name} != op {name}")


def test_gradcheck_fp64_cpu():
    expert_idx = torch.tensor([[0, 2], [2, 0], [2, 2]])  # expert 1 empty, a token with a repeated expert
    _, tensors = _make_inputs(3, 5, 6, 3, 2, "random", torch.float64, seed=7)
    leaves = [t.requires_grad_(True) for t in tensors.values()]

    def fn(x, weights, w1, b1, w2, b2):
        return op.grouped_expert_mlp_triton(x, expert_idx, weights, w1, b1, w2, b2, "gelu")

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck_cpu():
    gen = torch.Generator().manual_seed(8)
    n, d, h, e, k = 3, 5, 6, 3, 2
    expert_idx = torch.tensor([[0, 2], [2, 0], [0, 0]])
    order, offsets = op.sort_by_expert(expert_idx, e)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    w1 = torch.randn(e, d, h, generator=gen, requires_grad=True)
    b1 = torch.randn(e, h, generator=gen, requires_grad=True)
    a = torch.randn(n * k, h, generator=gen, requires_grad=True)
    w2 = torch.randn(e, h, d, generator=gen, requires_grad=True)
    b2 = torch.randn(e, d, generator=gen, requires_grad=True)
    torch.library.opcheck(op.grouped_up, (x, w1, b1, order, offsets, k))
    gates = torch.rand(n, k, generator=gen, requires_grad=True)
    torch.library.opcheck(op.grouped_down_combine, (a, w2, b2, gates, order, offsets, k))
    dh, dout = torch.randn(n * k, h, generator=gen), torch.randn(n, d, generator=gen)
    torch.library.opcheck(op.grouped_up_backward, (dh, x.detach(), w1.detach(), order, offsets, k))
    y = torch.randn(n * k, d, generator=gen)
    torch.library.opcheck(
        op.grouped_down_combine_backward, (dout, a.detach(), w2.detach(), gates.detach(), y, order, offsets, k)
    )


def test_torch_compile_fullgraph_cpu():
    expert_idx, tensors = _make_inputs(5, 33, 20, 3, 2, "random", F32, seed=9)
    grad_out = torch.randn(5, 33, generator=torch.Generator().manual_seed(10))
    compiled = torch.compile(op.grouped_expert_mlp_triton, fullgraph=True, backend="aot_eager")
    _assert_bitwise_same(compiled, op.grouped_expert_mlp_triton, expert_idx, tensors, grad_out,
                         "torch.compile output != eager output", "torch.compile {name} != eager {name}")


def test_sort_by_expert_offsets_and_stability():
    expert_idx = torch.tensor([[2, 0], [0, 2], [2, 2], [0, 3]])
    order, offsets = op.sort_by_expert(expert_idx, 5)
    assert order.dtype == torch.int64 and offsets.dtype == torch.int32
    assert offsets.tolist() == [0, 3, 3, 7, 8, 8]  # counts 3, 0, 4, 1, 0
    # stable: within an expert, flat slots (token * k + slot) keep increasing order
    assert order.tolist() == [1, 2, 6, 0, 3, 4, 5, 7]


def test_empty_token_batch():
    _, tensors = _make_inputs(1, 8, 16, 2, 2, "random", F32, seed=11)
    tensors["x"] = tensors["x"][:0]
    tensors["weights"] = tensors["weights"][:0]
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    out = op.grouped_expert_mlp_triton(leaves["x"], torch.zeros(0, 2, dtype=torch.int64), leaves["weights"],
                                       leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"])
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(leaves["w1"].grad, torch.zeros_like(leaves["w1"])), "dw1 must be zero with no tokens"


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(w1=torch.zeros(3, 7, 16)), ValueError, "w1 must be"),
        (dict(b2=torch.zeros(3, 9)), ValueError, "b2 must have shape"),
        (dict(w2=torch.zeros(3, 16, 8, dtype=torch.float64)), TypeError, "w2 must have the dtype"),
        (dict(expert_idx=torch.tensor([[0, 3], [1, 2], [0, 1], [2, 2]])), ValueError,
         r"expert_idx values must be in \[0, 3\)"),
        (dict(expert_idx=torch.zeros(4, 2)), TypeError, "integer"),
        (dict(activation="swish"), ValueError, "activation must be one of"),
    ],
    ids=["w1-shape", "b2-shape", "dtype-mismatch", "idx-out-of-range", "idx-float", "bad-activation"],
)
def test_bad_inputs_raise(change, error, match):
    args = dict(
        x=torch.zeros(4, 8), expert_idx=torch.zeros(4, 2, dtype=torch.int64), weights=torch.zeros(4, 2),
        w1=torch.zeros(3, 8, 16), b1=torch.zeros(3, 16), w2=torch.zeros(3, 16, 8), b2=torch.zeros(3, 8),
        activation="gelu",
    )
    args.update(change)
    with pytest.raises(error, match=match):
        op.grouped_expert_mlp_triton(**args)


def _aot_compile_sm90(kernel, consts: dict, num_warps: int, num_stages: int):
    """Compile ``kernel`` ahead of time for sm_90 (no GPU needed), specialised like a runtime launch:
    unit strides as constants, pointers and other strides 16-divisible; every pointer bf16 but the
    routing tables (``idx_ptr`` int64 sorted slots, ``offsets_ptr`` int32 expert offsets)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    routing = {"idx_ptr": "i64", "offsets_ptr": "i32"}
    pointer_dtypes = {p: routing.get(p, "bf16") for p in names if p.endswith("_ptr")}
    unit = [n for n in names if n.startswith("stride_") and n in consts]
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointer_dtypes:
            sig[name] = "*" + pointer_dtypes[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride_") or name in ("K", "N_OUT"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    assert unit, "expected unit-stride constants"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def test_kernels_compile_for_sm90_without_gpu():
    """The compiled (non-interpreted) kernels build for an H100/H200 with the largest autotune config and
    fit its shared memory, so a GPU session does not find front-end or resource errors first."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    kernels = op._kernels()
    if not isinstance(kernels.grouped_gemm_kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET=1 was set when the kernels were imported: interpreter-only in this process")
    m, n, kk, w, s = op._CUDA_GEMM_TUNE[0]
    consts = dict(stride_xk=1, stride_wn=1, stride_bn=1, stride_yn=1, GATHER=True, SCATTER=False, HAS_BIAS=True,
                  ROW_SCALE=True, ACC_DTYPE=tl.float32, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=m, BLOCK_N=n,
                  BLOCK_K=kk)
    try:
        gemm = _aot_compile_sm90(kernels.grouped_gemm_kernel, consts, w, s)
    except Exception as exc:  # noqa: BLE001 - only a missing toolchain is a reason to skip
        if "ptxas" in str(exc).lower() or isinstance(exc, (FileNotFoundError, ImportError)):
            pytest.skip(f"no CUDA toolchain for ahead-of-time compilation: {exc}")
        raise
    kk, n, m, w, s = op._CUDA_WGRAD_TUNE[0]
    consts = dict(stride_xk=1, stride_dyn=1, stride_dwn=1, stride_dbn=1, X_GATHER=False, DY_GATHER=True, DY_SCALE=True,
                  HAS_BIAS=True, ACC_DTYPE=tl.float32, UPCAST=False, DOT_PRECISION="tf32", BLOCK_K=kk, BLOCK_N=n,
                  BLOCK_M=m)
    wgrad = _aot_compile_sm90(kernels.grouped_weight_grad_kernel, consts, w, s)
    compiled = {"grouped_gemm_kernel": gemm, "grouped_weight_grad_kernel": wgrad}
    for name, unit_strides in (("combine_kernel", ("stride_yd", "stride_od")),
                               ("combine_gate_grad_kernel", ("stride_od", "stride_yd"))):
        meta = dict(op._CUDA_META[name])
        warps = meta.pop("num_warps")
        consts = dict(meta, ACC_DTYPE=tl.float32, **{u: 1 for u in unit_strides})
        if name == "combine_kernel":
            consts["HAS_GATES"] = True
        compiled[name] = _aot_compile_sm90(getattr(kernels, name), consts, warps, 1)
    smem_limit = 232448  # bytes of shared memory per block on sm_90
    for name, compiled in compiled.items():
        assert "cubin" in compiled.asm, f"{name}: no cubin produced"
        assert compiled.metadata.shared <= smem_limit, f"{name}: {compiled.metadata.shared} B shared > {smem_limit}"


# --------------------------------------------------------------------------------------------------
# GPU (compiled kernels)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 off for the fp32 parity test
    yield torch.device("cuda")
    torch.set_float32_matmul_precision(precision)


VIT_B16 = dict(n=6304, d=768, h=512, e=4, k=2)  # 2 clips x 16 frames x 197 tokens


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_triton_matches_torch_backend_gpu(cuda, dtype, monkeypatch):
    from facelayers.ops.grouped_experts.torch_backend import grouped_expert_mlp_torch

    if dtype == torch.float16:  # fp16 covers the fixed-config path (bf16 the autotuned one); halves compile time
        monkeypatch.setenv("FACELAYERS_TRITON_AUTOTUNE", "0")

    s = VIT_B16
    label = f"ViT-B/16 sizes {s} {dtype}"
    expert_idx, tensors = _make_inputs(s["n"], s["d"], s["h"], s["e"], s["k"], "random", dtype, seed=12, device=cuda)
    grad_out = torch.randn(s["n"], s["d"], generator=torch.Generator().manual_seed(13)).to(cuda)
    out, grads = _run(op.grouped_expert_mlp_triton, expert_idx, tensors, "gelu", grad_out)
    ref_out, ref_grads = _run(grouped_expert_mlp_torch, expert_idx, tensors, "gelu", grad_out)
    t64 = {name: t.double() for name, t in tensors.items()}
    out64, grads64 = _run(grouped_expert_mlp_torch, expert_idx, t64, "gelu", grad_out.double())
    _check_close("out", out, ref_out, out64, dtype, label)
    for name in GRAD_NAMES:
        _check_close(name, grads[name], ref_grads[name], grads64[name], dtype, label)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("routing", ["random", "empty", "one"])
def test_triton_deterministic_gpu(cuda, routing):
    s = VIT_B16
    expert_idx, tensors = _make_inputs(s["n"], s["d"], s["h"], s["e"], s["k"], routing, torch.bfloat16, seed=14,
                                       device=cuda)
    grad_out = torch.randn(s["n"], s["d"], generator=torch.Generator().manual_seed(15)).to(cuda)
    out_a = _assert_bitwise_same(op.grouped_expert_mlp_triton, op.grouped_expert_mlp_triton, expert_idx, tensors,
                                 grad_out, f"{routing}: out differs between two identical runs",
                                 f"{routing}: {{name}} differs between two identical runs")
    assert torch.isfinite(out_a).all(), "non-finite output"


@pytest.mark.requires_cuda
def test_no_host_sync_gpu(cuda):
    """The whole forward + backward runs with CUDA sync debug mode set to "error"."""
    expert_idx, tensors = _make_inputs(1000, 64, 32, 4, 2, "empty", torch.bfloat16, seed=16, device=cuda)
    grad_out = torch.randn(1000, 64, device=cuda)
    _run(op.grouped_expert_mlp_triton, expert_idx, tensors, "gelu", grad_out)  # warm-up (autotune, compile)
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = op.grouped_expert_mlp_triton(leaves["x"], expert_idx, leaves["weights"], leaves["w1"], leaves["b1"],
                                           leaves["w2"], leaves["b2"], "gelu")
        out.backward(grad_out.to(out.dtype))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
