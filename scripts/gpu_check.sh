#!/usr/bin/env bash
# The one-command GPU check: build for this GPU, run the CUDA tests, compute-sanitizer on a small
# workload, a quick fused-vs-eager benchmark; logs and results under $OUT (else
# benchmarks/results/gpu-check-<date>/), a summary table last. Uses the python3 and torch already
# on the machine; needs no network. It ends within FUSEDSKIP_CHECK_BUDGET_S (default 450 s, under
# the 8 minutes it is allowed): each step's limit is cut to what is left, and a step with too
# little left is not run (the summary says so, as it does of a step the budget stopped; exit
# status 3 where all else passed).
#
# The steps run in order of what most needs a GPU's time: correctness first (the tests, the
# `cutlass` kernels' first; racecheck; memcheck), then the timings, what earlier runs covered
# last (the quick sweep). A build that fails or does not load ends the run at once.
#
# $OUT ends with some thirty files: for a runner that brings back only a few, run
# scripts/gpu_session.sh, or give ARCHIVE=<file> to have all of it packed into that one file.
#
#   bash scripts/gpu_check.sh
#   FUSEDSKIP_PREBUILT=1 FUSEDSKIP_CHECK_SKIP=racecheck OUT=/tmp/check bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The sanitizer steps run tests/cuda_smoke.py as a script: the package must import from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A build that silently fell back to CPU-only would skip every CUDA test: make that a failure.
export FUSEDSKIP_EXPECT_CUDA_BUILD=1
OUT="${OUT:-benchmarks/results/gpu-check-$(date +%Y-%m-%d)}"
ARCHIVE="${ARCHIVE:-}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
declare -A STATUS

# FUSEDSKIP_CHECK_SKIP=racecheck,bench (say) leaves those steps out, for a device session whose
# time is short and whose change cannot touch them; the summary names them as skipped.
SKIP=",${FUSEDSKIP_CHECK_SKIP:-},"
BUDGET="${FUSEDSKIP_CHECK_BUDGET_S:-450}"
STEPS=(build cuda_tests_cutlass cuda_tests racecheck_cutlass racecheck memcheck kernel_times
       bench_large cutlass_configs bench_compile bench)
# An earlier run's outputs in the same $OUT (the default is one folder a day) would otherwise
# stand in the summary for steps this run leaves out; the bench folders each clear their own.
for name in "${STEPS[@]}"; do rm -f "$OUT/$name.log" "$OUT/$name.xml"; done
rm -f "$OUT/summary.md" "$OUT/ptxas.txt" "$OUT/environment.txt" "$OUT"/rows.* \
  "$OUT"/large/rows.* "$OUT"/compile/rows.*

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, remember pass/fail
  local name=$1 limit=$2; shift 2
  if [[ "$SKIP" == *",$name,"* ]]; then
    STATUS[$name]="skipped: FUSEDSKIP_CHECK_SKIP"
    echo "=== $name: skipped (FUSEDSKIP_CHECK_SKIP)"
    return 0
  fi
  # 20 s kept: up to 10 for a step's kill after its TERM (timeout -k), 10 for the summary.
  local left=$((BUDGET - SECONDS - 20))
  if ((left < 20)); then
    STATUS[$name]="not run: out of time (budget ${BUDGET}s)"
    echo "=== $name: not run, ${left}s left of the ${BUDGET}s budget"
    return 0
  fi
  local cut=0
  ((limit > left)) && limit=$left cut=1
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  # -k: a process that ignores the TERM (stuck in the driver, say) is killed 10 s later.
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if (((rc == 124 || rc == 137) && cut)); then  # stopped by the budget, not its own limit
    STATUS[$name]="not finished: the budget left it ${limit}s"
  else
    STATUS[$name]="rc=$rc $((SECONDS - start))s"
  fi
  tail -n 5 "$OUT/$name.log"
  return $rc
}

# The summary table (also $OUT/summary.md), the archive, and the exit status: 0 where every step
# ran and passed, 3 where all that ran passed but the budget left some out, else 1.
finish() {
  {
    echo "| step | result |"
    echo "|---|---|"
    for name in "${STEPS[@]}"; do
      echo "| $name | ${STATUS[$name]:-not run} |"
    done
    echo
    for name in cuda_tests_cutlass cuda_tests; do  # pytest's closing line
      [[ -f "$OUT/$name.log" ]] &&
        echo "$name: $(grep -E "(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s" \
          "$OUT/$name.log" | tail -n 1)"
    done
    for name in memcheck racecheck racecheck_cutlass; do  # each sanitizer run's closing lines
      [[ -f "$OUT/$name.log" ]] &&
        echo "$name: $(grep -E "^cuda_smoke: [0-9]+ cases|SUMMARY" "$OUT/$name.log" |
          paste -sd ';' - | sed 's/;/; /g')"
    done
    # The benches' rows, judged by the bench's own rule (a mismatch, or the fused op failing),
    # which its exit status cannot carry where a time limit stopped it (timeout's 124).
    $PY -c 'import sys; from fusedskip.bench import rows_verdict
sys.exit(rows_verdict(sys.argv[1:]))' "$OUT/rows.jsonl" "$OUT/large/rows.jsonl" \
      "$OUT/compile/rows.jsonl" 2>&1
    rows_rc=$?
  } > "$OUT/summary.md"
  if [[ -n "$ARCHIVE" ]]; then  # all of it in one file, for a runner that brings back few
    mkdir -p "$(dirname "$ARCHIVE")"
    tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "all of it: $ARCHIVE"
  fi
  echo
  cat "$OUT/summary.md"
  status=0
  for name in "${STEPS[@]}"; do
    case "${STATUS[$name]:-rc=none}" in
      rc=0\ * | skipped:*) ;;
      not\ run:* | not\ finished:*) ((status == 0)) && status=3 ;;
      *) status=1 ;;
    esac
  done
  ((rows_rc != 0)) && status=1  # also where the budget stopped the step that wrote the row
  exit $status
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "sources: $(bash scripts/source_stamp.sh 2>&1)"  # scripts/source_stamp.sh: works sans git
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  nvcc --version | tail -n 2
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import fusedskip; print('fusedskip cutlass backend built:', fusedskip.cutlass_built())" 2>&1
} | tee "$OUT/environment.txt"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no GPU here; nothing to check" | tee "$OUT/summary.md"
  exit 2
fi
# On an sm_90 GPU the `cutlass` kernels are what most needs checking: a build without them would
# skip their tests and pass, so their absence fails test_build's check instead. Set
# FUSEDSKIP_EXPECT_CUTLASS=0 to check a build made without CUTLASS on purpose.
if [[ "$($PY -c "import torch; print(torch.cuda.get_device_capability())")" == "(9, 0)" ]]; then
  export FUSEDSKIP_EXPECT_CUTLASS="${FUSEDSKIP_EXPECT_CUTLASS:-1}"
fi

# 1. Build for the local GPU only (FUSEDSKIP_CUDA_ARCHS=native), registers/spills logged.
# FUSEDSKIP_PREBUILT=1 uses an extension already built for this python/torch/GPU (e.g. made on
# another machine with the same versions and carried along) and only checks that it loads, and
# that it was built from the sources here (scripts/build_for_device.sh writes their hash beside
# it). Where this machine has no network, the `cutlass` backend comes only that way: build it
# where `pip install --no-deps nvidia-cutlass` is possible (FUSEDSKIP_CUDA_ARCHS=9.0a for an
# H100/H200).
LOADS='import sys; from fusedskip.bench import check_cuda_kernels
sys.exit(check_cuda_kernels(sys.argv[1]))'
if [[ "${FUSEDSKIP_PREBUILT:-0}" == 1 ]]; then
  step build 60 bash -c '
    stamp=fusedskip/_prebuilt_sources.sha256
    built=$(cat "$stamp" 2>/dev/null || echo "unknown (no $stamp)")
    here=$(bash scripts/source_stamp.sh)
    if [[ "$built" != "$here" ]]; then
      echo "prebuilt: built from sources $built, but the sources here are $here:" \
        "rebuild with scripts/build_for_device.sh (commit first) and carry its files"
      exit 1
    fi
    $0 -c "$1" build' "$PY" "$LOADS"
else
  # A build can succeed and still leave nothing that runs here (a CPU-only fallback, a library
  # the .so cannot find): the same load check, after it.
  step build 300 bash -c '
    env FUSEDSKIP_CUDA_ARCHS=native FUSEDSKIP_PTXAS_VERBOSE=1 MAX_JOBS="$(nproc)" \
      $0 setup.py build_ext --inplace && $0 -c "$1" build' "$PY" "$LOADS"
  grep -E "Compiling entry|registers|spill" "$OUT/build.log" > "$OUT/ptxas.txt" 2>/dev/null
fi
# Every later step would test nothing, or something else, and spend the GPU's time doing it.
[[ "${STATUS[build]}" == rc=0\ * || "${STATUS[build]}" == skipped:* ]] || finish

# 2. The CUDA tests (and the build checks), in two processes: a kernel fault loses the CUDA
# context, and every later test in that process would fail with it (tests/conftest.py stops the
# run there and names the test). The `cutlass` kernels' tests go first and apart: they are the
# least run. -v names each test as it starts, so a kernel that never finishes shows in the log
# where the step's limit cut it off; with pytest-timeout installed, a test stuck in Python fails
# alone.
TIMEOUT_ARGS=()
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 60)
# Every test marked `cuda` (tests/conftest.py: CUDA_MARKS / requires_cuda), in whichever file,
# and the build checks. The rest of the suite is CPU-only and runs in CI.
cuda_tests() {  # cuda_tests NAME -k EXPRESSION
  local name=$1; shift
  step "$name" 240 $PY -m pytest tests -m "cuda or build" -v -ra -p no:cacheprovider \
    --junitxml="$OUT/$name.xml" "${TIMEOUT_ARGS[@]}" "$@"
}
cuda_tests cuda_tests_cutlass -k cutlass
cuda_tests cuda_tests -k "not cutlass"

# 3. racecheck of the cutlass kernels' shared memory (TMA-filled operand stages, the epilogue's
# staging; the concat producer's own loads), each kernel once, on few cases (each is slow under
# it).
if [[ "${FUSEDSKIP_EXPECT_CUTLASS:-0}" == 1 ]]; then
  step racecheck_cutlass 90 compute-sanitizer --tool racecheck --error-exitcode 9 \
    $PY tests/cuda_smoke.py cutlass --small
else
  STATUS[racecheck_cutlass]="skipped: no cutlass kernels expected here"
fi

# 4. racecheck of the native kernel's shared-memory tiles (loads, tensor-core reads, the aliased
# accumulator tile the epilogue reads). Early: its loads were rewritten since it last ran (each
# thread's share of a K step in registers first, csrc/tile_gemm.h load_tiles), and the 2026-11-28
# run's budget left it out.
step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
  $PY tests/cuda_smoke.py native --small

# 5. compute-sanitizer memcheck on the smoke workload, before any timing: the native kernel's
# loads, epilogue and add_relu's one-launch backward were rewritten since memcheck last saw them
# (2026-11-28), and racecheck sees only shared memory. The cutlass kernels and the native kernel
# in full, then the cuBLAS path's element-wise passes in the small set (run in full, clean, on
# 2026-11-27 and 2026-11-28; in full they took 92 of memcheck's 136 s). Caching off: an overrun
# inside a cached 2 MiB block is invisible to memcheck.
step memcheck 150 bash -c '
  sanitize() { PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 9 "$0" tests/cuda_smoke.py "$@"; }
  rc=0
  sanitize cutlass native || rc=$?
  sanitize gemm_epilogue --small || rc=$?
  exit $rc' "$PY"

# 6. Device time per kernel against host time per call: the large relu_add layer on each path;
# the example MLP's narrow layer at many rows, whose forward+backward took ~0.5 ms for every
# provider on the H200 (results/h200-2026-11-26), far above its kernels' work; add_relu's, whose backward
# on the native kernel is one launch since 2026-11-28 (the residual's gradient stored by the
# kernel's loads; 1.39x eager at 64x10 in the 2026-11-28 sweep, against relu_add's 2.11x),
# narrow and at many rows; and the large concat layer:
# the cat and cuBLAS (fused) against the CUTLASS concat kernels, cat-free forward and grouped
# backward (fused-cutlass), and eager; and concat4 at 65536 rows, whose blocks (96 to 424 wide)
# made one cuBLAS GEMM each 0.77x eager in the 2026-11-28 sweep, before the inputs' gradients
# became one GEMM; and concat4 of widths 3+6+9+12 at 65536 rows under no_grad (0.65x eager there),
# the native kernel's K steps since packed over the inputs. Then the fused op's large concat
# and narrow relu_add layers again with FUSEDSKIP_PDL=0: its kernels launched the plain way
# instead of with programmatic dependent launch (csrc/cuda/launch.cuh), what that brings; each
# section's timeline shows where kernels overlap or the GPU idles between them. Last, the concat
# layers' weight gradient one GEMM per block against a cat and one GEMM
# (benchmarks/concat_weight_grad.py): where the library path's choice between them should lie.
# One failing part leaves the others run.
step kernel_times 150 bash -c '
  rc=0
  $0 benchmarks/gpu_kernel_times.py --op relu_add --sizes 4096x1024x1024,8192x4096x4096 \
    --out "$1" --providers fused,fused-cutlass,fused-gemm_epilogue,gemm || rc=1
  $0 benchmarks/gpu_kernel_times.py --op relu_add --mode forward+backward \
    --sizes 64x30x30,65536x30x30 --out "$1" --providers fused,eager || rc=1
  $0 benchmarks/gpu_kernel_times.py --op add_relu --mode forward+backward \
    --sizes 64x10x10,65536x30x30 --out "$1" --providers fused,eager || rc=1
  $0 benchmarks/gpu_kernel_times.py --op concat2 --mode forward+backward \
    --sizes 8192x4096x4096 --out "$1" --providers fused,fused-cutlass,eager || rc=1
  $0 benchmarks/gpu_kernel_times.py --op concat4 --mode forward+backward \
    --sizes 65536x1024x1024 --out "$1" --providers fused,eager || rc=1
  $0 benchmarks/gpu_kernel_times.py --op concat4 --mode no_grad \
    --sizes 65536x30x30 --out "$1" --providers fused,eager || rc=1
  FUSEDSKIP_PDL=0 $0 benchmarks/gpu_kernel_times.py --op concat2 --mode forward+backward \
    --sizes 8192x4096x4096 --out "$1" --providers fused || rc=1
  FUSEDSKIP_PDL=0 $0 benchmarks/gpu_kernel_times.py --op relu_add --mode forward+backward \
    --sizes 65536x30x30 --out "$1" --providers fused || rc=1
  $0 benchmarks/concat_weight_grad.py --out "$1" || rc=1
  exit $rc' "$PY" "$OUT"

# 7. Large layers, where the epilogue inside the GEMM (the `cutlass` backend, sm_90) is meant to
# bring the fused op within 10% of the GEMM alone.
step bench_large 150 $PY -m fusedskip.bench --out "$OUT/large" --dtype bfloat16 \
  --op relu_add,concat2 --mode forward,forward+backward --sizes 4096x1024x1024,8192x4096x4096 \
  --providers fused,fused-cutlass,fused-gemm_epilogue,eager,gemm

# 8. The cutlass kernel at other tile and cluster shapes, against cuBLAS, where the build has them
# (FUSEDSKIP_CUTLASS_CONFIGS=1, benchmarks/cutlass_configs.py; 8192x4096x4096, 4096x1024x1024 and
# the short-K 65536x1024x1024): does any mainloop match cuBLAS's, and what does the fused
# epilogue add? A configs module that is there but does not load fails.
EXT_SUFFIX=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [[ -e "fusedskip/_cutlass_configs$EXT_SUFFIX" ]] ||
   $PY -c "import fusedskip._cutlass_configs" 2>/dev/null; then
  step cutlass_configs 150 $PY benchmarks/cutlass_configs.py --out "$OUT"
else
  STATUS[cutlass_configs]="skipped: not built (FUSEDSKIP_CUTLASS_CONFIGS=1)"
fi

# 9. The peer the sweep leaves out for its compile time, torch.compile, in the dtype it leaves
# out, float16: the example MLP's narrow layer and a large one, forward+backward.
step bench_compile 120 $PY -m fusedskip.bench --out "$OUT/compile" --dtype float16 \
  --op relu_add,concat2 --mode forward+backward --sizes 64x30x30,8192x1024x1024 \
  --providers fused,eager,compile

# 10. Quick benchmark: auto, each backend forced, GEMM alone, eager.
step bench 150 $PY -m fusedskip.bench --quick --out "$OUT" \
  --providers fused,fused-native,fused-gemm_epilogue,eager,gemm

finish
