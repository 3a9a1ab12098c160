"""Reliability: concurrency, memory, numerical edge cases beyond test_forward.py, and the
bad calls autograd itself refuses."""

import gc
import threading
import warnings
import weakref

import pytest
import torch

import fusedskip
from conftest import DEVICE_BACKENDS, assert_close_rel, requires_cuda


def run_step(seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.randn(96, 17, generator=generator).to(device).requires_grad_()
    x2 = torch.randn(96, 30, generator=generator).to(device).requires_grad_()
    w = torch.randn(40, 47, generator=generator).to(device).requires_grad_()
    b = torch.randn(40, generator=generator).to(device).requires_grad_()
    h = fusedskip.linear_concat([x1, x2], w, b, activation="relu")
    y = fusedskip.linear_relu_residual(h, w[:, :40], b, h, order="add_relu")
    grads = torch.autograd.grad(y.square().sum(), (x1, x2, w, b))
    return [y.detach(), *grads]


def test_threads_give_serial_results():
    serial = {seed: run_step(seed) for seed in range(8)}
    results, errors = {}, []

    def worker(seeds):
        try:
            for _ in range(5):
                for seed in seeds:
                    results.setdefault(seed, []).append(run_step(seed))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=([s, s + 4],)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker is still running"
    assert not errors, errors
    assert sorted((seed, len(runs)) for seed, runs in results.items()) == [
        (seed, 5) for seed in range(8)]
    for seed, runs in results.items():
        for run in runs:
            for got, want in zip(run, serial[seed]):
                assert torch.equal(got, want)


@requires_cuda
def test_cuda_streams_give_serial_results():
    serial = {seed: run_step(seed, "cuda") for seed in range(4)}
    streams = [torch.cuda.Stream() for _ in range(4)]
    outputs = {}
    torch.cuda.synchronize()
    for seed, stream in zip(range(4), streams):
        with torch.cuda.stream(stream):
            outputs[seed] = run_step(seed, "cuda")
    torch.cuda.synchronize()
    for seed in range(4):
        for got, want in zip(outputs[seed], serial[seed]):
            assert torch.equal(got, want)


def test_graph_frees_what_it_saved():
    """Everything autograd saved for backward (inputs, weight, mask) is released with the graph,
    and only those three kinds are saved: no pre-activation, no concatenation."""
    saved = []

    def pack(tensor):
        saved.append((weakref.ref(tensor), tuple(tensor.shape), tensor.dtype))
        return tensor

    x1 = torch.randn(64, 5, requires_grad=True)
    x2 = torch.randn(64, 7, requires_grad=True)
    w = torch.randn(9, 12, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fusedskip.linear_concat([x1, x2], w, activation="relu")
    shapes = sorted((shape, str(dtype)) for _, shape, dtype in saved)
    assert shapes == sorted([((64, 5), "torch.float32"), ((64, 7), "torch.float32"),
                             ((9, 12), "torch.float32"), ((64, 2), "torch.uint8")])
    mask_ref = next(ref for ref, shape, _ in saved if shape == (64, 2))
    out.sum().backward()
    del out
    gc.collect()
    assert mask_ref() is None, "the ReLU mask outlived its graph"


def test_no_growth_over_iterations():
    """Forward+backward in a loop holds no references: the number of live tensors stays flat."""
    x = torch.randn(128, 32, requires_grad=True)
    w = torch.randn(32, 32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() pokes lazy module attributes
            warnings.simplefilter("ignore")
            return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

    for _ in range(5):
        fusedskip.linear_relu_residual(x, w, b, x).sum().backward()
    before = live_tensors()
    for _ in range(100):
        fusedskip.linear_relu_residual(x, w, b, x).sum().backward()
    assert live_tensors() <= before


@requires_cuda
def test_cuda_memory_flat_and_oom_recovers():
    x = torch.randn(1024, 256, device="cuda", requires_grad=True)
    w = torch.randn(256, 256, device="cuda", requires_grad=True)
    for _ in range(3):
        fusedskip.linear_relu_residual(x, w, None, x).sum().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(100):
        fusedskip.linear_relu_residual(x, w, None, x).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    free, _ = torch.cuda.mem_get_info()
    rows = free // (256 * 4) + 1  # a float32 output of 256 columns larger than all free memory
    with pytest.raises(torch.OutOfMemoryError):
        fusedskip.linear_relu_residual(torch.empty(rows, 1, device="cuda").expand(rows, 256),
                                       w.detach())
    with torch.no_grad():
        out = fusedskip.linear_relu_residual(x, w)
    assert_close_rel(out, torch.relu(x.double() @ w.double().T), torch.float32, "after the OOM")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_large_k_accumulates_in_float32(dtype, device, backend):
    """K = 65536 terms of ~0.01 summing to ~650: summed in the half type itself, each term would
    fall below the running sum's rounding (0.5 in float16, 4 in bfloat16 there) and be lost;
    accumulated in float32 it matches float64 to the dtype's rounding."""
    torch.manual_seed(0)
    k = 65536
    x = (torch.rand(4, k) + 0.5).to(dtype).to(device)
    w = (torch.rand(8, k) * 0.02).to(dtype).to(device)
    with fusedskip.use_backend(backend):
        out = fusedskip.linear_relu_residual(x, w)
    ref = torch.relu(x.double() @ w.double().T)
    assert torch.isfinite(out).all()
    assert_close_rel(out, ref, dtype)


def test_deterministic_under_deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    try:
        first = run_step(3)
        second = run_step(3)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_inference_tensors_cannot_be_saved_for_backward():
    """An input made under inference_mode, used where autograd must save it: PyTorch's own clear
    error, not a crash."""
    with torch.inference_mode():
        x = torch.randn(4, 3)
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        fusedskip.linear_relu_residual(x, w)


def test_inference_mode_runs_without_graph():
    w = torch.randn(5, 3, requires_grad=True)
    with torch.inference_mode():
        out = fusedskip.linear_relu_residual(torch.randn(4, 3), w)
    assert not out.requires_grad and out.shape == (4, 5)
