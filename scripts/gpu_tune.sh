#!/usr/bin/env bash
# The GPU performance run: the standard sweep against the peers, torch.compile max-autotune on a
# few sizes, then the tuning sweep behind csrc/backend.cpp's native-vs-cuBLAS threshold (each
# backend forced, on a ladder of sizes; with the `cutlass` backend where the build has it). Each
# step has its own limit, about 12 minutes in all: where
# one call may run 10, give SWEEPS one or two steps per call.
# Rows, tables and plots under $OUT (else benchmarks/results/gpu-tune-<date>/); a compact table
# of the tuning sweep last. Needs the extension built for this GPU (scripts/gpu_check.sh does).
#
#   bash scripts/gpu_tune.sh                      # all three, bfloat16
#   SWEEPS=tune bash scripts/gpu_tune.sh          # only the tuning ladder
#   DTYPES=float16 SWEEPS=standard bash scripts/gpu_tune.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu-tune-$(date +%Y-%m-%d)}"
PY="${PYTHON:-python3}"
SWEEPS="${SWEEPS:-standard autotune tune}"
DTYPES="${DTYPES:-bfloat16}"  # DTYPES=bfloat16,float16 for both (about twice the time)
mkdir -p "$OUT"
status=0

if [[ " $SWEEPS " == *" standard "* ]]; then
  # The standard sizes (fusedskip/bench.py standard_sizes), the add form and concat of 2 and 4.
  echo "=== standard sweep ($DTYPES; forward, forward+backward)"
  timeout 300 $PY -m fusedskip.bench --dtype "$DTYPES" --mode forward,forward+backward \
    --op relu_add,concat2,concat4 --providers fused,eager,compile,gemm --out "$OUT/standard" \
    > "$OUT/standard.log" 2>&1 || status=1
  tail -n 3 "$OUT/standard.log"
fi

if [[ " $SWEEPS " == *" autotune "* ]]; then
  # max-autotune spends tens of seconds per graph: a few sizes, forward only.
  echo "=== torch.compile(mode='max-autotune'), forward"
  timeout 240 $PY -m fusedskip.bench --dtype "$DTYPES" --mode forward --op relu_add,concat2 \
    --sizes 64x30x30,4096x1024x1024,8192x4096x4096 --providers fused,compile-max-autotune,eager \
    --out "$OUT/autotune" > "$OUT/autotune.log" 2>&1 || status=1
  tail -n 3 "$OUT/autotune.log"
fi

if [[ " $SWEEPS " == *" tune "* ]]; then
  # Each backend forced on a ladder of sizes around the threshold in csrc/backend.cpp (2^28
  # multiply-adds, measured on an H200): where fused-native stops beating fused-gemm_epilogue.
  SIZES="65536x30x30,4096x256x256,16384x128x128,8192x256x256,2048x512x512,4096x512x512"
  # fused-cutlass (sm_90, out_features a multiple of 128) is where auto could go next.
  echo "=== tuning sweep: native vs gemm_epilogue vs cutlass"
  timeout 200 $PY -m fusedskip.bench --dtype bfloat16 --mode forward,forward+backward \
    --op relu_add,concat2 --sizes "$SIZES" \
    --providers fused-native,fused-gemm_epilogue,fused-cutlass,gemm --out "$OUT/tune" \
    > "$OUT/tune.log" 2>&1 || status=1
  $PY - "$OUT/tune/rows.jsonl" <<'PYEOF'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
times = collections.defaultdict(dict)
for r in rows:
    if r.get("status") == "ok":
        times[(r["op"], r["mode"], r["M"], sum(r["K"]), r["N"])][r["provider"]] = r["p50_us"]
print("| op | mode | M*K*N | native µs | gemm_epilogue µs | cutlass µs | gemm µs | native / gemm_epilogue |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for (op, mode, m, k, n), t in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] * kv[0][3] * kv[0][4])):
    a, b = t.get("fused-native"), t.get("fused-gemm_epilogue")
    c, g = t.get("fused-cutlass"), t.get("gemm")
    ratio = f"{a / b:.2f}" if a and b else "-"
    fmt = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
    print(f"| {op} | {mode} | {m}x{k}x{n} = {m * k * n:.2e} | {fmt(a)} | {fmt(b)} | {fmt(c)} | "
          f"{fmt(g)} | {ratio} |")
PYEOF
fi
exit $status
