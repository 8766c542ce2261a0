"""Profile one MoE private-expert step (bf16 fwd + bwd) of the Triton backend on CUDA.

Prints where the time goes (Triton GEMMs vs PyTorch elementwise ops vs CPU launch overhead), to
guide kernel work after a GPU run. Used by ``benchmarks/gpu_check.sh``; not a test.

    python benchmarks/profile_moe_gpu.py [N] [OUT_DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

D, H, E, K = 768, 512, 4, 2


def main(n: int = 6304, out_dir: str | None = None) -> None:
    if not torch.cuda.is_available():
        print("profile_moe_gpu: no CUDA device, nothing to profile")
        return
    from facelayers.ops.grouped_experts.op import grouped_expert_mlp_triton

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g).to(dev, dt).requires_grad_(True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]).to(dev)
    gates = torch.rand(n, K, generator=g).to(dev, dt).requires_grad_(True)
    w1 = (torch.randn(E, D, H, generator=g) * 0.03).to(dev, dt).requires_grad_(True)
    w2 = (torch.randn(E, H, D, generator=g) * 0.03).to(dev, dt).requires_grad_(True)
    b1 = torch.zeros(E, H, device=dev, dtype=dt, requires_grad=True)
    b2 = torch.zeros(E, D, device=dev, dtype=dt, requires_grad=True)
    gout = torch.randn(n, D, generator=g).to(dev, dt)

    def step() -> None:
        out = grouped_expert_mlp_triton(x, idx, gates, w1, b1, w2, b2, "gelu")
        out.backward(gout)

    for _ in range(5):  # compile + autotune
        step()
    torch.cuda.synchronize()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    cpu_s = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    wall_s = (time.perf_counter() - t0) / reps
    lines = [f"N={n}: {1e3 * wall_s:.3f} ms/step wall (synchronised over {reps} steps), "
             f"{1e3 * cpu_s:.3f} ms/step to enqueue (CPU side; if close to wall, the step is launch-bound)"]

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    lines += ["", table]
    text = "\n".join(lines)
    print(text)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, f"profile_moe_N{n}.txt").write_text(text)
        prof.export_chrome_trace(str(Path(out_dir, f"trace_moe_N{n}.json")))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6304, sys.argv[2] if len(sys.argv) > 2 else None)
