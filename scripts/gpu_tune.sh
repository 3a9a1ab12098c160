#!/usr/bin/env bash
# The GPU performance run: the standard sweep against the peers, torch.compile max-autotune on a
# few sizes, then the tuning sweep behind csrc/backend.cpp's native-vs-cuBLAS threshold (each
# backend forced, on a ladder of sizes; with the `cutlass` backend where the build has it). Each
# step has its own limit (standard 300 s, autotune 240 s, tune 200 s), cut to what is left of
# FUSEDSKIP_TUNE_BUDGET_S (default 570 s, under a 10-minute call); a step with under 20 s left is
# not run. The default runs standard and tune (about 8.5 minutes); autotune in a call of its own.
# Rows, tables and plots under $OUT (else benchmarks/results/gpu-tune-<date>/); a compact table
# of the tuning sweep last. Needs the extension built for this GPU (scripts/gpu_check.sh does).
#
#   bash scripts/gpu_tune.sh                      # standard and tune, bfloat16
#   SWEEPS=autotune bash scripts/gpu_tune.sh      # only max-autotune
#   SWEEPS=tune bash scripts/gpu_tune.sh          # only the tuning ladder
#   DTYPES=float16 SWEEPS=standard bash scripts/gpu_tune.sh
#
# Exit status: 0 every step ran and passed, 3 a step was stopped by its limit or left out for
# time (all the rows written passed), 2 no extension with CUDA kernels here, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu-tune-$(date +%Y-%m-%d)}"
PY="${PYTHON:-python3}"
SWEEPS="${SWEEPS:-standard tune}"
DTYPES="${DTYPES:-bfloat16}"  # DTYPES=bfloat16,float16 for both (about twice the time)
BUDGET="${FUSEDSKIP_TUNE_BUDGET_S:-570}"
mkdir -p "$OUT"

# Without the extension's CUDA kernels (not built, not carried, or built for another torch) the
# bench would choose the CPU and spend the GPU machine's time timing large layers there.
"$PY" -c 'import sys; from fusedskip.bench import check_cuda_kernels
sys.exit(check_cuda_kernels(sys.argv[1]))' gpu_tune || exit 2

status=0
bench() {  # bench NAME LIMIT TITLE ARGS...: one fusedskip.bench run on the GPU, log $OUT/NAME.log
  local name=$1 want=$2 title=$3; shift 3
  # 15 s kept: timeout's grace before a kill, and the closing table.
  local left=$((BUDGET - SECONDS - 15))
  local limit=$((left < want ? left : want))
  if ((limit < 20)); then
    echo "=== $title: not run, ${left}s left of the ${BUDGET}s budget"
    ((status == 0)) && status=3  # a failure before stays one
    return 1
  fi
  echo "=== $title (limit ${limit}s)"
  rm -f "$OUT/$name/rows.jsonl"  # judged below: this run's rows only
  timeout -k 10 "$limit" $PY -m fusedskip.bench --device cuda "$@" --out "$OUT/$name" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.log"
  # Stopped by its limit (timeout's 124, or 137 after the kill; the bench keeps the rows it
  # finished): left out, not failed, unless a row it wrote fails the run by the bench's rule.
  # Its own 130 (stopped) likewise; any other status is a failure.
  case $rc in
    0) ;;
    124 | 137 | 130) ((status == 0)) && status=3 ;;
    *) status=1 ;;
  esac
  $PY -c 'import sys; from fusedskip.bench import rows_verdict
sys.exit(rows_verdict(sys.argv[1:]))' "$OUT/$name/rows.jsonl" || status=1
}

if [[ " $SWEEPS " == *" standard "* ]]; then
  # The standard sizes (fusedskip/bench.py standard_sizes), the add form and concat of 2 and 4.
  bench standard 300 "standard sweep ($DTYPES; forward, forward+backward)" \
    --dtype "$DTYPES" --mode forward,forward+backward --op relu_add,concat2,concat4 \
    --providers fused,eager,compile,gemm
fi

if [[ " $SWEEPS " == *" autotune "* ]]; then
  # max-autotune spends tens of seconds per graph: a few sizes, forward only.
  bench autotune 240 "torch.compile(mode='max-autotune'), forward" \
    --dtype "$DTYPES" --mode forward --op relu_add,concat2 \
    --sizes 64x30x30,4096x1024x1024,8192x4096x4096 --providers fused,compile-max-autotune,eager
fi

if [[ " $SWEEPS " == *" tune "* ]]; then
  # Each backend forced on a ladder of sizes around the threshold in csrc/backend.cpp (2^28
  # multiply-adds, measured on an H200): where fused-native stops beating fused-gemm_epilogue.
  SIZES="65536x30x30,4096x256x256,16384x128x128,8192x256x256,2048x512x512,4096x512x512"
  # fused-cutlass (sm_90, out_features a multiple of 128) is where auto could go next.
  # The table is of this run's rows: none where the bench wrote none, not an earlier run's.
  rm -f "$OUT/tune/rows.jsonl"
  if ! bench tune 200 "tuning sweep: native vs gemm_epilogue vs cutlass" \
      --dtype bfloat16 --mode forward,forward+backward --op relu_add,concat2 --sizes "$SIZES" \
      --providers fused-native,fused-gemm_epilogue,fused-cutlass,gemm; then
    :  # not run: said above
  elif [[ ! -s "$OUT/tune/rows.jsonl" ]]; then
    echo "gpu_tune: the tuning sweep wrote no rows ($OUT/tune.log); no table"
    status=1
  else
    $PY - "$OUT/tune/rows.jsonl" <<'PYEOF' || status=1
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
times = collections.defaultdict(dict)
for r in rows:
    if r.get("status") == "ok":
        times[(r["op"], r["mode"], r["M"], sum(r["K"]), r["N"])][r["provider"]] = r["p50_us"]
print("| op | mode | M*K*N | native µs | gemm_epilogue µs | cutlass µs | gemm µs | "
      "native / gemm_epilogue |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
order = lambda kv: (kv[0][0], kv[0][1], kv[0][2] * kv[0][3] * kv[0][4])  # noqa: E731
for (op, mode, m, k, n), t in sorted(times.items(), key=order):
    a, b = t.get("fused-native"), t.get("fused-gemm_epilogue")
    c, g = t.get("fused-cutlass"), t.get("gemm")
    ratio = f"{a / b:.2f}" if a and b else "-"
    fmt = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
    print(f"| {op} | {mode} | {m}x{k}x{n} = {m * k * n:.2e} | {fmt(a)} | {fmt(b)} | {fmt(c)} | "
          f"{fmt(g)} | {ratio} |")
PYEOF
  fi
fi
exit $status
