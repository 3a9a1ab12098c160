"""The README's Python, run: its two models compute what examples/skip_mlp.py's do (which
tests/test_skip_mlp_example.py checks against the reference), its API listing gives the package's
own signatures, and its fuse() lines run. A README edited apart from the code fails here."""

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fusedskip

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


def _block(marker):
    """The README's one Python block containing `marker`."""
    found = [block for block in BLOCKS if marker in block]
    assert len(found) == 1, f"README.md: {len(found)} Python blocks contain {marker!r}"
    return found[0]


def _module_from(path):
    spec = importlib.util.spec_from_file_location(path.stem + "_for_readme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["AddSkipMLP", "ConcatSkipMLP"])
def test_readme_models_are_the_example_models(name):
    """The same layers (types, widths, options) and the same forward: with the example model's
    parameters, the same output and gradients, to the bit (the same ops in the same order)."""
    readme = {}
    exec(compile(_block(f"class {name}"), "README.md", "exec"), readme)
    example = getattr(_module_from(ROOT / "examples" / "skip_mlp.py"), name)(fusedskip)
    model = readme[name]()
    model.load_state_dict(example.state_dict())  # strict: the same parameter names and shapes
    layers, example_layers = dict(model.named_children()), dict(example.named_children())
    assert layers.keys() == example_layers.keys()
    for key, layer in layers.items():
        other = example_layers[key]
        assert type(layer) is type(other) and layer.extra_repr() == other.extra_repr(), key
    x = torch.randn(64, 30)
    out, expected = model(x), example(x)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), grad)
    expected_grads = torch.autograd.grad(expected, list(example.parameters()), grad)
    for (key, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        assert torch.equal(g, e), key


def _api_entries():
    """(dotted name, parameter list or None, the `.forward(...)` parameters its comment gives or
    None) for each statement of the API block that names a fusedskip object."""
    entries, statement = [], ""
    for line in _block("# functional:").splitlines():
        code = line.split("#", 1)[0]
        if not statement and not code.startswith("fusedskip."):
            continue
        statement += line + "\n"
        lines = [part.split("#", 1) for part in statement.splitlines()]
        head = " ".join(part[0] for part in lines)
        if head.count("(") > head.count(")"):
            continue  # the statement goes on
        comment = " ".join(part[1] for part in lines if len(part) > 1)
        forward = re.search(r"\.forward\((.*?)\)", comment)
        forward = forward.group(1) if forward else None
        call = re.match(r"(fusedskip(?:\.\w+)+)\((.*)\)\s*$", " ".join(head.split()))
        if call:
            entries.append((call.group(1), call.group(2), forward))
        else:  # a list of names
            entries += [(name.strip(), None, None) for name in head.split(",")]
        statement = ""
    assert not statement, f"README.md: unbalanced API statement {statement!r}"
    return entries


API = _api_entries()


def _resolve(dotted):
    obj = fusedskip
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _described(params):
    """A README parameter list as (name, kind, default) per parameter (annotations dropped;
    a `**kw` or `*args` is compared by kind only, its name being the reader's business)."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    out = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        kind = "positional" if arg in args.posonlyargs else "positional_or_keyword"
        out.append((arg.arg, kind, _literal(default)))
    if args.vararg:
        out.append(("*", "var_positional", inspect.Parameter.empty))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "keyword_only", _literal(default)))
    if args.kwarg:
        out.append(("**", "var_keyword", inspect.Parameter.empty))
    return out


def _literal(node):
    return inspect.Parameter.empty if node is None else ast.literal_eval(node)


def _actual(signature, drop_self=False):
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional",
             inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
             inspect.Parameter.VAR_POSITIONAL: "var_positional",
             inspect.Parameter.KEYWORD_ONLY: "keyword_only",
             inspect.Parameter.VAR_KEYWORD: "var_keyword"}
    params = list(signature.parameters.values())[1 if drop_self else 0:]
    return [({"var_positional": "*", "var_keyword": "**"}.get(kinds[p.kind], p.name),
             kinds[p.kind], p.default) for p in params]


def test_readme_api_listing_parses_into_entries():
    """The parser below finds every entry: the functions, the modules, their from_linear, the
    reference modules and the two queries (a listing it misread would check nothing)."""
    names = [name for name, _, _ in API]
    assert names == ["fusedskip.linear_relu_residual", "fusedskip.linear_concat",
                     "fusedskip.LinearReLUResidual", "fusedskip.ConcatLinear",
                     "fusedskip.LinearReLUResidual.from_linear",
                     "fusedskip.ConcatLinear.from_linear",
                     "fusedskip.reference.LinearReLUResidual", "fusedskip.reference.ConcatLinear",
                     "fusedskip.cuda_available", "fusedskip.extension_loaded"]
    assert [forward for _, _, forward in API if forward] == ["input, residual=None", "*inputs"]


@pytest.mark.parametrize("name,params,forward", API, ids=[entry[0] for entry in API])
def test_readme_api_listing_matches_the_package(name, params, forward):
    """Each listed callable exists with the parameters, kinds and defaults the README gives, and
    a module's `.forward(...)` with those of its forward."""
    obj = _resolve(name)
    if params is None:
        assert isinstance(obj, type) and issubclass(obj, nn.Module), name
        return
    assert _described(params) == _actual(inspect.signature(obj)), name
    if forward is not None:
        assert _described(forward) == _actual(inspect.signature(obj.forward), drop_self=True), \
            f"{name}.forward"


def test_readme_fuse_lines_run(capsys):
    """fuse() as the README shows it, on examples/fuse_existing_model.py's model: the report
    prints, and the fused model computes what the model does."""
    example = _module_from(ROOT / "examples" / "fuse_existing_model.py")
    model, x = example.ExistingModel(), torch.randn(16, 32)
    scope = {"fusedskip": fusedskip, "model": model, "x": x}
    exec(compile(_block("fusedskip.fuse("), "README.md", "exec"), scope)
    assert "fused" in capsys.readouterr().out
    torch.testing.assert_close(scope["fused"](x), model(x), rtol=1e-6, atol=1e-6)
