#!/usr/bin/env bash
# The GPU performance run: the standard sweep against the peers, then the tuning sweep behind
# csrc/backend.cpp's native-vs-cuBLAS threshold (each backend forced, on a ladder of sizes).
# Rows, tables and plots under $OUT (else benchmarks/results/gpu-tune-<date>/); a compact table
# of the tuning sweep last. Needs the extension built for this GPU (scripts/gpu_check.sh does).
#
#   bash scripts/gpu_tune.sh            # both sweeps
#   SWEEPS=tune bash scripts/gpu_tune.sh  # only the tuning ladder
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu-tune-$(date +%Y-%m-%d)}"
PY="${PYTHON:-python3}"
SWEEPS="${SWEEPS:-standard tune}"
mkdir -p "$OUT"
status=0

if [[ " $SWEEPS " == *" standard "* ]]; then
  echo "=== standard sweep (bfloat16, float16; forward, forward+backward)"
  timeout 420 $PY -m fusedskip.bench --dtype bfloat16,float16 --mode forward,forward+backward \
    --providers fused,eager,compile-max-autotune,gemm --out "$OUT/standard" \
    > "$OUT/standard.log" 2>&1 || status=1
  tail -n 3 "$OUT/standard.log"
fi

if [[ " $SWEEPS " == *" tune "* ]]; then
  # Square layers from launch-bound to GEMM-bound, and the seed's narrow layers at large batch:
  # where fused-native stops beating fused-gemm_epilogue is the threshold (multiply-adds M*K*N).
  SIZES="64x64x64,1024x64x64,1024x256x256,4096x256x256,4096x512x512,8192x512x512"
  SIZES+=",4096x1024x1024,8192x1024x1024,16384x1024x1024,65536x30x30,65536x256x256"
  echo "=== tuning sweep: native vs gemm_epilogue"
  timeout 300 $PY -m fusedskip.bench --dtype bfloat16 --mode forward,forward+backward \
    --op relu_add,concat2 --sizes "$SIZES" \
    --providers fused-native,fused-gemm_epilogue,gemm --out "$OUT/tune" \
    > "$OUT/tune.log" 2>&1 || status=1
  $PY - "$OUT/tune/rows.jsonl" <<'PYEOF'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
times = collections.defaultdict(dict)
for r in rows:
    if r.get("status") == "ok":
        times[(r["op"], r["mode"], r["M"], sum(r["K"]), r["N"])][r["provider"]] = r["p50_us"]
print("| op | mode | M*K*N | native µs | gemm_epilogue µs | native / gemm_epilogue |")
print("|---|---|---:|---:|---:|---:|")
for (op, mode, m, k, n), t in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] * kv[0][3] * kv[0][4])):
    a, b = t.get("fused-native"), t.get("fused-gemm_epilogue")
    ratio = f"{a / b:.2f}" if a and b else "-"
    fmt = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
    print(f"| {op} | {mode} | {m}x{k}x{n} = {m * k * n:.2e} | {fmt(a)} | {fmt(b)} | {ratio} |")
PYEOF
fi
exit $status
