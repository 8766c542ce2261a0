#!/usr/bin/env bash
# One-command GPU check of the Triton grouped-expert kernel (issues 4 and 10).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with one CUDA GPU
#
# 1. records the card, driver and versions;
# 2. installs open_clip_torch / ftfy (and their missing needs) from carried wheels if not importable
#    (folder $WHEELS, default ./wheels, git-ignored; fill it on a networked machine with
#    `pip download --no-deps -d wheels open_clip_torch ftfy wcwidth regex`);
# 3. runs the GPU parity tests (bf16/fp16/fp32 at ViT-B/16 sizes, determinism, no host sync);
# 4. runs the GPU benchmarks (triton vs masked loop vs torch backend vs torch._grouped_mm vs dense FFN);
# 5. profiles one Triton step (where the time goes) and writes it under $OUT;
# 6. runs the reference-SSM GPU benchmarks (ViT-B/16, 12 + 8 clips x 16 frames: bf16 step vs
#    release-style fp32 step, clips/s and peak memory; needs open_clip);
# 7. prints a short table and writes everything under $OUT (default ./gpu_out).
#
# Time: each step has its own timeout (defaults 150 s tests + 140 s kernel benchmarks + 40 s profile
# + 140 s SSM benchmarks = 470 s at most) so the whole script stays under 8 minutes, Triton
# compilation and autotuning included.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
WHEELS="${WHEELS:-$PWD/wheels}"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-140}"
SSM_TIMEOUT="${SSM_TIMEOUT:-140}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
unset TRITON_INTERPRET FACELAYERS_MOE_BACKEND

echo "== environment" | tee "$OUT/env.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi unavailable"
  "$PY" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"not importable ({exc})"
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  triton {tv}")
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
EOF
} 2>&1 | tee -a "$OUT/env.txt"

echo "== dependencies"
if ! "$PY" -c "import open_clip, ftfy" >/dev/null 2>&1; then
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" open_clip_torch ftfy 2>&1 | tail -3 \
      || "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl 2>&1 | tail -3
  else
    echo "open_clip/ftfy missing and no wheel folder $WHEELS (not needed by the kernel checks)"
  fi
fi
"$PY" -c "import open_clip, ftfy; print('open_clip', open_clip.__version__)" 2>&1 | tail -1

echo "== GPU parity tests (timeout ${TEST_TIMEOUT}s)"
timeout "$TEST_TIMEOUT" "$PY" -m pytest tests/test_grouped_experts_triton.py -m requires_cuda -q -rs \
  -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
test_rc=${PIPESTATUS[0]}

echo "== GPU benchmarks (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" -m pytest benchmarks/test_bench_moe_gpu.py --benchmark -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_moe_gpu.json" --benchmark-columns=median,iqr,rounds 2>&1 \
  | tee "$OUT/bench.log" | tail -40
bench_rc=${PIPESTATUS[0]}

echo "== profile (triton step, N=6304; details in \$OUT/profile_moe_N6304.txt)"
timeout 40 "$PY" benchmarks/profile_moe_gpu.py 6304 "$OUT" 2>&1 | head -3

echo "== reference-SSM GPU benchmarks (timeout ${SSM_TIMEOUT}s)"
timeout "$SSM_TIMEOUT" "$PY" -m pytest benchmarks/test_bench_ssm.py -m requires_cuda --benchmark -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_ssm_gpu.json" --benchmark-columns=median,iqr,rounds 2>&1 \
  | tee "$OUT/bench_ssm.log" | tail -25
ssm_rc=${PIPESTATUS[0]}

echo "== summary"
"$PY" - "$OUT/bench_moe_gpu.json" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from collections import defaultdict

try:
    data = json.load(open(sys.argv[1]))
except Exception as exc:  # noqa: BLE001
    print(f"no benchmark results ({exc})")
    sys.exit(0)
rows = defaultdict(dict)
peak = None
for b in data["benchmarks"]:
    name = b["name"].split("[")[0].replace("test_gpu_", "").replace("test_", "")
    med = b["stats"]["median"]
    flops = b.get("extra_info", {}).get("flops")
    if b["group"] == "bf16 matmul peak":
        peak = flops / med / 1e12
        continue
    rows[b["group"]][name] = (med, flops)
print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s" if peak else "measured bf16 matmul peak: n/a")
print()
print("| group | row | median ms | x masked loop | / dense FFN | TFLOP/s | of peak |")
print("|---|---|---|---|---|---|---|")
verdicts = []
for group in sorted(rows, key=lambda g: int(g.split("N=")[-1])):
    r = rows[group]
    base = r.get("moe_masked_loop", (None,))[0]
    dense = r.get("dense_ffn", (None,))[0]
    for name, (med, flops) in sorted(r.items(), key=lambda kv: kv[1][0]):
        tf = flops / med / 1e12 if flops else None
        print(f"| {group} | {name} | {med * 1e3:.3f} | {base / med if base else float('nan'):.2f} "
              f"| {med / dense if dense else float('nan'):.2f} | {tf or float('nan'):.0f} "
              f"| {100 * tf / peak if (tf and peak) else float('nan'):.0f}% |")
    if "moe_triton" in r:
        t = r["moe_triton"][0]
        n = int(group.split("N=")[-1])
        need = 3.0 if n <= 6304 else 1.5
        if base:
            verdicts.append(f"N={n}: triton {base / t:.2f}x faster than masked loop (target >= {need}x): "
                            f"{'MET' if base / t >= need else 'MISSED'}")
        if dense:
            verdicts.append(f"N={n}: triton / dense FFN = {t / dense:.2f} (target <= 0.5): "
                            f"{'MET' if t / dense <= 0.5 else 'MISSED'}")
        if peak:
            frac = r["moe_triton"][1] / t / 1e12 / peak
            verdicts.append(f"N={n}: triton at {100 * frac:.0f}% of measured bf16 peak (target >= 30%): "
                            f"{'MET' if frac >= 0.30 else 'MISSED'}")
        if "moe_triton_cuda_graph" in r:
            tg, fl = r["moe_triton_cuda_graph"]
            extra = f", {100 * fl / tg / 1e12 / peak:.0f}% of peak" if peak else ""
            extra += f", / dense FFN = {tg / dense:.2f}" if dense else ""
            verdicts.append(f"N={n}: (info) triton in a CUDA graph {tg * 1e3:.3f} ms{extra}")
print()
print("\n".join(verdicts))
EOF

echo "== exit codes: parity tests ${test_rc}, kernel benchmarks ${bench_rc}, SSM benchmarks ${ssm_rc} (124 = timed out); results in $OUT"
exit $(( test_rc != 0 || bench_rc != 0 || ssm_rc != 0 ))
