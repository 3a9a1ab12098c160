"""The GPU scripts, checked where CI can: they parse, the GPU check refuses cleanly without a GPU,
and the source hash a prebuilt extension is matched by changes with every source and nothing
else (a GPU run must never test kernels other than the sources beside them)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
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
    """scripts/gpu_profile.sh with a stand-in ncu (and a python that says the extension's CUDA
    kernels are there): a report and a CSV per case, and the summary of them all."""
    out = tmp_path / "profile"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_profile.sh")],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OUT=str(out), PYTHON=str(_cuda_python(tmp_path)),
                                     **_fake_ncu(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = sorted(p.name for p in out.glob("ncu-*.ncu-rep"))
    assert cases == ["ncu-concat2-65536x30x30.ncu-rep", "ncu-relu_add-4096x256x256.ncu-rep",
                     "ncu-relu_add-65536x30x30.ncu-rep"]
    summary = (out / "ncu-summary.md").read_text()
    assert summary.count("### ") == 3 and summary.count("tile_gemm_kernel") == 3


def _cuda_python(tmp_path, bench=""):
    """A stand-in python for the GPU scripts: it says the extension's CUDA kernels are there (the
    scripts' check, fusedskip.bench.check_cuda_kernels), runs `bench` (bash) for
    `-m fusedskip.bench`, and is the real interpreter otherwise."""
    path = tmp_path / "cuda-python"
    path.write_text('#!/usr/bin/env bash\n'
                    'if [[ "$1" == -c && "$2" == *check_cuda_kernels* ]]; then\n'
                    '  echo "stand-in: CUDA kernels here"; exit 0\n'
                    'fi\n'
                    f'if [[ "$1 $2" == "-m fusedskip.bench" ]]; then\n{bench}\n  exit 0\nfi\n'
                    f'exec "{sys.executable}" "$@"\n')
    path.chmod(0o755)
    return path


def _fake_ncu(tmp_path):
    """A stand-in ncu: a report for each profile, the raw CSV for each import, and each command
    line logged to ncu.args."""
    fake = tmp_path / "ncu"
    fake.write_text('#!/usr/bin/env bash\n'
                    f'echo "$*" >> "{tmp_path}/ncu.args"\n'
                    'if [[ "$1" == --import ]]; then cat "$NCU_RAW_FILE"; exit 0; fi\n'
                    'while [[ $# -gt 0 && "$1" != -o ]]; do shift; done\n'
                    'touch "$2.ncu-rep"\n')
    fake.chmod(0o755)
    raw = tmp_path / "raw.csv"
    raw.write_text(NCU_RAW)
    return dict(NCU=str(fake), NCU_RAW_FILE=str(raw))


def _gpu_profile(out, env):
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_profile.sh")], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OUT=str(out), **env))


def test_gpu_profile_leaves_the_clocks_and_summarises_only_this_runs_cases(tmp_path):
    """ncu runs with --clock-control none (its default locks the clocks to base); an OUT used
    before, holding an older case's CSV and summary, gets a summary of this run's three cases
    only, however often it is run."""
    env = dict(_fake_ncu(tmp_path), PYTHON=str(_cuda_python(tmp_path)))
    out = tmp_path / "profile"
    out.mkdir()
    (out / "ncu-old-case.csv").write_text(NCU_RAW)
    (out / "ncu-summary.md").write_text("### an earlier run's table\n")
    for _ in range(2):
        result = _gpu_profile(out, env)
        assert result.returncode == 0, result.stdout + result.stderr
        summary = (out / "ncu-summary.md").read_text()
        assert summary.count("### ") == 3 and "old-case" not in summary
        assert "earlier run" not in summary
    profiled = [line for line in (tmp_path / "ncu.args").read_text().splitlines()
                if not line.startswith("--import")]
    assert len(profiled) == 6
    assert all(line.split()[:2] == ["--clock-control", "none"] for line in profiled)


def test_gpu_profile_with_its_budget_spent_says_so_and_exits_3(tmp_path):
    """No case runs: a message (in the summary too, which a session brings back) and the
    script's 'left out for time' status, not ncu_summary.py's traceback on an unmatched glob."""
    out = tmp_path / "profile"
    out.mkdir()
    (out / "ncu-summary.md").write_text("### an earlier run's table\n")
    result = _gpu_profile(out, dict(_fake_ncu(tmp_path), PYTHON=str(_cuda_python(tmp_path)),
                                    FUSEDSKIP_PROFILE_BUDGET_S="5"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "no case was profiled" in result.stdout
    assert "budget" in (out / "ncu-summary.md").read_text()
    assert not (tmp_path / "ncu.args").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_gpu_profile_without_the_extensions_cuda_kernels_refuses(tmp_path):
    out = tmp_path / "profile"
    result = _gpu_profile(out, dict(_fake_ncu(tmp_path), PYTHON=sys.executable))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cuda_available() is False" in result.stdout
    assert not (tmp_path / "ncu.args").exists()


def test_ncu_summary_replaces_its_out_file_and_names_a_missing_csv(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("ncu_summary",
                                                  ROOT / "benchmarks" / "ncu_summary.py")
    ncu_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ncu_summary)
    raw, out = tmp_path / "raw.csv", tmp_path / "summary.md"
    raw.write_text(NCU_RAW)
    for _ in range(2):
        assert ncu_summary.main([str(raw), "--out", str(out)]) == 0
    assert out.read_text().count("### ") == 1
    assert ncu_summary.main([str(tmp_path / "ncu-*.csv"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert out.read_text().count("### ") == 1


@pytest.mark.parametrize("op", ["relu_add", "concat2"])
def test_kernel_times_once_runs_the_forward_once(op, monkeypatch):
    """gpu_kernel_times.py's forward+backward step (what gpu_profile.sh runs under ncu with
    --once) calls the layer once, recording for backward: no extra forward to size the
    gradient, which ncu would profile too."""
    import fusedskip.bench as bench
    calls = []
    original = bench.fused_fn

    def counting(op):
        fn = original(op)

        def counted(*args):
            calls.append(torch.is_grad_enabled())
            return fn(*args)
        return counted

    monkeypatch.setattr(bench, "fused_fn", counting)
    case = bench.Case(op, 48, 32, 24, torch.float32, "cpu")
    run = _kernel_times_module().prepared_step(case, "fused", "forward+backward")
    run()
    assert calls == [True]


class _FakeConfigs:
    """fusedskip._cutlass_configs as cutlass_configs.py sees it, without a GPU."""

    def names(self):
        return ["bad", "bad-orders", "good"]

    def mask_layout_error(self, name):
        return ""


def test_cutlass_configs_exits_1_on_a_failed_check_and_times_only_what_passed(
        monkeypatch, capsys):
    """A configuration that fails its bit-exact check is neither timed nor passed over by the exit
    status; one that fails only under the tile-order check is not timed under tile orders."""
    spec = importlib.util.spec_from_file_location("cutlass_configs",
                                                  ROOT / "benchmarks" / "cutlass_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def check(configs, name, m, k, n, swizzle=1, raster="heuristic"):
        if name == "bad" or (name == "bad-orders" and swizzle == 8):
            return "output differs from the cuBLAS path's"
        return ""

    def rows(names, m, k, n):
        return [{"size": f"{m}x{k}x{n}", "provider": f"{name}: fused relu_add",
                 "queued_us": 1.0, "kernels_us": 1.0 + i, "vs_ref": 1.0, "tflops": 1.0}
                for i, name in enumerate(names)]

    timed, ordered = [], []

    def measure(configs, names, m, k, n, calls, rounds):
        timed.append(list(names))
        return rows(names, m, k, n)

    def measure_orders(configs, names, m, k, n, calls, rounds):
        ordered.append(list(names))
        return rows(names, m, k, n)

    monkeypatch.setattr(module, "load", _FakeConfigs)
    monkeypatch.setattr(module, "check", check)
    monkeypatch.setattr(module, "measure", measure)
    monkeypatch.setattr(module, "measure_orders", measure_orders)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(sys, "argv", ["cutlass_configs.py", "--sizes", "256x64x128"])
    assert module.main() == 1
    assert timed == [["bad-orders", "good"]]
    assert ordered == [["good"]]
    captured = capsys.readouterr()
    assert "bad: output differs" in captured.err and "bad-orders at swizzle 8" in captured.err

    monkeypatch.setattr(module, "check", lambda *args, **kwargs: "")
    timed.clear()
    ordered.clear()
    assert module.main() == 0
    assert timed == [["bad", "bad-orders", "good"]] and ordered == [["bad", "bad-orders"]]


def _gpu_tune(tmp_path, bench="", **env):
    python = _cuda_python(tmp_path, 'echo "$*" >> "$BENCH_LOG"\n' + bench)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_tune.sh")], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, OUT=str(tmp_path / "tune-out"), PYTHON=str(python),
                                   BENCH_LOG=str(tmp_path / "bench.log"), **env))


# A stand-in bench's rows for the tuning sweep: written to the folder after --out.
TUNE_ROWS = r'''
  while [[ $# -gt 0 && "$1" != --out ]]; do shift; done
  if [[ "$2" == */tune ]]; then
    mkdir -p "$2"
    for p in fused-native fused-gemm_epilogue; do
      echo '{"status": "ok", "op": "relu_add", "mode": "forward", "M": 64, "K": [32],' \
        '"N": 32, "provider": "'$p'", "p50_us": 10.0}' >> "$2/rows.jsonl"
    done
  fi'''


def test_gpu_tune_default_fits_one_call_on_the_gpu_and_ends_with_the_table(tmp_path):
    """`bash scripts/gpu_tune.sh` as its header's first line runs it: every step's limit (and
    timeout's grace after it) within one 10-minute call, each on the GPU (--device cuda), the
    tuning table last."""
    result = _gpu_tune(tmp_path, TUNE_ROWS)
    assert result.returncode == 0, result.stdout + result.stderr
    limits = [int(word.rstrip("s)")) for line in result.stdout.splitlines()
              if line.startswith("=== ") for word in line.split() if word.endswith("s)")]
    assert limits and sum(limit + 10 for limit in limits) <= 600
    runs = (tmp_path / "bench.log").read_text().splitlines()
    assert len(runs) == len(limits)
    assert all("--device cuda" in run for run in runs)
    assert result.stdout.strip().splitlines()[-1].startswith("| relu_add | forward | 64x32x32")


def test_gpu_tune_table_is_of_this_runs_rows_only(tmp_path):
    """A bench that dies before writing its rows: a message and a failed status, not a traceback,
    nor an earlier run's rows shown as this run's."""
    old = tmp_path / "tune-out" / "tune"
    old.mkdir(parents=True)
    (old / "rows.jsonl").write_text('{"status": "ok", "op": "earlier-run", "mode": "forward", '
                                    '"M": 1, "K": [1], "N": 1, "provider": "fused-native", '
                                    '"p50_us": 1.0}\n')
    result = _gpu_tune(tmp_path, SWEEPS="tune")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "earlier-run" not in result.stdout
    assert "wrote no rows" in result.stdout


def test_gpu_tune_steps_left_out_by_the_budget(tmp_path):
    result = _gpu_tune(tmp_path, SWEEPS="standard autotune tune", FUSEDSKIP_TUNE_BUDGET_S="30")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.count("not run") == 3
    assert not (tmp_path / "bench.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_gpu_tune_without_the_extensions_cuda_kernels_refuses(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_tune.sh")], capture_output=True,
                            text=True, timeout=120,
                            env=dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cuda_available() is False" in result.stdout
    assert not any((tmp_path / "out").glob("*.log"))


def _device_build_checkout(tmp_path):
    """A checkout for scripts/build_for_device.sh (this one's script, committed), a WORK whose
    venv is a stand-in (its torch a module that only names a version; its pip logs; its
    `setup.py build_ext` drops this Python's module and an older build's for another Python in
    the worktree, both copies of an ELF file that strip takes), and the script's environment."""
    repo, work = tmp_path / "repo", tmp_path / "work"
    for folder in ("scripts", "csrc", "fusedskip", "benchmarks/cutlass_configs"):
        (repo / folder).mkdir(parents=True)
    for name in ("build_for_device.sh", "source_stamp.sh"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts")
    (repo / "setup.py").write_text("setup()\n")
    (repo / "csrc" / "ops.cpp").write_text("// source\n")
    (repo / "benchmarks" / "cutlass_configs" / "bindings.cpp").write_text("// source\n")
    (repo / "fusedskip" / "__init__.py").write_text("")
    (repo / "requirements.txt").write_text("")
    (repo / ".gitignore").write_text("*.so\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git[:3] + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "sources"], check=True)
    fake_torch = tmp_path / "fake-torch"
    (fake_torch / "torch").mkdir(parents=True)
    (fake_torch / "torch" / "__init__.py").write_text(
        '__version__ = "2.14.1+cu130"\n\n\nclass version:\n    cuda = "13.0"\n')
    (work / "venv" / "bin").mkdir(parents=True)
    python = work / "venv" / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\n'
                      'if [[ "${1:-}" == setup.py ]]; then\n'
                      f'  echo "$PWD" >> "{tmp_path}/builds"\n'
                      f'  cp "{shutil.which("true")}" "fusedskip/_C$SUFFIX"\n'
                      f'  cp "{shutil.which("true")}" fusedskip/_C.cpython-39-x86_64-linux-gnu.so\n'
                      '  exit 0\n'
                      'fi\n'
                      f'PYTHONPATH="{fake_torch}" exec "{sys.executable}" "$@"\n')
    pip = work / "venv" / "bin" / "pip"
    pip.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{tmp_path}/pip.log"\n')
    python.chmod(0o755)
    pip.chmod(0o755)
    suffix = subprocess.run([sys.executable, "-c", "import sysconfig; "
                             "print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, DEVICE_PYTHON=sys.executable, DEVICE_TORCH="2.14.*", WORK=str(work),
               SUFFIX=suffix, FUSEDSKIP_CUTLASS_CONFIGS="0", MAX_JOBS="1")
    return repo, work, suffix, env


def _build_for_device(repo, env):
    return subprocess.run(["bash", str(repo / "scripts" / "build_for_device.sh")],
                          capture_output=True, text=True, timeout=120, env=env)


def test_build_for_device_names_a_missing_python(tmp_path):
    repo, _, _, env = _device_build_checkout(tmp_path)
    result = _build_for_device(repo, dict(env, DEVICE_PYTHON="python3.99",
                                          HOME=str(tmp_path / "home")))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no python3.99 here (set DEVICE_PYTHON)" in result.stderr


def test_build_for_device_refuses_a_venv_of_another_python_or_torch(tmp_path):
    repo, work, _, env = _device_build_checkout(tmp_path)
    result = _build_for_device(repo, dict(env, DEVICE_TORCH="2.11.*"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds torch 2.14.1+cu130, not a CUDA build of 2.11.*" in result.stderr
    assert "torch==2.11.*" in (tmp_path / "pip.log").read_text()  # it tried to put that one in
    assert not (tmp_path / "builds").exists()

    (work / "venv" / "bin" / "python").write_text('#!/usr/bin/env bash\necho 2.7\n')
    result = _build_for_device(repo, env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is Python 2.7, not" in result.stderr
    assert not (tmp_path / "builds").exists()


@pytest.mark.skipif(shutil.which("strip") is None or shutil.which("true") is None,
                    reason="needs binutils' strip and an ELF true")
def test_build_for_device_copies_its_own_build_and_keeps_the_checkouts(tmp_path):
    """Only this build's module lands in fusedskip/ (not an older build's for another Python in
    the worktree); a second run replaces what the first put there; a build the script did not
    make under that name (the checkout's own) stops it before it builds, and stays."""
    repo, work, suffix, env = _device_build_checkout(tmp_path)
    for _ in range(2):
        result = _build_for_device(repo, env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(p.name for p in (repo / "fusedskip").glob("*.so")) == [f"_C{suffix}"]
    assert len((tmp_path / "builds").read_text().splitlines()) == 2

    own = repo / "fusedskip" / f"_C{suffix}"
    own.write_bytes(b"the checkout's own build")
    result = _build_for_device(repo, env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"fusedskip/_C{suffix} is not a build this script made" in result.stderr
    assert own.read_bytes() == b"the checkout's own build"
    assert len((tmp_path / "builds").read_text().splitlines()) == 2


def _gpu_check_python(tmp_path, kernels_run=True, cases=""):
    """A stand-in python for gpu_check.sh: torch 'sees' an sm_80 GPU, setup.py 'builds' (saying
    "stand-in build"), the load check passes where kernels_run, `cases` (bash case arms) come
    first; the real interpreter otherwise."""
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'case "${1:-} ${2:-}" in\n'
        + cases +
        '  *"torch.cuda.is_available() else 1"*) exit 0 ;;\n'
        '  *"print(torch.cuda.get_device_capability())"*) echo "(8, 0)"; exit 0 ;;\n'
        + ('  *check_cuda_kernels*) echo "loads: stand-in"; exit 0 ;;\n' if kernels_run else "")
        + '  "setup.py "*) echo "stand-in build"; exit 0 ;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


@pytest.mark.skipif(torch.cuda.is_available(), reason="stands in a GPU for torch's own checks")
def test_gpu_check_ends_at_a_build_that_cannot_run_and_reports_only_this_run(tmp_path):
    """A source build that exits 0 but leaves no CUDA kernels that run (a CPU-only fallback) ends
    the run, as a prebuilt one that does not load does: the benches would time on the CPU. An
    earlier run's logs and rows in the same OUT stay out of the summary; ARCHIVE gets it all."""
    python = _gpu_check_python(tmp_path, kernels_run=False)
    out = tmp_path / "check"
    (out / "large").mkdir(parents=True)
    (out / "cuda_tests.log").write_text("=== 2 passed in 1.00s ===\n")
    (out / "large" / "rows.jsonl").write_text('{"status": "ok"}\n')
    archive = tmp_path / "few" / "check.tgz"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OUT=str(out), PYTHON=str(python),
                                     ARCHIVE=str(archive)))
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (out / "summary.md").read_text()
    assert "| build | rc=1 " in summary and "| cuda_tests | not run |" in summary
    assert "passed" not in summary and "rows.jsonl" not in summary
    assert "stand-in build" in (out / "build.log").read_text()
    assert "CUDA kernels:" in (out / "build.log").read_text()  # the load check said why
    with tarfile.open(archive) as tar:
        assert {"check/summary.md", "check/build.log"} <= set(tar.getnames())


@pytest.mark.skipif(torch.cuda.is_available(), reason="stands in a GPU for torch's own checks")
def test_gpu_check_fails_a_run_whose_bench_rows_fail_by_the_benchs_rule(tmp_path):
    """A bench step's exit status does not reach the check where a time limit stops it
    (timeout's 124), so the check judges the rows themselves, by the bench's rule: here a fused
    row that raised fails the run though the step's status was 0."""
    python = _gpu_check_python(tmp_path, cases=(
        '  "-m fusedskip.bench")\n'
        '    while [[ $# -gt 0 && "$1" != --out ]]; do shift; done\n'
        '    mkdir -p "$2"\n'
        "    echo '{\"provider\": \"fused\", \"op\": \"relu_add\", \"status\": \"error: "
        "RuntimeError: CUDA error: an illegal memory access\"}' > \"$2/rows.jsonl\"\n"
        "    exit 0 ;;\n"))
    out = tmp_path / "check"
    skip = ("cuda_tests_cutlass,cuda_tests,racecheck_cutlass,racecheck,memcheck,kernel_times,"
            "bench_large,cutlass_configs,bench_compile")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OUT=str(out), PYTHON=str(python),
                                     FUSEDSKIP_CHECK_SKIP=skip))
    summary = (out / "summary.md").read_text()
    assert "| bench | rc=0 " in summary, result.stdout + result.stderr
    assert "rows.jsonl: 0 timed, 1 failed, 0 not timed" in summary
    assert "illegal memory access" in summary
    assert result.returncode == 1, result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="stands in a GPU for torch's own checks")
def test_gpu_session_reads_a_profile_left_out_as_left_out_not_failed(tmp_path):
    """The check passes (a stand-in build, every other step skipped) and the profile finds no
    ncu (its 2, as its 3 for a budget spent): the session's status is 3, all that ran passed,
    not 1; the check's archive is among the files it leaves."""
    python = _gpu_check_python(tmp_path)
    out = tmp_path / "few-files"
    steps = ("cuda_tests_cutlass,cuda_tests,racecheck_cutlass,racecheck,memcheck,kernel_times,"
             "bench_large,cutlass_configs,bench_compile,bench")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"),
                                     PYTHON=str(python), FUSEDSKIP_CHECK_SKIP=steps,
                                     NCU=str(tmp_path / "no-ncu-here")))
    assert "| build | rc=0 " in (out / "check-summary.md").read_text()
    assert "no ncu here" in (out / "profile.out").read_text()
    assert result.returncode == 3, result.stdout + result.stderr
    with tarfile.open(out / "check.tgz") as tar:
        assert "check/summary.md" in tar.getnames()
