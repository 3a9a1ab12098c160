"""The question fusedskip answers: an nn.Sequential-style MLP 30→10→15→10→20→2 whose fourth
linear takes a skip from the second and third, by addition (ResNet-like) and by concatenation
(UNet-like). Fused modules, the functional API and the reference must agree."""

import importlib.util
import os

import pytest
import torch
from torch import nn

import fusedskip
from conftest import assert_close_rel, checkout_env


def _load_example():
    """The models of examples/skip_mlp.py: the README's answer is what the tests check."""
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "skip_mlp.py")
    spec = importlib.util.spec_from_file_location("skip_mlp_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_example = _load_example()
AddSkipMLP, ConcatSkipMLP = _example.AddSkipMLP, _example.ConcatSkipMLP


class FunctionalConcatSkipMLP(ConcatSkipMLP):
    """The same model written with the functional API: the fused op's CPU kernel on CPU."""

    def forward(self, x):
        h1 = torch.relu(self.linear1(x))
        h2 = fusedskip.linear_relu_residual(h1, self.linear2.weight, self.linear2.bias)
        h3 = fusedskip.linear_relu_residual(h2, self.linear3.weight, self.linear3.bias)
        h4 = fusedskip.linear_concat([h2, h3], self.linear4.weight, self.linear4.bias,
                                     activation="relu")
        return self.linear5(h4)


class FunctionalAddSkipMLP(AddSkipMLP):
    def forward(self, x):
        h1 = torch.relu(self.linear1(x))
        h2 = fusedskip.linear_relu_residual(h1, self.linear2.weight, self.linear2.bias)
        h3 = fusedskip.linear_relu_residual(h2, self.linear3.weight, self.linear3.bias, h2)
        return self.linear5(torch.relu(self.linear4(h3)))


def check(model_cls, ref_cls, dtype, exact=False):
    torch.manual_seed(0)
    ref = ref_cls(fusedskip.reference).to(dtype)
    model = model_cls(fusedskip).to(dtype)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(64, 30, dtype=dtype)
    target = torch.randn(64, 2, dtype=dtype)
    results = []
    for m in (model, ref):
        loss = nn.functional.mse_loss(m(x), target)
        results.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    (loss, grads), (ref_loss, ref_grads) = results
    assert len(grads) == len(ref_grads)
    if exact:
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(g, rg) for g, rg in zip(grads, ref_grads))
        return
    assert_close_rel(loss, ref_loss, dtype, "loss")
    for g, rg in zip(grads, ref_grads):
        assert_close_rel(g, rg, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model_cls,ref_cls", [
    (AddSkipMLP, AddSkipMLP), (ConcatSkipMLP, ConcatSkipMLP),
    (FunctionalAddSkipMLP, AddSkipMLP), (FunctionalConcatSkipMLP, ConcatSkipMLP)],
    ids=["add-modules", "concat-modules", "add-functional", "concat-functional"])
def test_seed_mlp_matches_reference(model_cls, ref_cls, dtype, monkeypatch):
    """Through the fused op's CPU kernel: the functional models always; the modules by their
    fused branch (CUDA tensors' path), which a CPU otherwise never takes."""
    from fusedskip import modules
    monkeypatch.setattr(modules, "_use_fused", lambda tensor: True)
    check(model_cls, ref_cls, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model_cls", [AddSkipMLP, ConcatSkipMLP], ids=["add", "concat"])
def test_seed_mlp_modules_on_a_cpu_are_the_reference(model_cls, dtype):
    """On a CPU the fused modules take the reference path: the same bits."""
    check(model_cls, model_cls, dtype, exact=True)


def test_seed_mlp_trains():
    """A few SGD steps with the fused functional model lower the loss exactly as the reference."""
    torch.manual_seed(1)
    models = [FunctionalConcatSkipMLP(fusedskip).double(), ConcatSkipMLP(fusedskip.reference).double()]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(128, 30, dtype=torch.float64), torch.randn(128, 2, dtype=torch.float64)
    losses = [[], []]
    for model, history in zip(models, losses):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            history.append(loss.item())
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=0)


def test_example_script_runs(tmp_path):
    """examples/skip_mlp.py trains both skips, fused and reference, and saves its plot."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "skip_mlp.py")
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, script, "--steps", "20", "--device", "cpu",
                             "--out", str(out)], capture_output=True, text=True, timeout=300,
                            env=checkout_env())
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "ms/step" in line]
    assert len(lines) == 4
    # on CPU the fused layers run the reference ops: identical losses
    assert lines[0].split("loss")[1].split()[:3] == lines[1].split("loss")[1].split()[:3]
    assert out.stat().st_size > 0
