"""The GPU scripts, checked where CI can: they parse, the GPU check refuses cleanly without a GPU,
and the source hash a prebuilt extension is matched by changes with every source and nothing
else (a GPU run must never test kernels other than the sources beside them)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command_with_warnings_as_errors():
    """CI's script runs `make test` (the README's test command) as a command, after exporting
    FUSEDSKIP_WERROR=1, so the build it tests is warning-free."""
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in (ROOT / "README.md").read_text()
    assert commands[-1] == "make test"
    assert commands.index("export FUSEDSKIP_WERROR=1") < len(commands) - 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_gpu_check_without_a_gpu_says_so(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                            text=True, timeout=300,
                            env=dict(os.environ, OUT=str(out), PYTHON=sys.executable))
    assert result.returncode == 2, result.stdout + result.stderr
    assert (out / "summary.md").read_text().strip() == \
        "gpu_check: torch sees no GPU here; nothing to check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_gpu_session_without_a_gpu_passes_the_check_on_and_profiles_nothing(tmp_path):
    """scripts/gpu_session.sh: the check's exit status and summary come back in $OUT, and no
    profile runs where the check built nothing."""
    out = tmp_path / "few-files"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"),
                                     PYTHON=sys.executable))
    assert result.returncode == 2, result.stdout + result.stderr
    assert (out / "check-summary.md").read_text().strip() == \
        "gpu_check: torch sees no GPU here; nothing to check"
    assert "no profile" in (out / "profile.out").read_text()
    assert not (out / "profile.tgz").exists()


def _stamp(tree):
    result = subprocess.run(["bash", str(tree / "scripts" / "source_stamp.sh")],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_source_stamp_follows_the_sources_and_nothing_else(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "source_stamp.sh", tmp_path / "scripts")
    (tmp_path / "setup.py").write_text("setup()\n")
    for folder in ("csrc/cuda", "benchmarks/cutlass_configs"):
        (tmp_path / folder).mkdir(parents=True)
    sources = ["setup.py", "csrc/ops.cpp", "csrc/epilogue.h", "csrc/cuda/k.cu", "csrc/cuda/k.cuh",
               "benchmarks/cutlass_configs/bindings.cpp"]
    for name in sources[1:]:
        (tmp_path / name).write_text("// source\n")
    (tmp_path / "csrc" / "README.txt").write_text("not a source\n")

    first = _stamp(tmp_path)
    assert len(first) == 64 and int(first, 16) >= 0
    (tmp_path / "csrc" / "README.txt").write_text("changed, still not a source\n")
    assert _stamp(tmp_path) == first
    seen = {first}
    for name in sources:
        (tmp_path / name).write_text((tmp_path / name).read_text() + "// changed\n")
        seen.add(_stamp(tmp_path))
    (tmp_path / "csrc" / "new.cpp").write_text("// a new source\n")
    seen.add(_stamp(tmp_path))
    assert len(seen) == len(sources) + 2


def _kernel_times_module():
    spec = importlib.util.spec_from_file_location(
        "gpu_kernel_times", ROOT / "benchmarks" / "gpu_kernel_times.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_timeline_splits_calls_and_measures_gaps_and_overlaps():
    timeline_of = _kernel_times_module().call_timeline
    # Three calls 100 us apart: A for 10 us; B starting 2 us after A ends in call 0, and 2 us before
    # it ends (overlapping it) in calls 1 and 2; a memset after B.
    b_starts = [12.0, 8.0, 8.0]
    intervals = []
    for c, b_start in enumerate(b_starts):
        base = 100.0 * c
        intervals += [("A", base, base + 10), ("B", base + b_start, base + b_start + 18),
                      ("Memset (Device)", base + 40, base + 41)]
    timeline = timeline_of(intervals, 3)
    assert timeline.period_us == 100.0
    # Calls 0 and 1 (the last has no next call to end its period): 10 + 18 + 1, and 26 + 1 where
    # B overlaps A.
    assert timeline.busy_us == pytest.approx((29.0 + 27.0) / 2)
    assert timeline.idle_us == pytest.approx(100.0 - 28.0)
    names = [name for name, _, _ in timeline.rows]
    assert names == ["A", "B", "Memset (Device)"]
    durations = [us for _, us, _ in timeline.rows]
    assert durations == [10.0, 18.0, 1.0]
    gaps = [gap for _, _, gap in timeline.rows]
    # A: from the call before's memset (ended at 41) to 100; B: 2, -2, -2; the memset: 40 - 30,
    # 40 - 26, 40 - 26.
    assert gaps == [59.0, -2.0, 14.0]


def test_kernel_timeline_refuses_calls_that_differ():
    timeline_of = _kernel_times_module().call_timeline
    same = [("A", 0.0, 1.0), ("B", 2.0, 3.0), ("A", 10.0, 11.0), ("B", 12.0, 13.0)]
    assert timeline_of(same, 2) is not None
    assert timeline_of(same[:3], 2) is None  # not a whole number of calls
    swapped = same[:2] + [("B", 10.0, 11.0), ("A", 12.0, 13.0)]
    assert timeline_of(swapped, 2) is None
    assert timeline_of(same, 1) is None  # one call has no period


def test_concat_weight_grad_benchmark_runs_and_checks_each_way(tmp_path):
    """benchmarks/concat_weight_grad.py on CPU at small sizes: each way gives the gradient (it
    stops otherwise), and a row per shape lands in the file."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "concat_weight_grad.py"), "--device", "cpu",
         "--dtype", "float32", "--sizes", "96x200x24", "--calls", "1", "--rounds", "1",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    (written,) = tmp_path.glob("concat-weight-grad-*.md")
    rows = [line for line in written.read_text().splitlines() if line.startswith("| 96 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["[64, 136]", "[20, 40, 60, 80]"]


def test_kernel_timeline_counts_time_once_where_calls_overlap():
    """Each call's kernel starts before the call before has ended (as a kernel placed early by
    programmatic dependent launch does): the overlap is busy time of one call, not of both."""
    timeline = _kernel_times_module().call_timeline(
        [("K", 5.0 * c, 5.0 * c + 10) for c in range(4)], 4)
    assert timeline.period_us == 5.0
    assert timeline.busy_us == 5.0 and timeline.idle_us == 0.0
    assert timeline.rows == [("K", 10.0, -5.0)]


# Nsight Compute's raw page as CSV, as `ncu --import R --csv --page raw --print-units base`
# prints it: its own lines first, a header, a row of units, one row per kernel.
NCU_RAW = '''==PROF== Connected to process 1
"ID","Process ID","Kernel Name","gpu__time_duration.sum","launch__grid_size","sm__warps_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
"","","","nsecond","","%","ratio","ratio","ratio"
"0","7","void fusedskip::(anonymous namespace)::tile_gemm_kernel<Math, true>(Params)","32,012","1024","23.5","11.25","4.5","0.75"
"1","7","split_sum_kernel","6300","528","80","0.5","",""
'''


def test_ncu_summary_reads_the_raw_csv(tmp_path):
    """One line per kernel: the duration in µs from the units row, thousands separators read, the
    largest stall reasons first, what is missing as '-'."""
    spec = importlib.util.spec_from_file_location("ncu_summary",
                                                  ROOT / "benchmarks" / "ncu_summary.py")
    ncu_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ncu_summary)
    path = tmp_path / "raw.csv"
    path.write_text(NCU_RAW)
    rows = ncu_summary.read_rows(str(path))
    assert [row["ID"] for row in rows] == ["0", "1"]
    lines = ncu_summary.summary_lines(rows)
    assert len(lines) == 4
    first = [cell.strip() for cell in lines[2].strip("|").split("|")]
    titles = [title for title, _, _ in ncu_summary.COLUMNS]
    assert first[0] == "`fusedskip::tile_gemm_kernel<Math, true>(Params)`"
    assert first[1 + titles.index("µs")] == "32.0"
    assert first[1 + titles.index("blocks")] == "1,024"
    assert first[1 + titles.index("occupancy % (of possible)")] == "24"
    assert first[1 + titles.index("regs")] == "-"
    assert first[-1] == "long_scoreboard 11.2, barrier 4.5, wait 0.8"
    second = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert second[1 + titles.index("µs")] == "6.3"
    assert second[-1] == "long_scoreboard 0.5"


def test_gpu_profile_runs_each_case_and_summarises(tmp_path):
    """scripts/gpu_profile.sh with a stand-in ncu: a report and a CSV per case, and the summary of
    them all."""
    fake = tmp_path / "ncu"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [[ "$1" == --import ]]; then cat "$NCU_RAW_FILE"; exit 0; fi\n'
                    'while [[ $# -gt 0 && "$1" != -o ]]; do shift; done\n'
                    'touch "$2.ncu-rep"\n')
    fake.chmod(0o755)
    raw = tmp_path / "raw.csv"
    raw.write_text(NCU_RAW)
    out = tmp_path / "profile"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_profile.sh")],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OUT=str(out), PYTHON=sys.executable,
                                     NCU=str(fake), NCU_RAW_FILE=str(raw)))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = sorted(p.name for p in out.glob("ncu-*.ncu-rep"))
    assert cases == ["ncu-concat2-65536x30x30.ncu-rep", "ncu-relu_add-4096x256x256.ncu-rep",
                     "ncu-relu_add-65536x30x30.ncu-rep"]
    summary = (out / "ncu-summary.md").read_text()
    assert summary.count("### ") == 3 and summary.count("tile_gemm_kernel") == 3
