#!/usr/bin/env bash
# Nsight Compute on the native kernel where it runs far from its floor: the example MLP's narrow
# layer at 65536 rows (forward 32 us and backward 98 us of device time on an H100, 2026-11-28, for a
# few MiB of traffic; eager's GEMMs there take 7-8 us each), the concat form of that width, and a
# 256-wide layer whose K loop takes 8 steps; eager's kernels at the narrow size beside them.
# Per run: the report ($OUT/ncu-NAME.ncu-rep, -lineinfo builds open at source lines), its raw
# metrics as CSV, and one table of them all ($OUT/ncu-summary.md, benchmarks/ncu_summary.py):
# time, throughput, occupancy, the top stall reasons.
#
# After scripts/gpu_check.sh in the same session (it takes the build that one checked; with
# FUSEDSKIP_PREBUILT=1 the carried one), within FUSEDSKIP_PROFILE_BUDGET_S (default 150 s):
#
#   OUT=/tmp/profile bash scripts/gpu_profile.sh
#
# Exit status: 0 every case profiled and summarised, 3 the budget left some case out (all that ran
# passed), 2 no ncu here or no extension with CUDA kernels to profile, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/gpu-profile-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${FUSEDSKIP_PROFILE_BUDGET_S:-150}"
NCU="${NCU:-ncu}"
command -v "$NCU" > /dev/null || { echo "gpu_profile: no ncu here"; exit 2; }
# Run alone, nothing has checked the build: without the extension's CUDA kernels (not built, not
# carried, or built for another torch) the cases would profile the reference path's kernels.
"$PY" -c 'import sys; from fusedskip.bench import check_cuda_kernels
sys.exit(check_cuda_kernels(sys.argv[1]))' gpu_profile || exit 2
# The library's kernels and cuBLAS's (nvjet on sm_90, CUTLASS-made Kernel2 for small shapes).
KERNELS='regex:tile_gemm|split_sum|nvjet|Kernel2|gemm|splitKreduce'
SECTIONS=()
for section in SpeedOfLight LaunchStats Occupancy WarpStateStats SchedulerStats InstructionStats \
               MemoryWorkloadAnalysis; do
  SECTIONS+=(--section "$section")
done

# The summary is of this run's cases only (an OUT reused, as the dated default is within a day,
# holds an earlier run's): the CSVs made here, and a summary written anew.
rm -f "$OUT/ncu-summary.md"
CSVS=()
status=0
profile() {  # profile NAME ARGS...: one gpu_kernel_times.py --once run under ncu
  local name=$1; shift
  # An earlier run's report of this case would sit beside this run's summary as if from it.
  rm -f "$OUT/ncu-$name.ncu-rep" "$OUT/ncu-$name.csv" "$OUT/ncu-$name.log"
  local left=$((BUDGET - SECONDS - 10))
  if ((left < 20)); then
    echo "=== $name: not run, ${left}s left of the ${BUDGET}s budget"
    ((status == 0)) && status=3  # a failure before stays one
    return
  fi
  echo "=== $name (limit ${left}s)"
  # --clock-control none: by default ncu locks the GPU's clocks to base while it profiles, which
  # changes the machine's settings (not ours to change) and makes the times incomparable with
  # the benchmark's, taken at the clocks the card runs at.
  timeout -k 10 "$left" "$NCU" --clock-control none --target-processes all -k "$KERNELS" \
    "${SECTIONS[@]}" -f -o "$OUT/ncu-$name" \
    "$PY" benchmarks/gpu_kernel_times.py --once "$@" > "$OUT/ncu-$name.log" 2>&1 || status=1
  tail -n 3 "$OUT/ncu-$name.log"
  if "$NCU" --import "$OUT/ncu-$name.ncu-rep" --csv --page raw --print-units base \
      > "$OUT/ncu-$name.csv" 2>&1; then
    CSVS+=("$OUT/ncu-$name.csv")
  else
    echo "=== $name: no report to read (ncu-$name.csv, ncu-$name.log)"
    status=1
  fi
}

profile relu_add-65536x30x30 --op relu_add --mode forward+backward --sizes 65536x30x30 \
  --providers fused,eager
profile concat2-65536x30x30 --op concat2 --mode forward --sizes 65536x30x30 --providers fused,eager
profile relu_add-4096x256x256 --op relu_add --mode forward+backward --sizes 4096x256x256 \
  --providers fused

if ((${#CSVS[@]} == 0)); then
  # Said in the summary too: it is the file a session brings back.
  if ((status == 3)); then
    why="the ${BUDGET}s budget (FUSEDSKIP_PROFILE_BUDGET_S) left no case time to run"
  else
    why="ncu made no report to read (each case's ncu-NAME.log)"
  fi
  echo "gpu_profile: no case was profiled, nothing to summarise: $why" | tee "$OUT/ncu-summary.md"
  exit $status
fi
"$PY" benchmarks/ncu_summary.py "${CSVS[@]}" --out "$OUT/ncu-summary.md" || status=1
exit $status
