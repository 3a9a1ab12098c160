"""gradcheck (backward and forward mode) and gradgradcheck (float64) of every form through the
public functional API, and torch.library.opcheck of both ops on the same samples."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import fusedskip
from conftest import (CPU_BACKENDS, CUDA, CUDA_MARKS, DEVICE_BACKENDS, ids, make_sample,
                      new_memory_is_nan, sample_grid)

SAMPLES = sample_grid()


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_gradcheck(sample):
    assert torch.autograd.gradcheck(lambda *t: sample.call(fusedskip, *t), sample.tensors(),
                                    check_forward_ad=True)


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_gradgradcheck(sample):
    assert torch.autograd.gradgradcheck(lambda *t: sample.call(fusedskip, *t), sample.tensors(),
                                        check_fwd_over_rev=True)


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_opcheck_forward(sample):
    torch.library.opcheck(torch.ops.fusedskip.fused_linear.default, sample.op_args())


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_opcheck_backward(sample):
    inputs = [x.detach() for x in sample.inputs]
    weight = sample.weight.detach()
    out, mask = torch.ops.fusedskip.fused_linear(inputs, weight, None, None, sample.relu, False)
    grad_output = torch.randn_like(out)
    count = len(inputs)
    # Everything, nothing, and the first input's gradient alone (with several inputs, the cat's
    # gradient with the others' columns zeroed).
    for output_mask in ([True] * (count + 3), [False] * (count + 3),
                        [True] + [False] * (count + 2)):
        torch.library.opcheck(torch.ops.fusedskip.fused_linear_backward.default,
                              (grad_output, inputs, weight, mask, sample.relu, output_mask))


def test_gradient_only_where_asked():
    """A frozen weight and a residual that needs no gradient are not computed (the backward op
    is asked for the input's and the bias's alone), and the rest are still right."""

    class BackwardCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.output_masks = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.fusedskip.fused_linear_backward.default:
                self.output_masks.append(list(args[5]))
            return func(*args, **(kwargs or {}))

    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 3, dtype=torch.float64)
    y = fusedskip.linear_relu_residual(x, w, b, r, order="add_relu")
    with BackwardCalls() as calls:
        gx, gb = torch.autograd.grad(y.sum(), (x, b))
    # input, weight, bias, pre-activation (the residual's gradient)
    assert calls.output_masks == [[True, False, True, False]]
    x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
    ref = fusedskip.reference.linear_relu_residual(x2, w, b2, r, order="add_relu")
    rx, rb = torch.autograd.grad(ref.sum(), (x2, b2))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)


FORMS = {
    "concat": dict(widths=[3, 5], residual=None),
    "add_relu": dict(widths=[7], residual="add_relu"),
}


def _frozen_sample(form, frozen, device="cpu"):
    sample = make_sample(FORMS[form]["widths"], 6, (2, 4), residual=FORMS[form]["residual"],
                         device=device)
    for t in (sample.inputs if frozen == "inputs" else [sample.weight]):
        t.requires_grad_(False)
    return sample


def _grads(sample, api, write):
    """Gradients of every tensor that wants one, after `write` changed in place some of the
    tensors the call used, between forward and backward (each call gets fresh copies, so fused
    and reference see the same)."""
    tensors = [t.detach().clone().requires_grad_(t.requires_grad) for t in sample.tensors()]
    # Inputs are used through a non-leaf view of themselves, which an in-place write may change.
    used = [t * 1 if t.requires_grad else t.clone() for t in tensors]
    out = sample.call(api, *used)
    with torch.no_grad():
        write(used)
    wanted = [t for t in tensors if t.requires_grad]
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)
    return torch.autograd.grad((out * weights).sum(), wanted)


@pytest.mark.parametrize("device, backend",
                         [("cpu", b) for b in CPU_BACKENDS] +
                         [pytest.param("cuda", b, marks=CUDA_MARKS)
                          for b in ("native", "gemm_epilogue")])
@pytest.mark.parametrize("form", FORMS)
def test_saves_inputs_and_weight_only_where_the_other_wants_a_gradient(form, device, backend):
    """As eager's linear: with the weight frozen, the inputs are not saved, so writing into them
    in place between forward and backward is no error, and the gradients are the reference's
    (the backward reads stand-ins of their shapes); likewise the weight with the inputs
    frozen."""
    sample = _frozen_sample(form, "weight", device)
    n = len(sample.inputs)

    def write_inputs(used):
        for t in used[:n]:
            t.mul_(3)

    with fusedskip.use_backend(backend):
        got = _grads(sample, fusedskip, write_inputs)
        # The stand-ins are left unfilled; under deterministic algorithms torch fills new memory
        # with NaN, which would reach a gradient that read them.
        with new_memory_is_nan():
            got_nan_standins = _grads(sample, fusedskip, write_inputs)
    want = _grads(sample, fusedskip.reference, write_inputs)
    assert len(got) == len(got_nan_standins) == len(want) > 0
    for g, g_nan, w in zip(got, got_nan_standins, want):
        torch.testing.assert_close(g, w)
        torch.testing.assert_close(g_nan, w)

    # As eager's linear again: with the inputs frozen the weight is not guarded (a first layer's
    # weight clipped or averaged in place before backward: its gradient does not read it), and
    # the gradients are the reference's.
    def write_input(used):
        used[0].mul_(3)

    def write_weight(used):
        used[n].mul_(3)

    sample = _frozen_sample(form, "inputs", device)
    with fusedskip.use_backend(backend):
        got = _grads(sample, fusedskip, write_weight)
    want = _grads(sample, fusedskip.reference, write_weight)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # What is saved guards itself: where the weight wants a gradient, the inputs (eager's concat
    # keeps its cat instead); where an input wants one, the weight.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads(sample, fusedskip, write_input)
    sample = _frozen_sample(form, "weight", device)
    for api in (fusedskip, fusedskip.reference):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _grads(sample, api, write_weight)


@pytest.mark.parametrize("input_grad", [False, True])
def test_a_computed_weight_is_freed_after_backward(input_grad):
    """A weight computed in forward (a parametrized one) is released with the rest of what
    backward used, whether saved for the input's gradient or only for its shape."""
    p = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    weight = p * 2
    storage = weight.untyped_storage()._weak_ref()
    y = fusedskip.linear_relu_residual(
        torch.randn(4, 16, dtype=torch.float64, requires_grad=input_grad), weight)
    del weight
    y.sum().backward()
    assert torch.UntypedStorage._expired(storage)
    assert p.grad is not None


def test_the_backward_op_is_not_differentiable():
    """A backward through a direct call of the backward op raises, where the gradient would go
    missing (a double backward through the functional API differentiates ATen ops instead)."""
    x = torch.randn(4, 5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    _, mask = torch.ops.fusedskip.fused_linear([x], w.detach(), None, None, True, False)
    g = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    grad_input = torch.ops.fusedskip.fused_linear_backward(g, [x], w, mask, True,
                                                           [True, True, False, False])[0]
    with pytest.raises(RuntimeError, match="fusedskip::fused_linear_backward.*not implemented"):
        grad_input.sum().backward()
    assert g.grad is None and w.grad is None


def test_inputs_of_a_frozen_layer_are_not_kept_alive():
    """With the weight frozen, nothing in backward reads the inputs: the graph does not hold them
    (the residual stream's gradient alone is wanted here)."""
    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(8, 8, dtype=torch.float64)
    r = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    x_alive = weakref.ref(x)
    y = fusedskip.linear_relu_residual(x, w, None, r)
    del x
    assert x_alive() is None
    (g,) = torch.autograd.grad(y.sum(), r)
    torch.testing.assert_close(g, torch.ones_like(r))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_a_weight_made_under_inference_mode(form, device, backend):
    """A layer made under torch.inference_mode, then used frozen with only its bias (and the
    residual stream) wanting gradients. An inference tensor cannot be saved for backward; eager's
    linear saves nothing of the weight there, and the op must not either (it raised "Inference
    tensors cannot be saved for backward"), compiled too."""
    sample = _frozen_sample(form, "weight", device)
    for t in sample.inputs:
        t.requires_grad_(False)
    with torch.inference_mode():
        sample.weight = sample.weight.clone()
    assert sample.weight.is_inference()

    def grads(call):
        out = call(*sample.tensors())
        weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)
        wanted = [t for t in (sample.bias, sample.residual) if t is not None]
        return torch.autograd.grad((out * weights).sum(), wanted)

    def fused(*tensors):
        return sample.call(fusedskip, *tensors)

    want = grads(lambda *tensors: sample.call(fusedskip.reference, *tensors))
    with fusedskip.use_backend(backend):
        got = [grads(fused)]
        # The weight's stand-in is left unfilled: NaN there would reach a gradient that read it.
        with new_memory_is_nan():
            got.append(grads(fused))
        torch._dynamo.reset()
        got.append(grads(torch.compile(fused, fullgraph=True, backend="aot_eager")))
    assert len(want) == (2 if form == "add_relu" else 1)
    for run in got:
        assert len(run) == len(want)
        for g, w in zip(run, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("frozen", ["weight", "inputs"])
def test_gradgradcheck_with_a_frozen_part(frozen, form):
    """Double backward with one part frozen: with the weight frozen the inputs are not saved
    (stand-ins of their shapes in backward), with the inputs frozen only the weight's gradient
    is computed."""
    sample = _frozen_sample(form, frozen)
    assert torch.autograd.gradgradcheck(lambda *t: sample.call(fusedskip, *t), sample.tensors())


def test_checkpoint_recompute_asking_for_part_of_the_gradients():
    """A forward that checkpointing recomputes inside a backward that wants only some gradients
    must save what the first forward saved."""
    sample = make_sample([3, 5], 6, (4,), relu=True)
    x0, x1, w, b = [t.detach().clone().requires_grad_() for t in sample.tensors()]

    def layer(api, a, c):
        return api.linear_concat([a, c], w, b, activation="relu").square()

    got = torch.autograd.grad(
        checkpoint(lambda a, c: layer(fusedskip, a, c), x0, x1, use_reentrant=False).sum(), (x0,))
    want = torch.autograd.grad(layer(fusedskip.reference, x0, x1).sum(), (x0,))
    torch.testing.assert_close(got, want)


def _some(samples, prefix="", marks=()):
    """Every twelfth-or-so sample, as pytest params."""
    some = samples[:: max(1, len(samples) // 12)]
    return [pytest.param(s, id=prefix + i, marks=marks) for s, i in zip(some, ids(some))]


@pytest.mark.parametrize("sample", _some(SAMPLES) +
                         _some(sample_grid(device="cuda") if CUDA else [], "cuda-", CUDA_MARKS))
def test_forward_mode_gives_the_ops_outputs(sample):
    """A call with tangents takes another path (csrc/autograd.cpp, fused_linear_composite): its
    output and mask must be the op's, and its tangent the reference's."""
    import torch.autograd.forward_ad as fwAD

    primals = [t.detach() for t in sample.tensors()]
    tangents = [torch.randn_like(t) for t in primals]
    out, mask = torch.ops.fusedskip.fused_linear(*_op_args(sample, primals))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        dual_out, dual_mask = torch.ops.fusedskip.fused_linear(*_op_args(sample, duals))
        tangent = fwAD.unpack_dual(dual_out).tangent
    torch.testing.assert_close(fwAD.unpack_dual(dual_out).primal, out)
    assert torch.equal(dual_mask, mask)
    _, expected = torch.func.jvp(lambda *t: sample.call(fusedskip.reference, *t),
                                 tuple(primals), tuple(tangents))
    torch.testing.assert_close(tangent, expected)


_FROZEN = [pytest.param((form, frozen, device), id=f"{device}-{form}-frozen-{frozen}",
                        marks=CUDA_MARKS if device == "cuda" else ())
           for device in (["cpu", "cuda"] if CUDA else ["cpu"])
           for form in FORMS for frozen in ("inputs", "weight")]


@pytest.mark.parametrize("sample", _some(SAMPLES) + _FROZEN +
                         _some(sample_grid(device="cuda") if CUDA else [], "cuda-", CUDA_MARKS))
def test_a_tangent_on_the_output_gradient_reaches_every_gradient(sample):
    """Forward over reverse without create_graph (a hypergradient: d/d(lam) of the gradient of
    lam * loss): forward AD runs whatever the grad mode, so backward must carry the tangent of
    the gradient it is handed into the gradients it returns, as eager's does, not drop it. Also
    with the inputs or the weight frozen (then saved for their shapes only)."""
    import torch.autograd.forward_ad as fwAD

    if isinstance(sample, tuple):
        sample = _frozen_sample(*sample)
    wanted = [t.requires_grad for t in sample.tensors()]
    primals = [t.detach() for t in sample.tensors()]
    shape = sample.call(fusedskip.reference, *primals).shape
    grad, grad_tangent = torch.randn(shape, dtype=primals[0].dtype, device=primals[0].device), \
        torch.randn(shape, dtype=primals[0].dtype, device=primals[0].device)

    def gradients_and_tangents(api):
        leaves = [p.clone().requires_grad_(w) for p, w in zip(primals, wanted)]
        out = sample.call(api, *leaves)
        with fwAD.dual_level():
            found = torch.autograd.grad(out, [t for t in leaves if t.requires_grad],
                                        fwAD.make_dual(grad, grad_tangent))
            return [fwAD.unpack_dual(g) for g in found]

    for got, expected in zip(gradients_and_tangents(fusedskip),
                             gradients_and_tangents(fusedskip.reference)):
        torch.testing.assert_close(got.primal, expected.primal)
        assert got.tangent is not None
        torch.testing.assert_close(got.tangent, expected.tangent)


def _op_args(sample, tensors):
    n = len(sample.inputs)
    rest = list(tensors[n + 1:])
    bias = rest.pop(0) if sample.bias is not None else None
    residual = rest.pop(0) if sample.residual is not None else None
    return (list(tensors[:n]), tensors[n], bias, residual, sample.relu, sample.order == "add_relu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_torch_func_forward_transforms(device):
    """torch.func.jvp and jacfwd through a concat layer feeding an add_relu layer, against the
    reference's reverse-mode Jacobian."""
    x1, x2, w1, w2, b = (torch.randn(*shape, dtype=torch.float64, device=device)
                         for shape in ((3, 4), (3, 2), (5, 6), (5, 5), (5,)))

    def net(api, x1, x2):
        h = api.linear_concat([x1, x2], w1, b, activation="relu")
        return api.linear_relu_residual(h, w2, None, h, order="add_relu").sin()

    fused = lambda *x: net(fusedskip, *x)  # noqa: E731
    ref = lambda *x: net(fusedskip.reference, *x)  # noqa: E731
    for got, want in zip(torch.func.jacfwd(fused, argnums=(0, 1))(x1, x2),
                         torch.func.jacrev(ref, argnums=(0, 1))(x1, x2)):
        torch.testing.assert_close(got, want)
    tangents = (torch.randn_like(x1), torch.randn_like(x2))
    for got, want in zip(torch.func.jvp(fused, (x1, x2), tangents),
                         torch.func.jvp(ref, (x1, x2), tangents)):
        torch.testing.assert_close(got, want)


def _detached(sample):
    return [t.detach() for t in sample.tensors()]


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_torch_func_reverse_transforms(sample):
    """torch.func.grad and jacrev of every form against the reference's. (A C++ autograd Function
    is refused by torch.func: under a transform the op computes through its ATen composite.)"""
    tensors = _detached(sample)
    argnums = tuple(range(len(tensors)))

    def layer(api):
        return lambda *t: sample.call(api, *t)

    def loss(api):
        return lambda *t: sample.call(api, *t).sin().sum()

    for transform, f in ((torch.func.grad, loss), (torch.func.jacrev, layer)):
        for got, want in zip(transform(f(fusedskip), argnums)(*tensors),
                             transform(f(fusedskip.reference), argnums)(*tensors)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("sample", SAMPLES, ids=ids(SAMPLES))
def test_vmap(sample):
    """torch.func.vmap over a batch of every argument at once (an ensemble of layers on a batch of
    inputs each), and over the inputs alone, against a loop of plain calls."""
    tensors = _detached(sample)
    generator = torch.Generator().manual_seed(len(sample.name))
    batched = [torch.randn(3, *t.shape, dtype=t.dtype, generator=generator) for t in tensors]

    def fused(*t):
        return sample.call(fusedskip, *t)

    looped = torch.stack([fused(*(b[i] for b in batched)) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(fused)(*batched), looped)
    n = len(sample.inputs)
    in_dims = tuple(0 if i < n else None for i in range(len(tensors)))
    args = [batched[i] if i < n else t for i, t in enumerate(tensors)]
    looped = torch.stack([fused(*(a[i] if i_dim == 0 else a for a, i_dim in zip(args, in_dims)))
                          for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(fused, in_dims=in_dims)(*args), looped)


def test_vmap_dims_chunks_and_nesting():
    """vmap with the batch dim elsewhere than first (in and out), in chunks, nested over an
    ensemble of weights, and over some of a concat's inputs only, against loops of plain calls."""
    generator = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    x, w, b, r = rand(4, 3, 6), rand(5, 6), rand(5), rand(4, 5)

    def layer(x, w, r):
        return fusedskip.linear_relu_residual(x, w, b, r, order="add_relu")

    loop = torch.stack([layer(x[:, i], w, r) for i in range(3)], 1)
    torch.testing.assert_close(torch.func.vmap(layer, in_dims=(1, None, None), out_dims=1,
                                               chunk_size=2)(x, w, r), loop)
    ws, xs = rand(2, 5, 6), rand(3, 4, 6)
    nested = torch.func.vmap(torch.func.vmap(layer, in_dims=(0, None, None)),
                             in_dims=(None, 0, None))(xs, ws, r)
    loop = torch.stack([torch.stack([layer(xs[j], ws[i], r) for j in range(3)]) for i in range(2)])
    torch.testing.assert_close(nested, loop)
    wc, shared = rand(5, 9), rand(4, 3)

    def concat(a, c):
        return fusedskip.linear_concat([a, shared, c], wc, b, activation="relu")

    a, c = rand(3, 4, 2), rand(4, 3, 4)
    loop = torch.stack([concat(a[i], c[:, i]) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(concat, in_dims=(0, 1))(a, c), loop)


def test_batched_gradients_of_a_graph():
    """torch.autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) run the
    backward of a graph built outside any transform under vmap."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    w = torch.randn(5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    r = torch.randn(4, 5, dtype=torch.float64, generator=generator)
    out = fusedskip.linear_relu_residual(x, w, b, r)
    vectors = torch.randn(3, 4, 5, dtype=torch.float64, generator=generator)
    batched = torch.autograd.grad(out, (w, b), vectors, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        for got, want in zip(batched, torch.autograd.grad(out, (w, b), vectors[i],
                                                          retain_graph=True)):
            torch.testing.assert_close(got[i], want)

    def concat(api):
        return lambda w: api.linear_concat([x[:, :2], x[:, 2:]], w, b.detach(), activation="relu")

    torch.testing.assert_close(
        torch.autograd.functional.jacobian(concat(fusedskip), w.detach(), vectorize=True),
        torch.autograd.functional.jacobian(concat(fusedskip.reference), w.detach()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def test_per_sample_gradients(device):
    """The torch.func recipe for per-sample gradients, vmap(grad(loss)), through a two-layer
    skip block: each sample's weight gradients equal those of torch.autograd on that sample
    alone, and the op still runs its own kernel (its autograd node) once the transforms are
    done."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, dtype=torch.float64, generator=generator).to(device)
    params = {"w1": torch.randn(5, 5, dtype=torch.float64, generator=generator).to(device),
              "b1": torch.randn(5, dtype=torch.float64, generator=generator).to(device),
              "w2": torch.randn(4, 10, dtype=torch.float64, generator=generator).to(device)}

    def loss(p, sample):
        h = fusedskip.linear_relu_residual(sample, p["w1"], p["b1"], sample)
        return fusedskip.linear_concat([h, sample], p["w2"]).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        expected = torch.autograd.grad(loss(leaves, x[i]), list(leaves.values()))
        for name, want in zip(leaves, expected):
            torch.testing.assert_close(per_sample[name][i], want)
    w = params["w1"].clone().requires_grad_()
    out = fusedskip.linear_relu_residual(x, w, params["b1"], x)
    assert "FusedLinearFunction" in out.grad_fn.name()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_mode_rounds_as_the_op_does(dtype):
    """In half precision the kernels add bias and residual in float32 and round once: a call
    with tangents must too, or a pre-activation that cancels to a tiny value rounds to zero and
    its mask bit flips. Then random integer-valued layers (exact in every dtype): output and
    mask equal the op's."""
    import torch.autograd.forward_ad as fwAD

    def both(x, w, b, r, order):
        args = ([x], w, b, r, True, order == "add_relu")
        out, mask = torch.ops.fusedskip.fused_linear(*args)
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.ones_like(x))
            dual_out, dual_mask = torch.ops.fusedskip.fused_linear([dual], *args[1:])
            return (out, mask), (fwAD.unpack_dual(dual_out).primal, dual_mask)

    x = torch.ones(1, 1, dtype=dtype)
    w = torch.full((1, 1), 0.1, dtype=dtype)
    b = torch.full((1,), 1e-5, dtype=dtype)
    r = -torch.nn.functional.linear(x, w, b)
    (out, mask), (dual_out, dual_mask) = both(x, w, b, r, "add_relu")
    assert torch.equal(dual_mask, mask) and torch.equal(dual_out, out)
    for order in ("relu_add", "add_relu"):
        x = torch.randint(-3, 4, (9, 20)).to(dtype)
        w = torch.randint(-2, 3, (13, 20)).to(dtype)
        b = torch.randint(-2, 3, (13,)).to(dtype)
        r = torch.randint(-3, 4, (9, 13)).to(dtype)
        (out, mask), (dual_out, dual_mask) = both(x, w, b, r, order)
        assert torch.equal(dual_mask, mask) and torch.equal(dual_out, out)
