"""The benchmark: counting, and a --quick run of the CLI on CPU (rows, correctness, plots)."""

import json
import os
import re
import signal

import pytest
import torch

from conftest import REL_TOL
from fusedskip import bench


def quick_rows(out, *argv, code=0):
    """A --quick CPU run of the CLI into `out`: its exit code checked, its rows."""
    assert bench.main(["--quick", "--device", "cpu", *argv, "--out", str(out)]) == code
    return bench.read_jsonl(str(out / "rows.jsonl"))


def test_flop_counting():
    assert bench.count_flops(64, 10, 20, "forward") == 2 * 64 * 10 * 20
    assert bench.count_flops(64, 10, 20, "no_grad") == 2 * 64 * 10 * 20
    assert bench.count_flops(64, 10, 20, "forward+backward") == 3 * 2 * 64 * 10 * 20


def test_byte_counting():
    m, k, n, e = 64, 10, 20, 2
    forward = (m * k + n * k + n + m * n) * e  # x, W, b read; y written
    assert bench.count_bytes(m, k, n, "forward", e) == forward
    assert bench.count_bytes(m, k, n, "forward", e, residual=True) == forward + m * n * e
    assert bench.count_bytes(m, k, n, "forward", e, bias=False) == forward - n * e
    # backward: dy, x, W read; dx, dW, db written
    backward = (m * n + m * k + n * k + m * k + n * k + n) * e
    assert bench.count_bytes(m, k, n, "forward+backward", e) == forward + backward


def test_quantiles_and_widths():
    assert bench.quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.8, 3.0, 4.2)
    for k, parts in ((10, 2), (1024, 4), (7, 4), (30, 1)):
        widths = bench.split_widths(k, parts)
        assert len(widths) == parts and sum(widths) == k and min(widths) >= 1
        assert parts == 1 or len(set(widths)) > 1  # unequal widths
    assert bench.split_widths(1024, 4) == (96, 200, 304, 424)  # whole 16-byte words
    assert bench.split_widths(4096, 2) == (1360, 2736)
    assert bench.split_widths(30, 2) == (10, 20)


def test_sizes_option():
    assert bench.parse_sizes("64x10x10,8192x4096x4096") == [(64, 10, 10), (8192, 4096, 4096)]
    with pytest.raises(SystemExit):
        bench.parse_sizes("64x10")


def test_append_markdown_keeps_earlier_runs(tmp_path):
    """The benchmark scripts append each run with the environment it ran in."""
    first = bench.append_markdown(str(tmp_path), "times", "Run one", "| a |", device="cpu")
    second = bench.append_markdown(str(tmp_path), "times", "Run two", "| b |", device="cpu")
    assert first == second and os.path.basename(first).startswith("times-")
    text = open(first).read()
    assert (text.index("# Run one") < text.index("| a |") < text.index("# Run two")
            < text.index("| b |"))
    assert text.count("'commit'") == 2 and torch.__version__ in text


def test_quick_run_on_cpu(tmp_path):
    out = tmp_path / "results"
    assert bench.main(["--quick", "--device", "cpu", "--model", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"fused", "eager", "compile"}
    assert {r["op"] for r in rows} == {"relu_add", "concat2"}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["rel_err"] <= REL_TOL[torch.float32]  # the tests' bound; bench's is wider
        assert 0 < row["p20_us"] <= row["p50_us"] <= row["p80_us"]
        assert row["tflops"] > 0 and row["gbps"] > 0 and row["roofline_fraction"] > 0
        assert row["speedup_vs_eager"] > 0
        for key in ("device_name", "torch", "commit", "date"):
            assert row[key]
        for key in ("extension_loaded", "extension_cuda_kernels", "cutlass_built"):
            assert isinstance(row[key], bool), key  # which build ran
    eager = [r for r in rows if r["provider"] == "eager"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)
    for name in ("rows.csv", "table.md", "speedup.png", "models.jsonl", "models.png"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(os.listdir(out)) == sorted(bench.OUTPUTS)  # what a later run replaces
    # --plot redraws from the saved rows
    os.remove(out / "speedup.png")
    assert bench.main(["--plot", str(out)]) == 0
    assert (out / "speedup.png").stat().st_size > 0


def test_cutlass_row_says_when_its_kernel_does_not_apply(tmp_path):
    """fused-cutlass on a CPU (or a shape its kernel leaves to cuBLAS) is not timed under its
    name."""
    out = tmp_path / "results"
    assert bench.main(["--quick", "--device", "cpu", "--providers", "fused-cutlass,eager",
                       "--op", "relu_add", "--mode", "forward", "--sizes", "64x16x128",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    cutlass = [r for r in rows if r["provider"] == "fused-cutlass"]
    assert len(cutlass) == 1 and cutlass[0]["status"].startswith("n/a")
    assert "p50_us" not in cutlass[0]
    assert [r["status"] for r in rows if r["provider"] == "eager"] == ["ok"]


def test_mismatch_is_reported_not_timed(tmp_path, monkeypatch):
    """A provider that returns a wrong answer gets a 'mismatch' row without timings, and the
    run fails."""
    real = bench.fused_fn

    def wrong(op):
        fn = real(op)
        return lambda *args: fn(*args) * 1.5

    monkeypatch.setattr(bench, "fused_fn", wrong)
    out = tmp_path / "results"
    code = bench.main(["--quick", "--device", "cpu", "--providers", "fused,eager",
                       "--op", "relu_add", "--mode", "forward", "--sizes", "64x10x10",
                       "--out", str(out)])
    assert code == 1
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    fused = [r for r in rows if r["provider"] == "fused"]
    assert fused and fused[0]["status"].startswith("mismatch") and "p50_us" not in fused[0]


def test_compile_failure_is_recorded_not_fatal(tmp_path, monkeypatch):
    """Where torch.compile cannot build (no compiler, no Python headers), its rows and its model
    rows say why, and the other providers are still timed."""
    class Broken(torch.nn.Module):  # what torch.compile returns, failing at its first call
        def __init__(self, original):
            super().__init__()
            self.original = original if isinstance(original, torch.nn.Module) else None

        def forward(self, *args, **kwargs):
            raise RuntimeError("no C++ compiler")

    def broken_compile(model, **kwargs):
        return Broken(model)

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(bench, "_compiled", {})
    out = tmp_path / "results"
    code = bench.main(["--quick", "--device", "cpu", "--model", "--op", "relu_add",
                       "--mode", "forward", "--sizes", "64x10x10", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    models = [json.loads(line) for line in (out / "models.jsonl").read_text().splitlines()]
    for group in (rows, models):
        compiled = [r for r in group if r["provider"] == "compile"]
        others = [r for r in group if r["provider"] != "compile"]
        assert compiled and all("no C++ compiler" in r["status"] for r in compiled)
        assert others and all(r["status"] == "ok" and r["p50_us"] > 0 for r in others)
    assert "no C++ compiler" in (out / "table.md").read_text()


def test_cublaslt_runs_where_it_can(tmp_path):
    """torch._addmm_activation has no derivative: the cublaslt provider is timed under no_grad
    and left out of the modes that record a graph, which used to abort the whole run."""
    out = tmp_path / "results"
    assert bench.main(["--quick", "--device", "cpu", "--providers", "cublaslt,eager",
                       "--op", "relu_add", "--mode", "forward,forward+backward,no_grad",
                       "--sizes", "16x8x8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["status"]) for r in rows if r["provider"] == "cublaslt"] == [
        ("no_grad", "ok")]
    assert sorted(r["mode"] for r in rows if r["provider"] == "eager") == [
        "forward", "forward+backward", "no_grad"]


def test_a_provider_failing_while_timed_costs_its_row_only(tmp_path, monkeypatch):
    """The others are still timed; the fused op failing fails the run."""
    real = bench.fused_fn

    def fails_with_grad(op):
        fn = real(op)

        def run(xs, w, b, r):
            if torch.is_grad_enabled() and w.requires_grad:
                raise RuntimeError("no derivative")
            return fn(xs, w, b, r)
        return run

    monkeypatch.setattr(bench, "fused_fn", fails_with_grad)
    rows = quick_rows(tmp_path / "results", "--providers", "fused,eager", "--op", "relu_add",
                      "--mode", "forward", "--sizes", "16x8x8", code=1)
    status = {r["provider"]: r["status"] for r in rows}
    assert "no derivative" in status["fused"] and status["eager"] == "ok"


def test_eager_is_the_plain_composition(monkeypatch):
    """The baseline is what a user writes: ATen ops, none of fusedskip's own checks."""
    import fusedskip

    def refuse(*args, **kwargs):
        raise AssertionError("the eager baseline went through fusedskip's argument checks")

    monkeypatch.setattr(fusedskip.reference, "check_args", refuse)
    for op in bench.OPS:
        case = bench.Case(op, 5, 6, 4, torch.float64, "cpu")
        xs, w, b, r = case.make_inputs(requires_grad=False)
        x = torch.cat(xs, -1)
        pre = x @ w.T + b
        count, relu, order = bench.OPS[op]
        expected = (torch.relu(pre + r) if order == "add_relu" else
                    torch.relu(pre) + r if order == "relu_add" else
                    torch.relu(pre) if relu else pre)
        torch.testing.assert_close(bench.eager_fn(op)(xs, w, b, r), expected)


def test_unknown_dtype_is_named():
    with pytest.raises(SystemExit, match="--dtype: unknown.*float8.*choose from"):
        bench.main(["--quick", "--device", "cpu", "--dtype", "float8", "--out", "/nonexistent"])


def test_without_matplotlib_the_rows_and_table_still_come(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "results"
    assert bench.main(["--quick", "--device", "cpu", "--providers", "fused,eager", "--op",
                       "relu_add", "--mode", "forward", "--sizes", "16x8x8",
                       "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err and "| relu_add |" in captured.out
    assert (out / "table.md").stat().st_size > 0 and not (out / "speedup.png").exists()


def test_command_line_mistakes_are_named(tmp_path):
    with pytest.raises(SystemExit, match="M, K and N must be positive, got '8x0x8'"):
        bench.parse_sizes("64x10x10,8x0x8")
    with pytest.raises(SystemExit, match="--plot: no rows.jsonl"):
        bench.main(["--plot", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):  # argparse: an unknown device
        bench.main(["--device", "meta"])
    with pytest.raises(SystemExit, match="nothing to time: .*cublaslt runs under --mode no_grad"):
        bench.main(["--device", "cpu", "--providers", "cublaslt", "--op", "relu_add",
                    "--mode", "forward", "--sizes", "8x8x8", "--out", str(tmp_path)])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="--out: .*a_file' exists and is not a folder"):
        bench.main(["--quick", "--device", "cpu", "--out", str(a_file)])


def test_a_size_the_device_cannot_hold_costs_its_rows_only(tmp_path):
    """Inputs that cannot be allocated are that case's rows' status, not the end of the sweep;
    and a row with no eager row to compare with shows no speed-up."""
    out = tmp_path / "results"
    huge = "99999999999x99999999x999999999"  # more elements than a tensor can have
    assert bench.main(["--quick", "--device", "cpu", "--providers", "fused", "--op", "relu_add",
                       "--mode", "forward", "--sizes", f"{huge},8x8x8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["M"] for r in rows] == [99999999999, 8]
    assert rows[0]["status"].startswith("error: inputs: RuntimeError")
    assert rows[1]["status"] == "ok" and "speedup_vs_eager" not in rows[1]
    table = (out / "table.md").read_text()
    assert "| fused | " in table and "| – |" in table and "nan" not in table


def test_each_row_is_compared_with_eager_on_its_own_case(tmp_path):
    """Two sizes with the same M and N but different K: each row's speedup is against the eager
    row of its own size, not the other's."""
    out = tmp_path / "results"
    assert bench.main(["--quick", "--device", "cpu", "--providers", "fused,eager",
                       "--op", "relu_add", "--mode", "forward", "--sizes", "64x10x10,64x400x10",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert sorted(r["K"] for r in rows) == [[10], [10], [400], [400]]
    for k in ([10], [400]):
        eager, = [r for r in rows if r["K"] == k and r["provider"] == "eager"]
        fused, = [r for r in rows if r["K"] == k and r["provider"] == "fused"]
        assert eager["speedup_vs_eager"] == 1.0
        assert fused["speedup_vs_eager"] == pytest.approx(eager["p50_us"] / fused["p50_us"])


def test_model_steps_follow_providers(tmp_path):
    """--model times the providers --providers names, of the three the models come in."""
    out = tmp_path / "results"
    assert bench.main(["--quick", "--device", "cpu", "--model", "--providers", "fused,eager",
                       "--op", "relu_add", "--mode", "forward", "--sizes", "64x10x10",
                       "--out", str(out)]) == 0
    models = [json.loads(line) for line in (out / "models.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in models} == {"fused", "eager"}
    assert all(r["status"] == "ok" for r in models)


def test_a_wrong_gradient_is_a_mismatch(tmp_path, monkeypatch):
    """forward+backward rows time the gradients, so those are checked too: a provider whose
    output is right and whose gradient is not is not timed."""
    real = bench.fused_fn

    def wrong_gradient(op):
        fn = real(op)

        def layer(*args):
            out = fn(*args)
            return out + (out * 0.5 - (out * 0.5).detach())  # the same values, 1.5x the gradient
        return layer

    monkeypatch.setattr(bench, "fused_fn", wrong_gradient)
    rows = quick_rows(tmp_path / "results", "--providers", "fused,eager", "--op", "relu_add",
                      "--mode", "forward,forward+backward", "--sizes", "32x8x8", code=1)
    fused = {r["mode"]: r for r in rows if r["provider"] == "fused"}
    assert fused["forward"]["status"] == "ok"
    assert fused["forward+backward"]["status"].startswith("mismatch")


@pytest.mark.parametrize("how", ["ctrl-c", "term"])
def test_an_interrupted_sweep_keeps_the_cases_it_finished(tmp_path, monkeypatch, capsys, how):
    """Ctrl-C, or the TERM of `timeout` (scripts/gpu_check.sh's steps), at the second case."""
    real = bench.time_case
    calls = []

    def interrupted_at_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if how == "term":  # bench's handler turns it into KeyboardInterrupt right here
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "time_case", interrupted_at_the_second_case)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "results"
    rows = quick_rows(out, "--providers", "fused,eager", "--op", "relu_add", "--mode", "forward",
                      "--sizes", "16x8x8,32x8x8", code=130)
    assert [(r["M"], r["status"]) for r in rows] == [(16, "ok"), (16, "ok")]
    assert "interrupted" in (out / "table.md").read_text()
    assert "interrupted at" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def test_arguments_are_checked_before_anything_runs(tmp_path, monkeypatch):
    """A folder that cannot be made, an empty --out or --dtype, a size too narrow for a concat:
    refused before the sweep (which would lose its rows at the end), and nothing timed."""
    monkeypatch.setattr(bench, "run_sweep", lambda *args: pytest.fail("the sweep ran"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in (
            (["--out", str(a_file / "sub")], "--out: cannot create"),
            (["--out", ""], "--out: empty"),
            (["--dtype", "", "--out", str(tmp_path / "x")], "--dtype: unknown"),
            (["--op", "concat4", "--sizes", "64x2x10", "--out", str(tmp_path / "x")],
             r"--sizes: concat4 concatenates 4 inputs, so K must be at least 4; got \['64x2x10'\]"),
    ):
        with pytest.raises(SystemExit, match=message):
            bench.main(["--quick", "--device", "cpu", *argv])
    assert not (tmp_path / "x").exists()


def test_plots_say_what_they_drew(tmp_path):
    """One panel per op, mode and dtype (two dtypes are never one line), and only the files
    really written are named; --plot on a damaged rows.jsonl names the line."""
    out = tmp_path / "results"
    rows = quick_rows(out, "--providers", "fused,eager", "--op", "relu_add", "--mode", "forward",
                      "--sizes", "16x8x8", "--dtype", "float32,float64")
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    pytest.importorskip("matplotlib")
    assert bench.plot(rows, str(tmp_path / "speedup.png")) == ["speedup.png"]
    assert bench.plot([], str(tmp_path / "none.png")) == []
    assert not (tmp_path / "none.png").exists()
    (out / "rows.jsonl").write_text((out / "rows.jsonl").read_text()[:-40])
    with pytest.raises(SystemExit, match="rows.jsonl, line 4: not a row"):
        bench.main(["--plot", str(out)])


def test_half_precision_gradients_are_not_mismatches(tmp_path):
    """Eager's bfloat16 add_relu rounds x W^T + b before adding r, so its ReLU takes the other
    side of a few pre-activations within rounding of zero, each a whole term in the gradients:
    no gradient is checked from there, and both providers are timed."""
    rows = quick_rows(tmp_path / "results", "--dtype", "bfloat16", "--op", "add_relu", "--mode",
                      "forward+backward", "--sizes", "1024x30x30", "--providers", "fused,eager")
    assert [(r["provider"], r["status"]) for r in rows] == [("fused", "ok"), ("eager", "ok")]
    assert all(r["rel_err"] < 1e-2 for r in rows)


def test_providers_are_timed_in_turns_and_a_failing_one_sits_out(monkeypatch):
    """A slow stretch of the machine must fall on every provider of a case alike: their calls
    alternate, round by round; one whose calls raise keeps its error and drops out, the others
    go on."""
    calls = []

    def fake_time_cpu(steps, min_run_time):
        calls.append(steps[0]())
        return [float(len(calls))]

    def failing_from_round_two():
        if calls.count("b") >= 1:
            raise RuntimeError("no derivative")
        return "b"

    monkeypatch.setattr(bench, "time_cpu", fake_time_cpu)
    a, b, c = bench.time_interleaved("cpu", [("a", [lambda: "a"]), ("b", [failing_from_round_two]),
                                             ("c", [lambda: "c"])], 200, 0.5)
    rounds = bench.TIMING_ROUNDS
    assert rounds > 1
    assert calls == ["a", "b", "c"] + ["a", "c"] * (rounds - 1)
    assert a.per_call == [1.0, 4.0] + [float(6 + 2 * i) for i in range(rounds - 2)]  # call numbers
    assert b == "error: RuntimeError: no derivative"
    assert len(c.per_call) == rounds
    assert a.queued == c.queued == []  # on a CPU the calls are back to back already


def test_on_a_gpu_each_round_also_times_calls_queued_back_to_back(monkeypatch):
    """Each round times its calls one by one (each waited for), then as many queued back to
    back, through the input sets in turn; the queued time is one value per round."""
    calls = []
    steps = [lambda i=i: calls.append(i) for i in range(3)]

    def fake_time_cuda(steps, repeats, warm_up=True, first=0):
        return [float(first + i) for i in range(repeats)]

    def fake_time_queued_us(fn, calls_wanted, device="cuda"):
        for _ in range(calls_wanted):
            fn()
        return 100.0 + len(calls)

    monkeypatch.setattr(bench, "time_cuda", fake_time_cuda)
    monkeypatch.setattr(bench, "time_queued_us", fake_time_queued_us)
    timings, = bench.time_interleaved("cuda", [("fused", steps)], 10, 0.5)
    rounds = bench.TIMING_ROUNDS
    per_round = 10 // rounds
    assert timings.per_call == [float(i) for i in range(rounds * per_round)]
    assert calls == [i % 3 for i in range(rounds * per_round)]  # input sets rotate on
    assert timings.queued == [100.0 + per_round * (r + 1) for r in range(rounds)]


def test_the_table_shows_both_measures_where_there_are_both():
    row = {"op": "relu_add", "mode": "forward", "dtype": "bfloat16", "M": 64, "K": [10], "N": 10,
           "status": "ok", "p20_us": 20.0, "p50_us": 23.1, "p80_us": 24.6, "tflops": 0.001,
           "gbps": 0.2, "roofline_fraction": 0.0001}
    gpu = dict(row, provider="fused", speedup_vs_eager=2.04, queued_us=9.87,
               queued_speedup_vs_eager=2.5)
    cpu = dict(row, provider="fused", speedup_vs_eager=1.5)
    header, _, gpu_line, cpu_line = bench.markdown_table([gpu, cpu]).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    gpu_cells = dict(zip(columns, [c.strip() for c in gpu_line.strip("|").split("|")]))
    cpu_cells = dict(zip(columns, [c.strip() for c in cpu_line.strip("|").split("|")]))
    assert (gpu_cells["vs eager"], gpu_cells["queued µs"], gpu_cells["vs eager, queued"]) == (
        "2.04", "9.9", "2.50")
    assert (cpu_cells["vs eager"], cpu_cells["queued µs"], cpu_cells["vs eager, queued"]) == (
        "1.50", "–", "–")
    assert len(gpu_cells) == len(columns) == len(cpu_line.strip("|").split("|"))


def test_a_provider_named_twice_gets_two_rows_of_its_own(tmp_path, monkeypatch):
    """Each entry of --providers is its own row, timed on its own, even under the same name."""
    times = iter(range(1, 1000))
    monkeypatch.setattr(bench, "time_cpu", lambda steps, min_run_time: [float(next(times))])
    rows = quick_rows(tmp_path / "results", "--providers", "fused,eager,fused", "--op",
                      "relu_add", "--mode", "forward", "--sizes", "16x8x8")
    fused = [r["p50_us"] for r in rows if r["provider"] == "fused"]
    assert len(fused) == 2 and fused[0] != fused[1]


def test_the_gemm_alone_times_no_cat():
    """The GEMM alone's timed calls get a concat op's inputs concatenated beforehand: its floor
    is the matmul, not a copy of the input as well."""
    from torch.overrides import TorchFunctionMode

    class CountCats(TorchFunctionMode):
        cats = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountCats.cats += func in (torch.cat, torch.concat, torch.concatenate)
            return func(*args, **(kwargs or {}))

    case = bench.Case("concat4", 16, 40, 8, torch.float32, "cpu")
    arg_sets = [case.make_inputs(requires_grad=True, seed=0)]
    row = {}
    steps = bench.prepare(case, "gemm", bench.gemm_fn("concat4"), "forward", arg_sets, None, row)
    assert row["rel_err"] <= bench.TOLERANCE[torch.float32]
    with CountCats():
        steps[0]()
    assert CountCats.cats == 0


def test_forward_mode_checks_the_recording_path(tmp_path, monkeypatch):
    """In forward mode the check runs what is timed: autograd recording, on inputs that want
    gradients. A provider wrong only there is a mismatch."""
    real = bench.fused_fn

    def wrong_when_recording(op):
        fn = real(op)
        return lambda *args: fn(*args) * (1.5 if torch.is_grad_enabled() else 1.0)

    monkeypatch.setattr(bench, "fused_fn", wrong_when_recording)
    for mode, status in (("forward", "mismatch"), ("no_grad", "ok")):
        rows = quick_rows(tmp_path / mode, "--providers", "fused,eager", "--op", "relu_add",
                          "--mode", mode, "--sizes", "64x10x10", code=1 if mode == "forward" else 0)
        fused = [r for r in rows if r["provider"] == "fused"]
        assert fused and fused[0]["status"].startswith(status), (mode, fused)


def test_cpu_timing_uses_every_thread():
    """torch.utils.benchmark's Timer runs on one thread unless told: the sweep times on the
    threads torch has, and the rows say how many."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        bench.time_cpu([lambda: seen.append(torch.get_num_threads())], 0.01)
        assert seen and set(seen) == {2}
        assert bench.environment("cpu")["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_compiled_providers_get_one_static_graph_per_shape(monkeypatch):
    """Under automatic dynamic shapes every size after an op's first would be timed on a
    symbolic graph, so a row would depend on the sizes run before it."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    monkeypatch.setattr(bench, "_compiled", {})
    bench.provider_fn("compile", "relu_add")
    bench.provider_fn("compile-max-autotune", "concat2")
    assert [kw.get("dynamic") for kw in calls] == [False, False]


def test_a_wrong_column_of_a_large_output_is_an_error():
    """One norm over a large output would let a wrong column or tile pass (here its share of
    the norm is under 1e-2); each element is held to its own size too. A correct bfloat16
    result passes."""
    torch.manual_seed(0)
    x, w = torch.randn(1024, 512).bfloat16(), (torch.randn(512, 512) / 23).bfloat16()
    want = x.double() @ w.double().t()
    got = x @ w.t()
    assert bench.relative_error(got, want) <= bench.TOLERANCE[torch.bfloat16] / 2
    got[:, 5] *= 0.8
    assert bench.relative_error(got, want) > bench.TOLERANCE[torch.bfloat16]


def fast_cpu_timing(monkeypatch):
    """time_cpu as one call of the first step: the rows come without timing's seconds."""
    def one_call(steps, min_run_time):
        steps[0]()
        return [1.0]

    monkeypatch.setattr(bench, "time_cpu", one_call)


class SweepReached(Exception):
    """Raised in place of the sweep: what main() got as far as."""


def stop_at_the_sweep(monkeypatch):
    """main() up to its sweep, which is not run: the plan and device it would run with."""
    def sweep(plan, args, device, env):
        raise SweepReached(plan, device)

    monkeypatch.setattr(bench, "run_sweep", sweep)


@pytest.mark.parametrize("provider", ["fused", "fused-native", "fused-gemm_epilogue"])
def test_an_error_of_the_fused_op_fails_the_run(tmp_path, monkeypatch, provider):
    """A fused provider that raises (a kernel fault, say) fails the run, though eager timed."""
    def broken(op):
        def fn(xs, w, b, r):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return fn

    monkeypatch.setattr(bench, "fused_fn", broken)
    fast_cpu_timing(monkeypatch)
    rows = quick_rows(tmp_path / "results", "--providers", f"{provider},eager", "--op",
                      "relu_add", "--mode", "forward", "--sizes", "16x8x8", code=1)
    status = {r["provider"]: r["status"] for r in rows}
    assert "illegal memory access" in status[provider] and status["eager"] == "ok"


def test_which_rows_fail_a_run():
    """Mismatches of any provider and errors of the fused ones; not a peer's error (compile
    unable to build), nor inputs a device cannot hold, nor a cutlass kernel that does not
    apply."""
    def row(provider, status):
        return {"provider": provider, "status": status}

    failing = [row("eager", "mismatch (relative error 0.5)"),
               row("fused-cutlass", "error: RuntimeError: boom"),
               row("fused", "error: RuntimeError: boom")]
    passing = [row("compile", "error: RuntimeError: no C++ compiler"),
               row("gemm", "error: RuntimeError: boom"),
               row("fused", "error: inputs: RuntimeError: too large"),
               row("fused-cutlass", "n/a: the cutlass kernel does not apply here"),
               row("fused", "ok")]
    assert bench.failed_rows(failing + passing) == failing


def test_rows_verdict_judges_the_files_a_script_names(tmp_path, capsys):
    """What the GPU scripts call where a time limit stopped the bench: each rows file there is
    counted, a missing one skipped, and the status is 1 where a row fails the run."""
    ok = {"provider": "fused", "op": "relu_add", "status": "ok"}
    peer = {"provider": "compile", "op": "relu_add", "status": "error: RuntimeError: no cc"}
    bad = {"provider": "fused", "op": "relu_add", "status": "error: RuntimeError: CUDA error"}
    bench.write_rows([ok, peer], str(tmp_path / "a"))
    bench.write_rows([ok, bad], str(tmp_path / "b"))
    a, b = str(tmp_path / "a" / "rows.jsonl"), str(tmp_path / "b" / "rows.jsonl")
    assert bench.rows_verdict([a, str(tmp_path / "missing.jsonl")]) == 0
    assert f"{a}: 1 timed, 0 failed, 1 not timed" in capsys.readouterr().out
    assert bench.rows_verdict([a, b]) == 1
    printed = capsys.readouterr().out
    assert f"{b}: 1 timed, 1 failed, 0 not timed" in printed and "CUDA error" in printed


def test_a_stopped_run_with_a_mismatch_fails(tmp_path, monkeypatch):
    """A mismatch found before TERM stopped the sweep: 1, not the 130 of a clean stopped run
    (which test_an_interrupted_sweep_keeps_the_cases_it_finished checks), or the fault would
    read as a run cut by its time limit."""
    real_fused, real_case = bench.fused_fn, bench.time_case
    calls = []

    def wrong(op):
        fn = real_fused(op)
        return lambda *args: fn(*args) * 1.5

    def stopped_at_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # bench's handler raises KeyboardInterrupt
        return real_case(*args, **kwargs)

    monkeypatch.setattr(bench, "fused_fn", wrong)
    monkeypatch.setattr(bench, "time_case", stopped_at_the_second_case)
    fast_cpu_timing(monkeypatch)
    out = tmp_path / "results"
    rows = quick_rows(out, "--providers", "fused,eager", "--op", "relu_add", "--mode",
                      "forward", "--sizes", "16x8x8,32x8x8", code=1)
    assert [(r["M"], r["status"][:8]) for r in rows] == [(16, "mismatch"), (16, "ok")]
    assert "interrupted" in (out / "table.md").read_text()


def test_a_nan_result_is_a_mismatch_in_strict_json(tmp_path, monkeypatch):
    """A NaN output's relative error is NaN, which json.dumps would write as the bare token NaN
    (not JSON): rows.jsonl has null there, and the row's status says mismatch."""
    real = bench.fused_fn

    def nan_fused(op):
        fn = real(op)
        return lambda *args: fn(*args) * torch.nan

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    monkeypatch.setattr(bench, "fused_fn", nan_fused)
    fast_cpu_timing(monkeypatch)
    out = tmp_path / "results"
    quick_rows(out, "--providers", "fused,eager", "--op", "relu_add", "--mode", "forward",
               "--sizes", "16x8x8", code=1)
    rows = [json.loads(line, parse_constant=refuse)
            for line in (out / "rows.jsonl").read_text().splitlines()]
    fused, = [r for r in rows if r["provider"] == "fused"]
    assert fused["rel_err"] is None and fused["status"] == "mismatch (relative error nan)"


def test_a_run_replaces_an_earlier_runs_files(tmp_path, monkeypatch):
    """A run that draws no plot and times no model leaves none of an earlier run's plots or
    model rows in its folder; files the benchmark does not write stay."""
    fast_cpu_timing(monkeypatch)
    out = tmp_path / "results"
    out.mkdir()
    for name in ("rows.jsonl", "rows.csv", "table.md", "speedup.png", "models.jsonl",
                 "models.csv", "models.png", "summary.md", "bench.log"):
        (out / name).write_text("an earlier run's")
    quick_rows(out, "--providers", "fused", "--op", "relu_add", "--mode", "forward", "--sizes",
               "16x8x8")  # no eager row: no speed-up to draw
    assert sorted(os.listdir(out)) == ["bench.log", "rows.csv", "rows.jsonl", "summary.md",
                                       "table.md"]
    assert (out / "summary.md").read_text() == "an earlier run's"


def test_on_a_gpu_without_the_cuda_kernels_fused_rows_are_refused(tmp_path, monkeypatch,
                                                                 capsys):
    """Where torch sees a GPU, a fused provider there, which would time the reference path
    without the extension's CUDA kernels, is refused with the reason under --device cuda; by
    default (make bench passes no --device) the run is on the CPU, in its dtype, with a note
    saying why. --device cpu still runs, as does a GPU run of the peers alone."""
    from fusedskip import _ops

    stop_at_the_sweep(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    monkeypatch.setattr(_ops, "HAS_CUDA_KERNELS", False)
    out = ["--out", str(tmp_path / "x")]
    with pytest.raises(SweepReached) as reached:
        bench.main(["--quick", *out])
    assert reached.value.args[1] == "cpu" and reached.value.args[0].dtypes == [torch.float32]
    assert re.search(r"note: torch sees a GPU, but the compiled extension was built without "
                     r"CUDA kernels .*timing on the CPU", capsys.readouterr().err)
    with pytest.raises(SystemExit, match="--device cuda: .*without CUDA kernels.*so "
                       "fused-cutlass would time the reference"):
        bench.main(["--quick", "--device", "cuda", "--providers", "fused-cutlass,eager", *out])
    monkeypatch.setattr(_ops, "AVAILABLE", False)
    monkeypatch.setattr(_ops, "LOAD_ERROR", ImportError("undefined symbol: _ZN3c10"))
    with pytest.raises(SystemExit, match=r"did not load \(undefined symbol: _ZN3c10\)"):
        bench.main(["--quick", "--device", "cuda", "--providers", "fused", *out])
    for argv, device in ((["--device", "cpu"], "cpu"), (["--providers", "eager,gemm"], "cuda")):
        with pytest.raises(SweepReached) as reached:
            bench.main(["--quick", *argv, *out])
        assert reached.value.args[1] == device
    # A GPU too old for the kernels (a T4), with a build that has them: the same.
    monkeypatch.setattr(_ops, "AVAILABLE", True)
    monkeypatch.setattr(_ops, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(_ops, "gpu_runs_kernels_known", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    with pytest.raises(SystemExit, match=r"--device cuda: a GPU has compute capability 7\.5 and "
                       "the CUDA kernels need 8.0"):
        bench.main(["--quick", "--device", "cuda", *out])
    with pytest.raises(SweepReached) as reached:
        bench.main(["--quick", *out])
    assert reached.value.args[1] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SweepReached) as reached:
        bench.main(["--quick", *out])
    assert reached.value.args[1] == "cpu"


def test_the_environment_says_which_build_ran():
    import fusedskip

    env = bench.environment("cpu")
    assert env["extension_loaded"] is fusedskip.extension_loaded()
    assert env["extension_cuda_kernels"] is bool(fusedskip._ops.HAS_CUDA_KERNELS)
    assert env["cutlass_built"] is bool(fusedskip.cutlass_built())


def test_list_options_take_spaces_after_commas(tmp_path, monkeypatch):
    """As --dtype and --sizes do."""
    stop_at_the_sweep(monkeypatch)
    with pytest.raises(SweepReached) as reached:
        bench.main(["--device", "cpu", "--op", "relu_add, concat2", "--mode", "forward, no_grad",
                    "--providers", " fused , eager", "--dtype", "float32, float64",
                    "--sizes", "16x8x8, 32x8x8", "--out", str(tmp_path / "x")])
    plan = reached.value.args[0]
    assert (plan.ops, plan.modes, plan.providers) == (
        ["relu_add", "concat2"], ["forward", "no_grad"], ["fused", "eager"])
    assert plan.dtypes == [torch.float32, torch.float64] and len(plan.sizes) == 2


def test_models_are_timed_in_each_dtype(tmp_path, monkeypatch, capsys):
    """--model with two dtypes times the models in both (each row and table line says which),
    and the closing line names every file written, models.csv too."""
    fast_cpu_timing(monkeypatch)
    out = tmp_path / "results"
    quick_rows(out, "--model", "--providers", "eager", "--op", "relu_add", "--mode", "forward",
               "--sizes", "16x8x8", "--dtype", "float32,float64")
    models = bench.read_jsonl(str(out / "models.jsonl"))
    assert sorted((r["model"], r["dtype"]) for r in models) == [
        ("residual_mlp16", "float32"), ("residual_mlp16", "float64"),
        ("unet_mlp", "float32"), ("unet_mlp", "float64")]
    assert all(r["status"] == "ok" for r in models)
    assert "| unet_mlp | eager | float64 |" in (out / "table.md").read_text()
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1
    for name in ("rows.jsonl", "rows.csv", "models.jsonl", "models.csv", "table.md"):
        assert name in wrote[0], name


def test_peaks_print_in_significant_digits(tmp_path, monkeypatch, capsys):
    """A CPU's matmul rate, a few hundredths of a TFLOP/s, is not shown as 0.0; a rate not
    measured is n/a."""
    fast_cpu_timing(monkeypatch)
    monkeypatch.setattr(bench, "measure_peaks",
                        lambda device, dtypes: {"tflops": {"float32": 0.0412}, "gbps": 16.83})
    quick_rows(tmp_path / "results", "--providers", "eager", "--op", "relu_add", "--mode",
               "forward", "--sizes", "16x8x8")
    assert "matmul 0.0412 TFLOP/s float32; copy 16.8 GB/s" in capsys.readouterr().out
    assert [bench.format_rate(v) for v in (0.0, None, float("nan"), 3012.4, 1.0)] == [
        "n/a", "n/a", "n/a", "3012", "1.00"]
