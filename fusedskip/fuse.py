"""fuse(): rewrite an existing model to use the fused layers, sharing its parameters.

A torch.fx pass over the model's graph finds

  * ``Linear -> ReLU -> + residual``  (order="relu_add")
  * ``Linear -> + residual -> ReLU``  (order="add_relu")
  * ``Linear -> ReLU``
  * ``torch.cat([...], -1) -> Linear`` (and a ReLU after it)

with ReLU as ``nn.ReLU``, ``F.relu``, ``torch.relu`` or ``.relu()`` (in place too), ``+`` /
``torch.add``, and ``torch.cat`` / ``concat`` / ``concatenate``, and replaces each with a
LinearReLUResidual or ConcatLinear that holds the Linear's own weight and bias (no copies).

A pattern is fused only where that is provably the same computation: the intermediate results
have no other users; the residual has exactly the linear's output shape and dtype (no
broadcasting, no type promotion) and is not itself part of the chain; the example's operands are
dense (strided) tensors; the concatenation runs along the last dim; nothing between the
pattern's first node and its last may write into a tensor the pattern reads (the fused layer
runs where the last one was); and the Linear and ReLU modules run no hooks (a fused layer would
not run them). Shapes come from ``example_inputs``, run on fake tensors (no arithmetic, so the
model's buffers, e.g. BatchNorm's running statistics, are left as they were); without them, the
patterns that need a shape (residuals, concatenations) are reported as skipped. Buffers are
traced as values of the graph, so updates a forward makes to them in place stay in the fused
model.

A fused layer takes the place of its Linear under the Linear's own name, so the state_dict keys stay
those of the model (``blocks.0.weight``) and state_dicts load across the two. A Linear called from
several places stays for the calls left unfused, and its fused call computes the layer's function
on the Linear's own parameters. The fused model holds all of the model's parameters and buffers,
forward's or not (an auxiliary head, a buffer another method reads), in the model's order: its
parameters() are the model's, for an optimizer. It runs forward only; the model's other methods
stay on the model, which shares the parameters.

Code that FX cannot trace is left alone: the model comes back unchanged, and the report says why.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import itertools
import operator
import re
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.compiler import is_compiling
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_variadic

from . import reference
from .modules import (ConcatLinear, LinearReLUResidual, linear_concat_layer,
                      linear_relu_residual_layer)
from .reference import MAX_INPUTS

__all__ = ["fuse", "FuseReport"]


class _Refusal(RuntimeError):
    """fuse()'s own reason for leaving a model unchanged, which says what to do: reported whole
    (another error's first line is cut to 200 characters)."""


def _reason(error: BaseException) -> str:
    if isinstance(error, _Refusal):
        return f"RuntimeError: {error}"
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _names(names: Sequence[str], shown: int = 4) -> str:
    """The first few names, and how many more: a long list would bury what to do."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclasses.dataclass
class FuseReport:
    """What fuse() did: `fused` holds (where, pattern, replacement), `skipped` (where, why);
    `traced` is False where fuse() returned the model itself (`skipped` says why)."""

    fused: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    traced: bool = True

    def skip(self, entry: Tuple[str, str]) -> None:
        """Records (where, why), once: both passes may see the same Linear."""
        if entry not in self.skipped:
            self.skipped.append(entry)

    def __str__(self) -> str:
        lines = [f"fusedskip.fuse: {len(self.fused)} fused, {len(self.skipped)} skipped"]
        lines += [f"  fused   {where}: {pattern} -> {replacement}"
                  for where, pattern, replacement in self.fused]
        lines += [f"  skipped {where}: {why}" for where, why in self.skipped]
        return "\n".join(lines)


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has hooks of its own (pruning and the old weight_norm are forward
    pre-hooks), which a fused layer in its place would not run."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as module_file
    return any(getattr(module_file, name, None) for name in (
        "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


# The ReLU's spellings. In place is fine on the chain: its input has no other user.
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)


def _runs_its_class_forward(module: nn.Module) -> bool:
    """Not a forward set on the instance (`m.forward = ...`, as adapters do), which the call runs
    instead of the class's."""
    return "forward" not in vars(module)


def _as_its_class_defines(module: Optional[nn.Module]) -> bool:
    """A leaf module that computes what its class says: no forward set on the instance, and no
    parametrization (spectral_norm's updates buffers of its own as it computes the weight)."""
    return module is not None and _runs_its_class_forward(module) and \
        not nn.utils.parametrize.is_parametrized(module)


def _is_relu(node: torch.fx.Node, modules) -> bool:
    if node.op == "call_module":
        module = modules.get(node.target)
        return type(module) is nn.ReLU and not _hooked(module) and _runs_its_class_forward(module)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_cat(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and \
        node.target in _CAT_FUNCTIONS


# In-place operators the tracer records as functions (`x += y`, `x[i] = y`: _RecordsWrites).
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}
# Functions named in place (a trailing `_`) known to write their first argument and nothing else;
# any other is taken to write all of them.
_WRITING_FIRST_ONLY = {torch.relu_, F.relu_}
# What makes a tensor use other memory (`Tensor.set_` and the like, by method, function or
# ATen op name).
_REBINDING = {"set_", "resize_", "resize_as_", "as_strided_", "swap_"}
# Functions whose behaviour is known (fusedskip's own write nothing they are given): anything
# else (an fx.wrap'd helper) may write anywhere (_may_write_anything).
_KNOWN_MODULES = ("torch", "_operator", "operator", "builtins", "math", "fusedskip")


def _known(target) -> bool:
    """Whether `target` comes from one of _KNOWN_MODULES or a module inside one: by whole names,
    so torchvision, torch_scatter or a user's torch_helpers are not torch."""
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in _KNOWN_MODULES


def _node_args(node: torch.fx.Node) -> List[torch.fx.Node]:
    found: List[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


_TENSOR_ATTRIBUTES = frozenset(dir(torch.Tensor))  # not hasattr: a class has its type's __call__


def _opaque_method(node: torch.fx.Node) -> bool:
    """Whether a call_method node may run code the graph does not show: a method torch.Tensor
    does not have (an object's passed to forward, a tensor subclass's own), or any method of a
    forward argument not known to be a tensor (no example, or not a tensor in it: an object
    whose `double` is its own)."""
    target = node.args[0] if node.args else None
    return not (isinstance(node.target, str) and node.target in _TENSOR_ATTRIBUTES) or (
        isinstance(target, torch.fx.Node) and target.op == "placeholder" and _meta(target) is None)


@functools.lru_cache(maxsize=None)
def _schema_writes(target) -> bool:
    """Whether a torch built-in (it has no signature to read) is an ATen op whose schema writes
    one of its arguments (`Tensor(a!)`); the `out=` overloads left out, as an `out=` call is
    recognised by its keyword."""
    if not isinstance(target, types.BuiltinFunctionType) or \
            not (getattr(target, "__module__", None) or "").startswith("torch"):
        return False
    try:
        packet = getattr(torch.ops.aten, target.__name__)
        return any(getattr(packet, name)._schema.is_mutable for name in packet.overloads()
                   if not name.endswith("out"))
    except (AttributeError, RuntimeError):  # no ATen op of that name
        return False


def _written(node: torch.fx.Node, modules) -> List[torch.fx.Node]:
    """The nodes whose tensors `node` may write into: its first argument for an in-place method,
    function or module (`mul_`, `torch.relu_`, `x += y`, `x[i] = y`, `inplace=True` by keyword or
    position, `nn.ReLU(inplace=True)`), `out=`, the arguments _FUNCTIONS_WRITING_ARGUMENTS name,
    and every argument of an op whose schema mutates, of a function this pass does not know, or
    of a module with a forward or hooks of its own."""
    if "out" in node.kwargs:
        return _node_args(node)
    first: List[torch.fx.Node] = []  # the written argument: a tensor, or a list of them
    if node.args:
        torch.fx.node.map_arg(node.args[0], first.append)
    else:  # all by keyword (`relu(input=x)`): whichever of them it is
        first = _node_args(node)
    if node.op == "call_method":
        name = node.target
        if _opaque_method(node):  # it may write what it is given
            return _node_args(node)
        in_place = (name.endswith("_") and not name.startswith("__")) or name == "__setitem__" \
            or (name.startswith("__i") and name.endswith("__"))
        return first if in_place else []
    if node.op == "call_module":
        module = modules.get(node.target)
        if module is not None and (not _runs_its_class_forward(module) or _hooked(module)):
            written = _node_args(node)  # a forward or hook of its own may write what it is given
        else:
            written = first if getattr(module, "inplace", False) else []
        own = _state_it_may_write(module)
        if own:  # the graph's reads of that state
            written += [n for n in node.graph.find_nodes(op="get_attr")
                        if id(_attribute(node.graph.owning_module, n.target)) in own]
        return written
    if node.op != "call_function":
        return []
    target = node.target
    if target in _FUNCTIONS_WRITING_ARGUMENTS:  # F.batch_norm(x, mean, var, training=True)
        try:
            call = inspect.signature(target).bind(*node.args, **node.kwargs)
        except TypeError:
            return _node_args(node)
        call.apply_defaults()
        return [call.arguments[k] for k in _FUNCTIONS_WRITING_ARGUMENTS[target](call.arguments)
                if isinstance(call.arguments.get(k), torch.fx.Node)]
    if _updates_statistics_unannounced(target):
        return _node_args(node)
    if target in _INPLACE_OPERATORS or node.kwargs.get("inplace", False):
        return first
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        overloads = ([target] if isinstance(target, torch._ops.OpOverload) else
                     [getattr(target, name) for name in target.overloads()])
        return _node_args(node) if any(op._schema.is_mutable for op in overloads) else []
    if _schema_writes(target):  # torch.fused_moving_avg_obs_fake_quant(...) updates its min/max
        return _node_args(node)
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):
        # torch.relu_(x) writes x; others write more than their first argument
        # (torch._amp_foreach_non_finite_check_and_unscale_ writes its found_inf too).
        return first if target in _WRITING_FIRST_ONLY else _node_args(node)
    if not _known(target):
        return _node_args(node)
    try:  # inplace=True passed by position (F.relu(x, True))
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # no signature (a builtin), or not these arguments
        return []
    return first if bound.arguments.get("inplace", False) else []


# Leaf modules that write none of their own parameters and buffers in forward (BatchNorm updates
# its running statistics, Embedding(max_norm=...) renormalises its weight: any other may).
_STATELESS_MODULES = (nn.Linear, LinearReLUResidual, ConcatLinear, nn.modules.conv._ConvNd,
                      nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                      nn.Identity, nn.Dropout)


def _running_statistics(arguments) -> Tuple[str, ...]:
    """Updated unless told not to (training=False, use_input_stats=False)."""
    if arguments.get("training", arguments.get("use_input_stats")) is False:
        return ()
    return ("running_mean", "running_var")


def _renormalised_weight(arguments) -> Tuple[str, ...]:
    """With max_norm, the rows looked up are renormalised in place (a Linear's weight, where the
    two are tied)."""
    return ("weight",) if arguments.get("max_norm") is not None else ()


# Functions that write some of their arguments in place, each with which of them a call's
# arguments make it write: F.batch_norm(x, mean, var, training=True) updates mean and var.
_FUNCTIONS_WRITING_ARGUMENTS = {F.batch_norm: _running_statistics,
                                F.instance_norm: _running_statistics,
                                F.embedding: _renormalised_weight,
                                F.embedding_bag: _renormalised_weight}


def _updates_statistics_unannounced(target) -> bool:
    """torch.batch_norm, torch.instance_norm, torch.ops.aten.native_batch_norm, ...: ATen's norms
    update the running statistics they are given in place, yet their schemas carry no `(a!)` to
    say so and the torch.* builtins have no signature to bind (F.batch_norm, above, has one)."""
    name = getattr(target, "__name__", "")
    return ("batch_norm" in name or "instance_norm" in name) and (
        isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
        or getattr(target, "__module__", None) == "torch")


def _state_it_may_write(module: Optional[nn.Module]) -> set:
    """The ids of the parameters and buffers a leaf module's forward (or its hooks) may write."""
    if module is None or (isinstance(module, _STATELESS_MODULES) and
                           _as_its_class_defines(module) and not _hooked(module)):
        return set()
    return {id(t) for t in itertools.chain(module.parameters(), module.buffers())}


def _attribute(root, target: str):
    try:
        value = root
        for name in target.split("."):
            value = getattr(value, name)
        return value
    except AttributeError:
        return None


# Ops whose result is a new tensor, sharing memory with none of their inputs (where they do not
# work in place, which _written tells).
_FRESH_MODULES = (nn.Linear, LinearReLUResidual, ConcatLinear, nn.modules.conv._ConvNd,
                  nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
                  nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_FRESH_FUNCTIONS = {F.linear, torch.cat, torch.concat, torch.concatenate, torch.add, torch.sub,
                    torch.mul, torch.matmul, torch.relu, F.relu, F.gelu, F.silu, torch.tanh,
                    torch.sigmoid, F.layer_norm, operator.add, operator.sub, operator.mul,
                    operator.truediv, operator.matmul}
_FRESH_METHODS = {"add", "sub", "mul", "matmul", "relu", "clone"}


def _fresh_base(node, modules) -> Optional[torch.fx.Node]:
    """The node that made `node`'s tensor, where that provably made a new one: through in-place
    ops (whose result is their first argument) back to a Linear, an arithmetic op, a cat, ..."""
    while isinstance(node, torch.fx.Node):
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and not _runs_its_class_forward(module):
            return None  # a forward of its own may return anything, its argument included
        if _rebinds(node):
            return None  # its result uses the memory of another tensor
        written = _written(node, modules)
        if written:  # in place: the result is the tensor written, if that is the first argument
            if len(written) != 1 or not node.args or written[0] is not node.args[0]:
                return None
            node = node.args[0]
            continue
        if node.op == "call_module":
            fresh = isinstance(modules.get(node.target), _FRESH_MODULES)
        elif node.op == "call_function":
            # Python's operators also join lists and tuples (`rs + []` holds rs's tensors): a
            # new tensor only where the run of example_inputs saw one.
            fresh = node.target in _FRESH_FUNCTIONS and (
                getattr(node.target, "__module__", None) != "_operator"
                or isinstance(_meta(node), TensorMetadata))
        else:
            fresh = node.op == "call_method" and node.target in _FRESH_METHODS
        return node if fresh else None
    return None


def _rebinds(node: torch.fx.Node) -> bool:
    """Whether `node` may make a tensor use other memory (`y.set_(r)`, `resize_`): from there on,
    a write into `y` writes `r`, which no argument of the write names."""
    name = node.target if node.op == "call_method" else \
        getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return isinstance(name, str) and name.split(".")[0] in _REBINDING


def _may_write_anything(node: torch.fx.Node, modules) -> bool:
    """Code the graph does not show, which may write any tensor it can reach (through a
    closure, a module attribute): a leaf module's hooks or a forward set on the instance, a
    function this pass does not know (an fx.wrap'd helper); and an op that makes a tensor use
    other memory, after which a write into one tensor may land in another."""
    if _rebinds(node):
        return True
    if node.op == "call_module":
        module = modules.get(node.target)
        return module is not None and (_hooked(module) or not _runs_its_class_forward(module))
    if node.op == "call_method":
        return _opaque_method(node)
    if node.op == "call_function" and not isinstance(
            node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return not _known(node.target)
    return False


def _before(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether node `a` comes before node `b` in their graph."""
    node = a.next
    while node.op != "root":
        if node is b:
            return True
        node = node.next
    return False


def _write_between(first: torch.fx.Node, last: torch.fx.Node, chain, modules, linear: nn.Linear,
                   residual=None, add=None):
    """A node after `first` and before `last` (graph order) that may write into a tensor the
    pattern reads, if any: the fused call runs where `last` is, so it would read what such a node
    wrote, where `first` read the value before. A write into a tensor made after `first` (an
    in-place ReLU on another branch's Linear) reaches nothing the pattern read there; but the
    `residual`, read at `add` (before `last` in the add_relu order), may be such a tensor: after
    the add, a write may touch only a tensor provably not the residual's. Nor may a leaf module
    that may write its own state (not _STATELESS_MODULES) share a tensor with `linear`."""
    shared = {id(p) for p in linear.parameters()}
    after_first, after_add = set(), False
    residual_base = _fresh_base(residual, modules) if residual is not None else None
    node = first.next
    while node is not last:
        after_first.add(node)
        if node not in chain and _may_write_anything(node, modules):
            return node
        if node not in chain and node.op == "call_module" and \
                shared & _state_it_may_write(modules.get(node.target)):
            return node  # it may write the Linear's weight or bias (a tied Embedding(max_norm))
        if node not in chain:
            for target in _written(node, modules):
                base = _fresh_base(target, modules)
                if base is None or base not in after_first:
                    return node
                # A tensor made at `base` may be the residual, or the residual a view of it,
                # unless the residual was made anew elsewhere or existed before `base`.
                if after_add and (residual_base is base or (
                        residual_base is None and _before(base, residual))):
                    return node
        after_add = after_add or node is add
        node = node.next
    return None


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2 \
        and not node.kwargs


def _linear(node: torch.fx.Node, modules) -> Optional[nn.Linear]:
    """The Linear a call_module node calls: any the tracer keeps whole (torch.nn's own, and its
    parametrized or instance-patched forms, which _linear_problem refuses by name; a subclass
    defined elsewhere is traced into)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    return module if isinstance(module, nn.Linear) else None


def _linear_problem(linear: nn.Linear) -> Optional[str]:
    """Why a fused layer cannot stand in for `linear`, if it cannot."""
    if not _runs_its_class_forward(linear):
        return ("the Linear's forward is set on the instance (as adapters do), which a fused "
                "layer would not run")
    if nn.utils.parametrize.is_parametrized(linear):
        return ("the Linear is parametrized (torch.nn.utils.parametrize, e.g. "
                "parametrizations.weight_norm): a fused layer would not compute its weight")
    if type(linear) is not nn.Linear:
        return f"the Linear is a {type(linear).__qualname__}, not nn.Linear itself"
    if _hooked(linear):
        return ("the Linear has hooks (e.g. from torch.nn.utils.prune or weight_norm), which a "
                "fused layer would not run")
    if not all(p is None or isinstance(p, nn.Parameter) for p in (linear.weight, linear.bias)):
        return "the Linear's weight or bias is not an nn.Parameter"
    expected = (linear.out_features, linear.in_features)
    if tuple(linear.weight.shape) != expected:
        return (f"the Linear's weight has shape {tuple(linear.weight.shape)}, not (out_features, "
                f"in_features) = {expected}")
    if not linear.weight.is_floating_point():
        return f"the Linear's weight has dtype {linear.weight.dtype}, not a floating-point one"
    return None


def _hooked_relu(node: torch.fx.Node, modules) -> bool:
    module = modules.get(node.target) if node.op == "call_module" else None
    return isinstance(module, nn.ReLU) and _hooked(module)


_HOOKED_RELU = "the ReLU module has hooks, which a fused layer would not run"


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _meta(node) -> Optional[TensorMetadata]:
    """The tensor the run of example_inputs saw at `node`; None where it saw none (ShapeProp
    also records tuples and lists of them, an object with a tensor's methods)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


# The fused model's layers. fuse() proves a pattern's operands fit the fused op on the example
# only: a later call may bring a residual the model's add broadcasts (a batch added to an
# unbatched example), operands its add or cat promotes (a model converted to another dtype whose
# forward fixes a residual's), a sparse input its linear takes, or a concat whose inputs split
# in_features otherwise. Such a call runs the model's own ops, checked for before the call: a
# refusal caught from the op instead costs nothing until it happens, but torch.jit.trace
# crashes on an error caught inside a trace, and export and compile trace the op's fake kernel,
# which raises. The check is one C call where it can vouch for the call (~0.3 us; Python
# behind it: benchmarks/results/x86-64-2026-11-29/fuse-guard/).
# A sparse residual still reaches the fused layer, which refuses it: eager's add takes one in one
# order of operands only, which fuse() does not keep.


def _takes(tensor, weight) -> bool:
    """Whether the fused op takes `tensor` beside `weight`: dense, and outside autocast of the
    weight's dtype (under it the op casts as eager does: csrc/autocast.cpp)."""
    return isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and (
        tensor.dtype == weight.dtype or reference._autocast_on(weight))


try:  # the common case in one C call (csrc/python_bindings.cpp)
    from ._C import operands_fit as _operands_fit
except ImportError:  # the extension is not built, or cannot be loaded here
    _operands_fit = None


def _fit_here(inputs, weight, residual=None, widths=None) -> bool:
    """The C check: True only where the Python one would pass. Not under torch.compile, which
    would break the graph at a C function it cannot trace."""
    return _operands_fit is not None and not is_compiling() and \
        _operands_fit(inputs, weight, residual, widths)


def _relu_residual_fits(input, weight, residual) -> bool:
    if _fit_here((input,), weight, residual):
        return True
    if not _takes(input, weight):
        return False
    if residual is None:
        return True
    if not isinstance(residual, torch.Tensor):  # a number, which the model's add takes
        return False
    return residual.layout != torch.strided or (  # the layer's own refusal, see above
        residual.dim() == input.dim() and residual.shape[:-1] == input.shape[:-1]
        and residual.shape[-1] == weight.shape[0] and _takes(residual, weight))


def _model_relu_residual(input, weight, bias, residual, order):
    out = F.linear(input, weight, bias)
    if residual is None:
        return torch.relu(out)
    return torch.relu(out) + residual if order == "relu_add" else torch.relu(out + residual)


def _model_concat(inputs, weight, bias, activation):
    out = F.linear(torch.cat(list(inputs), -1), weight, bias)
    return torch.relu(out) if activation == "relu" else out


def _relu_residual(input, weight, bias=None, residual=None, *, order="relu_add"):
    """linear_relu_residual_layer, or the model's ops for a call it would refuse (above)."""
    if has_torch_function_variadic(input, weight, bias, residual):
        args = (input, weight, bias, residual)
        return handle_torch_function(_relu_residual, args, *args, order=order)
    if not _relu_residual_fits(input, weight, residual):
        return _model_relu_residual(input, weight, bias, residual, order)
    return linear_relu_residual_layer(input, weight, bias, residual, order=order)


def _concat(inputs, weight, bias=None, *, activation=None):
    """linear_concat_layer, or the model's ops for a call it would refuse (above)."""
    relevant = reference.concat_dispatch_args(inputs, weight, bias)
    if has_torch_function(relevant):
        return handle_torch_function(_concat, relevant, inputs, weight, bias,
                                     activation=activation)
    if not (_fit_here(inputs, weight) or all(_takes(x, weight) for x in inputs)):
        return _model_concat(inputs, weight, bias, activation)
    return linear_concat_layer(inputs, weight, bias, activation=activation)


class _FusedLinearReLUResidual(LinearReLUResidual):
    """The LinearReLUResidual fuse() puts in a Linear's place: the model's ops for a call the
    layer would refuse (above). Named as the layer it is."""

    def forward(self, input, residual=None):
        weight, bias = self.weight, self.bias
        if not _relu_residual_fits(input, weight, residual):
            return _model_relu_residual(input, weight, bias, residual, self.order)
        return linear_relu_residual_layer(input, weight, bias, residual, order=self.order)

    def _get_name(self):
        return "LinearReLUResidual"


class _FusedConcatLinear(ConcatLinear):
    """The ConcatLinear fuse() puts in a Linear's place: the model's ops for a call the layer
    would refuse (above), also one whose inputs split in_features otherwise (the model's cat and
    Linear take any split). Named as the layer it is."""

    def forward(self, *inputs):
        weight, bias = self.weight, self.bias
        if _fit_here(inputs, weight, None, self.in_features):  # the layer's checks too
            return linear_concat_layer(inputs, weight, bias, activation=self.activation)
        if not (all(_takes(x, weight) for x in inputs) and _widths_are(inputs, self.in_features)):
            return _model_concat(inputs, weight, bias, self.activation)
        return super().forward(*inputs)

    def _get_name(self):
        return "ConcatLinear"


def _widths_are(inputs, in_features) -> bool:
    """Whether each input is as wide as its block, where the C check (_fit_here) did not vouch;
    False where that is not known for sure, which sends the call to the model's ops: never
    wrong."""
    return len(inputs) == len(in_features) and all(
        isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == width
        for x, width in zip(inputs, in_features))


# The layers FX keeps whole, as torch.nn's: in a fused model they still run, hooks and all.
_OWN_LAYERS = (LinearReLUResidual, ConcatLinear, _FusedLinearReLUResidual, _FusedConcatLinear)


def _takes_the_linears_place(gm: torch.fx.GraphModule, base: str) -> bool:
    """Whether a fused layer may replace the Linear at `base` under its name: where the graph
    calls it once, and its parent is a container the GraphModule made for itself (a plain
    nn.Module, or the GraphModule). Where the parent is one of the model's own modules (one FX
    called whole, e.g. a TransformerEncoderLayer whose linear1 the model also calls), the
    GraphModule shares it with the model, and replacing its child would change the model."""
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == base)
    parent = gm.get_submodule(base.rpartition(".")[0])
    return calls == 1 and (parent is gm or type(parent) is nn.Module)


def _chain(first: torch.fx.Node, last: torch.fx.Node) -> List[torch.fx.Node]:
    """The single-user chain first -> ... -> last."""
    chain = [first]
    while chain[-1] is not last:
        chain.append(next(iter(chain[-1].users)))
    return chain


def _replace(gm, first: torch.fx.Node, last: torch.fx.Node, module: nn.Module, args,
             base: str) -> str:
    """Compute `module` in place of the single-user chain first -> ... -> last: as a call of
    `module` under the Linear's name where it takes the Linear's place, else as a call of the
    layer's function on the Linear's own parameters (the Linear stays for its other calls, and
    the state_dict keeps the model's keys, once each). Returns what the report names."""
    chain = _chain(first, last)
    with gm.graph.inserting_before(last):  # every argument is defined before the chain's end
        if _takes_the_linears_place(gm, base):
            gm.add_submodule(base, module)
            new = gm.graph.call_module(base, tuple(args))
            what = f"{base} = {module}"
        else:
            weight = gm.graph.get_attr(f"{base}.weight")
            bias = gm.graph.get_attr(f"{base}.bias") if module.bias is not None else None
            if isinstance(module, ConcatLinear):
                function, kwargs = _concat, {"activation": module.activation}
                new = gm.graph.call_function(function, (list(args), weight, bias), kwargs)
            else:
                function, kwargs = _relu_residual, {"order": module.order}
                residual = args[1] if len(args) > 1 else None
                new = gm.graph.call_function(function, (args[0], weight, bias, residual), kwargs)
            parameters = f"{base}.weight" + (f", {base}.bias" if bias is not None else "")
            what = (f"{function.__name__}(..., {parameters}, "
                    f"{', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
    new.meta.update(last.meta)
    last.replace_all_uses_with(new)
    for node in reversed(chain):
        gm.graph.erase_node(node)
    return what


def _residual_of(add: torch.fx.Node, previous: torch.fx.Node):
    """The add's other operand, where it is a tensor from outside the chain: `h + h` adds the
    chain's own result, which no fused layer computes."""
    other = add.args[1] if add.args[0] is previous else add.args[0]
    return other if isinstance(other, torch.fx.Node) and other is not previous else None


def _not_dense(nodes) -> Optional[str]:
    """Why the fused op would refuse one of `nodes` as an operand, if it would: it takes dense
    (strided) tensors, where eager's add and linear also take sparse ones."""
    for node in nodes:
        layout = node.meta.get("fusedskip_layout") if isinstance(node, torch.fx.Node) else None
        if layout is not None and layout != torch.strided:
            return (f"{node.name} is a {layout} tensor in the example (the fused layers take "
                    "dense, strided tensors)")
    return None


def _same_size(a, b) -> bool:
    """Sizes that are equal for every input: equal ints, or the same expression in the symbols
    that stand for sizes the data decides (two different ones may differ)."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return str(a.node.expr) == str(b.node.expr)
    return isinstance(a, int) and isinstance(b, int) and a == b


def _residual_problem(output, residual, linear_input, no_shapes: str) -> Optional[str]:
    """Why `residual` cannot enter the fused layer whose output is `output` (the linear's), if it
    cannot: the fused op takes a residual of the output's exact shape and dtype."""
    meta_a, meta_b = _meta(output), _meta(residual)
    if meta_a is None or meta_b is None:
        return f"shapes unknown ({no_shapes}): the residual's shape cannot be checked"
    if len(meta_a.shape) != len(meta_b.shape) or not all(
            map(_same_size, meta_a.shape, meta_b.shape)):
        return (f"residual shape {tuple(meta_b.shape)} is not provably the output's "
                f"{tuple(meta_a.shape)} (broadcasting is not fused)")
    if residual is not linear_input and any(
            isinstance(size, int) and size == 1 for size in meta_a.shape[:-1]):
        # A size 1 in the example cannot tell a residual that broadcasts along that dim (a
        # (1, T, D) parameter, a mean with keepdim) from one that always matches. The Linear's
        # own input always has the output's leading dims.
        return (f"the example's output has a leading dim of size 1 {tuple(meta_a.shape)}, which "
                "cannot tell a broadcasting residual from an equal one: pass example_inputs "
                "whose batch dims are larger than 1")
    if meta_a.dtype != meta_b.dtype:
        return f"residual dtype {meta_b.dtype} differs from the output's {meta_a.dtype}"
    return _not_dense([residual])


def _fuse_linear_chains(gm, modules, report: FuseReport, no_shapes: str):
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        x = node.args[0]
        linear = _linear(node, modules)
        if linear is None:
            continue
        user = _only_user(node)
        if user is None:
            if len(node.users) > 1:
                report.skip((node.name, "the linear's output has several users"))
            continue
        if _hooked_relu(user, modules) or (
                _is_add(user) and _only_user(user) is not None
                and _hooked_relu(_only_user(user), modules)):
            report.skip((node.name, _HOOKED_RELU))
            continue
        relu = add = None
        if _is_relu(user, modules):
            relu = user
            after = _only_user(relu)
            if after is not None and _is_add(after) and _residual_of(after, relu) is not None:
                add = after
            order = "relu_add"
        elif _is_add(user) and _residual_of(user, node) is not None:
            add = user
            after = _only_user(add)
            if after is None or not _is_relu(after, modules):
                continue  # linear + add without a ReLU: nothing to fuse
            relu = after
            order = "add_relu"
        else:
            continue
        last = relu if order == "add_relu" or add is None else add
        residual = _residual_of(add, relu if order == "relu_add" else node) if add else None
        if residual is not None:
            problem = _residual_problem(node, residual, x, no_shapes)
            if problem:
                report.skip((node.name, problem))
                if order == "add_relu":
                    continue
                last, residual = relu, None  # still fuse Linear -> ReLU
        problem = _linear_problem(linear) or _not_dense([x])
        if problem:
            report.skip((node.name, problem))
            continue
        writer = _write_between(node, last, _chain(node, last), modules, linear, residual,
                                add if order == "add_relu" else None)
        if writer is not None and last is add and order == "relu_add" \
                and _write_between(node, relu, _chain(node, relu), modules, linear) is None:
            # The write falls between the ReLU and the add: Linear -> ReLU alone is safe.
            report.skip((node.name, f"{writer.name} may write in place before the "
                                    f"add {add.name}: only Linear -> ReLU fused"))
            last, residual, writer = relu, None, None
        if writer is not None:
            report.skip((node.name, f"{writer.name} may write in place between the "
                                    f"Linear and {last.name}, whose values the fused "
                                    "layer would read after it"))
            continue
        fused = _FusedLinearReLUResidual.from_linear(linear, order=order)
        pattern = ("Linear -> ReLU" if residual is None else
                   "Linear -> ReLU -> add" if order == "relu_add" else "Linear -> add -> ReLU")
        args = (x,) if residual is None else (x, residual)
        report.fused.append((node.name, pattern, _replace(gm, node, last, fused, args,
                                                          node.target)))


def _fuse_concats(gm, modules, report: FuseReport, no_shapes: str):
    for node in list(gm.graph.nodes):
        if not _is_cat(node):
            continue
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim",
                                                                      node.kwargs.get("axis", 0))
        user = _only_user(node)
        if user is None or user.args != (node,) or user.kwargs:
            continue
        linear = _linear(user, modules)
        if linear is None:
            continue
        problem = _linear_problem(linear) or (
            "torch.cat with out= (the buffer must receive the concatenation)"
            if "out" in node.kwargs else None)
        if problem:
            report.skip((user.name, problem))
            continue
        if not isinstance(parts, (list, tuple)):
            report.skip((user.name, "the concatenated tensors come as one value (e.g. "
                                    "x.chunk(...)), not a list: their number is not "
                                    "known when tracing"))
            continue
        metas = [_meta(p) for p in parts]
        if any(m is None for m in metas):
            report.skip((user.name, f"shapes unknown ({no_shapes}): the concatenated "
                                    "widths cannot be read"))
            continue
        ndim = len(metas[0].shape)
        if any(len(m.shape) != ndim or not all(map(_same_size, m.shape[:-1], metas[0].shape[:-1]))
               for m in metas):
            report.skip((user.name, "the concatenated tensors' leading dims are not "
                                    "provably the same (torch.cat also takes empty 1-D "
                                    "tensors)"))
            continue
        if dim not in (-1, ndim - 1):
            report.skip((user.name, f"torch.cat along dim {dim}, not the last"))
            continue
        if not 1 <= len(parts) <= MAX_INPUTS:
            report.skip((user.name, f"{len(parts)} concatenated inputs (at most "
                                    f"{MAX_INPUTS} are fused)"))
            continue
        if len({m.dtype for m in metas}) != 1:
            report.skip((user.name, "concatenated inputs of different dtypes"))
            continue
        problem = _not_dense(parts)
        if problem:
            report.skip((user.name, problem))
            continue
        if not all(isinstance(m.shape[-1], int) for m in metas):
            report.skip((user.name, "a concatenated width depends on the data"))
            continue
        widths = [int(m.shape[-1]) for m in metas]
        if sum(widths) != linear.in_features:  # the example does not fit the model
            report.skip((user.name, f"the concatenated widths {widths} sum to {sum(widths)}, "
                                    f"not the Linear's in_features {linear.in_features}"))
            continue
        relu = _only_user(user)
        activation = "relu" if relu is not None and _is_relu(relu, modules) else None
        last = relu if activation else user
        writer = _write_between(node, last, _chain(node, last), modules, linear)
        if writer is not None:
            report.skip((user.name, f"{writer.name} may write in place between the "
                                    f"concatenation and {last.name}, whose values the "
                                    "fused layer would read after it"))
            continue
        fused = _FusedConcatLinear.from_linear(linear, widths, activation=activation)
        pattern = "cat -> Linear" + (" -> ReLU" if activation else "")
        report.fused.append((user.name, pattern, _replace(gm, node, last, fused, tuple(parts),
                                                          user.target)))


class _ShapeProp(ShapeProp):
    """ShapeProp that knows which node it is running, to say where a run failed, and that does
    not run a leaf module's forward set on the instance: the fake copy of the model keeps it,
    and it may reach the model's real tensors (an adapter's closure does), which the fake run
    must not touch."""

    node: Optional[torch.fx.Node] = None

    def run_node(self, n):
        self.node = n
        if n.op == "call_module" and not _runs_its_class_forward(self.fetch_attr(n.target)):
            raise _Refusal(f"{n.target}'s forward is set on the instance, which the fake run "
                           "does not enter (it may reach the model's real tensors)")
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["fusedskip_layout"] = result.layout  # tensor_meta has no layout
        return result


def _propagate_shapes(gm: torch.fx.GraphModule, args) -> Optional[str]:
    """Each node's tensor_meta, from a run on a fake copy of the model: shapes without arithmetic
    and without touching the model's state (buffers, RNG). Tensors anywhere in the arguments
    (dicts, lists) are made fake; a shape that depends on the data (nonzero, a boolean mask)
    becomes a symbol instead of failing the run. A node the run cannot take (a leaf module's
    forward set on the instance, say) ends it there: the nodes before it keep their shapes, and
    the reason is returned."""
    # Imported here: symbolic_shapes brings in sympy, ~0.3 s that `import fusedskip` need not pay.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    prop = None
    try:
        mode = FakeTensorMode(shape_env=ShapeEnv())
        fake_args = pytree.tree_map_only(
            torch.Tensor, lambda t: mode.from_tensor(t, static_shapes=True), args)
        prop = _ShapeProp(gm, fake_mode=mode)
        # ShapeProp prints the traceback of a failure itself; the report says what failed.
        with contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*fake_args)
    except Exception as error:
        cause = error.__cause__ or error  # ShapeProp wraps the error with the failing node
        what = _reason(cause)
        if prop is None or prop.node is None:
            for node in gm.graph.nodes:
                node.meta.pop("tensor_meta", None)
            return f"shape propagation failed ({what}); shape-dependent patterns skipped"
        return (f"shape propagation stopped at {prop.node.name} ({what}); shape-dependent "
                "patterns from there on skipped")
    return None


def _in_place_operator(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


class _RecordsWrites:
    """What a traced value does beyond FX's Proxy: records `x += y` (and every augmented
    assignment, set below) as the in-place operator it is (FX's Proxy records an out-of-place
    add, so the write vanished from the graph), records `x[i] = y` (FX's Proxy cannot: the trace
    failed), refuses attribute assignment (`self.buffer.data = t`), which a graph cannot record,
    and hands out its attributes (`x.T`, `x.data`: views, which `v = x.T; v += 1` writes
    through) as values that do the same."""

    _OWN_ATTRIBUTES: Tuple[str, ...] = ("node", "tracer")  # FX's Proxy's own

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __setattr__(self, name, value):
        if name not in self._OWN_ATTRIBUTES:
            raise _Refusal(f"forward sets the attribute {name!r} of a traced tensor (e.g. "
                           "`buffer.data = ...`), which a traced graph cannot do")
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        return _StrictAttribute(self, name)


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift"):
    setattr(_RecordsWrites, f"__i{_name}__", _in_place_operator(getattr(operator, f"i{_name}")))


class _StrictProxy(_RecordsWrites, torch.fx.Proxy):
    """A traced value (_RecordsWrites)."""


class _StrictAttribute(_RecordsWrites, torch.fx.proxy.Attribute):
    """An attribute of a traced value (`x.T`), itself a traced value (_RecordsWrites); as in
    FX, its node is made where it is used as a value, and a call of it (`x.add_(1)`) is a
    method call."""

    _OWN_ATTRIBUTES = ("tracer", "root", "attr", "_node")  # FX's Attribute's own


@contextlib.contextmanager
def _autocast_flipped():
    """Autocast switched the other way on the CPU and CUDA, by its flags alone (a trace casts
    nothing; and torch.autocast("cuda") would refuse to switch on without a GPU)."""
    before = {device: torch.is_autocast_enabled(device) for device in ("cpu", "cuda")}
    try:
        for device, enabled in before.items():
            torch.set_autocast_enabled(device, not enabled)
        yield
    finally:
        for device, enabled in before.items():
            torch.set_autocast_enabled(device, enabled)
        # A real op on a parameter meanwhile left its cast copy in autocast's cache, which no
        # exit of an autocast region would clear: a later region would use it after the
        # parameter changed.
        torch.clear_autocast_cache()


def _modes() -> Tuple:
    """The grad and autocast state, which a graph does not record."""
    return (torch.is_grad_enabled(),) + tuple(
        (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda"))


class _Tracer(torch.fx.Tracer):
    """FX's tracer, refusing what a graph would silently leave out: attribute assignments on
    traced values, and code run under another grad or autocast mode than the rest
    (`torch.no_grad()` around an update, an autocast region), which a graph does not record."""

    def __init__(self, proxy_buffers: bool = True):
        super().__init__()
        self.proxy_buffer_attributes = proxy_buffers
        self.modes = _modes()

    def proxy(self, node):
        return _StrictProxy(node, self)

    def trace(self, root, concrete_args=None):
        self.held = {id(m): _held(m) for m in root.modules()}
        with _ComputesOnState({id(t) for t in itertools.chain(root.parameters(),
                                                             root.buffers())}):
            return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        if id(m) in self.held and _held(m) != self.held[id(m)]:
            raise _Refusal(f"{type(m).__name__} is called with parameters or buffers other "
                           "than its own (torch.func.functional_call, a swap in forward), "
                           "which a traced graph's call of the module leaves out")
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m, module_qualified_name):
        # fusedskip's own layers stay whole, as torch.nn's do: in the fused model they are still
        # the modules that run (their hooks too), not containers of a traced-in function's
        # parameters.
        return type(m) in _OWN_LAYERS or \
            super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args, **kwargs):
        if _modes() != self.modes:
            raise _Refusal("forward runs part of itself under another grad or autocast mode "
                           "(torch.no_grad(), torch.autocast(...)), which a traced graph "
                           "does not record")
        return super().create_node(*args, **kwargs)


class _ComputesOnState(torch.overrides.TorchFunctionMode):
    """Refuses an op that runs, while tracing, on the model's real parameters or buffers and
    gives a tensor: one reached other than as an attribute (a loop over self.parameters()),
    which FX does not trace, so the result would be frozen into the graph as a constant of
    today's values. (Attribute reads give traced values; in-place writes are _ModelState's.)"""

    def __init__(self, watched):
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if isinstance(result, torch.Tensor) and not isinstance(result, torch.fx.Proxy) and \
                not name.endswith("_") and any(
                    isinstance(t, torch.Tensor) and id(t) in self.watched
                    for t in pytree.tree_leaves((args, kwargs))):
            raise _Refusal(
                f"forward computes `{name or func}` on the model's parameters or buffers other "
                "than through their attributes (e.g. a loop over self.parameters()), which a "
                "trace would freeze at their values of now; read them as attributes "
                "(self.linear.weight)")
        return result


def _held(module: nn.Module) -> Dict[str, int]:
    """Which tensors a module holds as its parameters and buffers, by name (read from its own
    dicts: while tracing, attribute reads give proxies)."""
    return {name: id(t) for name, t in itertools.chain(module._parameters.items(),
                                                       module._buffers.items())}


def _code(graph: torch.fx.Graph) -> str:
    """The graph's code, tensor constants unnumbered (each trace adds its own to the root)."""
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", graph.python_code("self").src)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta:  # no values to compare (a model built on the meta device)
        return True
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def _holds_the_same(container, held) -> bool:
    """Whether a list, dict or set holds the very objects `held` (its earlier copy) holds: by
    identity (a traced value compares by building a node)."""
    if isinstance(container, dict):
        return container.keys() == held.keys() and all(container[k] is held[k] for k in held)
    if isinstance(container, set):
        return {id(v) for v in container} == {id(v) for v in held}
    return len(container) == len(held) and all(a is b for a, b in zip(container, held))


class _ModelState:
    """What tracing may change in a model and a graph does not record: each module's plain
    attributes (and what its public lists, dicts and sets hold: `self.log.append(h)`), which
    submodules and parameters it holds (`self.fc = self.fc2`, `self.fc.bias = None`), its
    buffers (which tensor, and its values) and training flag, and each parameter's
    requires_grad. `changed()` names what differs; `restore()` puts it back."""

    _SLOTS = ("_modules", "_parameters", "_buffers")

    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.attributes = [{k: v for k, v in vars(m).items() if k not in self._SLOTS}
                           for m in self.modules]
        self.contents = [{k: copy.copy(v) for k, v in attributes.items()
                          if not k.startswith("_") and type(v) in (list, dict, set)}
                         for attributes in self.attributes]
        self.buffers = [dict(m._buffers) for m in self.modules]
        self.held = [(dict(m._modules), dict(m._parameters)) for m in self.modules]
        self.values = [{k: v.detach().clone() for k, v in b.items() if v is not None}
                       for b in self.buffers]
        # A write through .data keeps the version; an in-place op may keep the values (zeros).
        self.versions = {id(v): v._version for b in self.buffers for v in b.values()
                         if v is not None}
        # Tensors held as plain attributes (`self.steps = torch.zeros(1)`) or in a public list,
        # dict or set: FX reads them as constants, so an in-place update in forward runs while
        # tracing and is left out of the graph.
        held = {}
        for module, attributes, contents in zip(self.modules, self.attributes, self.contents):
            for k, v in itertools.chain(attributes.items(), contents.items()):
                values = v.values() if isinstance(v, dict) else v if type(v) in (list, set) \
                    else [v]
                for t in values:
                    if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                        held.setdefault(id(t), (f"{type(module).__name__}.{k}", t, t._version,
                                                t.detach().clone()))
        self.held_tensors = list(held.values())
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def changed(self) -> List[str]:
        found = []
        for module, attributes, buffers, values in zip(self.modules, self.attributes,
                                                       self.buffers, self.values):
            where = type(module).__name__
            now = {k: v for k, v in vars(module).items() if k not in self._SLOTS}
            found += [f"{where}.{k}" for k in set(now) | set(attributes)
                      if not k.startswith("_tensor_constant")
                      and (k not in now or k not in attributes or now[k] is not attributes[k])]
            found += [f"{where}.{k}" for k, v in buffers.items()
                      if module._buffers.get(k) is not v
                      or (v is not None and (v._version != self.versions[id(v)]
                                             or not _same_tensor(v, values[k])))]
        for module, attributes, contents in zip(self.modules, self.attributes, self.contents):
            found += [f"{type(module).__name__}.{k}" for k, held in contents.items()
                      if not _holds_the_same(attributes[k], held)]
        for module, (children, parameters) in zip(self.modules, self.held):
            for now, before in ((module._modules, children), (module._parameters, parameters)):
                found += [f"{type(module).__name__}.{k}" for k in set(now) | set(before)
                          if k not in now or k not in before or now[k] is not before[k]]
        found += [name for name, t, version, _ in self.held_tensors if t._version != version]
        found += ["requires_grad" for p, flag in self.requires_grad if p.requires_grad != flag]
        return found

    def restore(self, keep_constants: bool = False) -> None:
        """keep_constants: leave FX's tensor constants on the root until a GraphModule has
        taken them."""
        for module, attributes, buffers, values in zip(self.modules, self.attributes,
                                                       self.buffers, self.values):
            for k in [k for k in vars(module) if k not in self._SLOTS and k not in attributes
                      and not (keep_constants and k.startswith("_tensor_constant"))]:
                delattr(module, k)  # what tracing added (FX's tensor constants, ...)
            module.__dict__.update(attributes)
            module._buffers.update(buffers)
            with torch.no_grad():
                for k, v in values.items():
                    if not _same_tensor(buffers[k], v):
                        buffers[k].copy_(v)
        for module, held in zip(self.modules, self.held):
            for now, before in zip((module._modules, module._parameters), held):
                now.clear()
                now.update(before)
        for attributes, contents in zip(self.attributes, self.contents):
            for k, held in contents.items():
                if not _holds_the_same(attributes[k], held):
                    attributes[k].clear()
                    if isinstance(held, list):
                        attributes[k].extend(held)
                    else:
                        attributes[k].update(held)
        with torch.no_grad():
            for _, t, _, value in self.held_tensors:
                if not _same_tensor(t, value):
                    t.copy_(value)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


def _carry_state(source: nn.Module, target: nn.Module, take=lambda value: value) -> None:
    """Give `target`, a GraphModule of `source`'s forward, all of `source`'s state, under the same
    names and in the same order. A GraphModule holds only what its graph reads: without this, a
    parameter or buffer forward leaves alone (an auxiliary head, a buffer another method reads)
    would be missing from parameters() (so from an optimizer) and from state_dict(). The modules
    and tensors are `take(...)` of source's (the same ones by default); a module source holds
    under two names is one module in target too; plain attributes come along where target has
    none of that name, buffers keep their persistence, a buffer only target has (one FX made of
    a plain tensor or a constant) becomes a plain tensor again (stays a buffer, out of the
    state_dict, where it is a plain tensor of a module with its own _apply); every module has
    source's training flag. Raises where a name is taken by the GraphModule's own attributes
    (graph, code, meta)."""

    def taken(where: nn.Module, path: str, key: str) -> RuntimeError:
        kind = type(getattr(where, key)).__name__
        return RuntimeError(f"the model's {path + '.' if path else ''}{key} has the name of an "
                            f"attribute of torch.fx's GraphModule ({kind}), which the fused "
                            "model is: rename it to fuse this model")

    placed = {}  # id of a source module -> what target holds for it
    for path, module in source.named_modules(remove_duplicate=False):
        parent, _, name = path.rpartition(".")
        try:
            held = target.get_submodule(path)
        except AttributeError:
            container = target.get_submodule(parent)
            if hasattr(container, name):
                raise taken(container, parent, name) from None
            alias = placed.get(id(module))
            container.add_module(name, take(module) if alias is None else alias)
            continue
        placed.setdefault(id(module), held)
        if path and held is take(module):  # the module itself (the root: the copy being made)
            continue
        held.training = module.training  # FX makes the containers it traced through in train mode
        for key, param in module._parameters.items():
            if key not in held._parameters:
                if hasattr(held, key):
                    raise taken(held, path, key)
                held.register_parameter(key, take(param))
        for key, buffer in module._buffers.items():
            if key not in held._buffers:
                if hasattr(held, key):
                    raise taken(held, path, key)
                held.register_buffer(key, take(buffer))
            if key in module._non_persistent_buffers_set:
                held._non_persistent_buffers_set.add(key)
        # FX makes a buffer of each tensor forward reads that is no parameter or buffer (a plain
        # attribute, a constant made in forward): as the model's plain tensors they stay out of
        # buffers() and state_dict(), and .to()/.half() leave them as the model's would. Not a
        # plain tensor of a module whose own _apply (what .to(), .double(), ... call) may convert
        # it: the plain container in its place would not, and a buffer follows .to() as such a
        # cache does.
        extra = [key for key in held._buffers if key not in module._buffers]
        if type(module)._apply is not nn.Module._apply:
            kept = [key for key in extra if held._buffers[key] is vars(module).get(key)]
            held._non_persistent_buffers_set.update(kept)
            extra = [key for key in extra if key not in kept]
        for key in extra:
            object.__setattr__(held, key, held._buffers.pop(key))
            held._non_persistent_buffers_set.discard(key)
        for key, value in vars(module).items():
            if not key.startswith("_") and not hasattr(held, key):
                setattr(held, key, take(value))
    for path, module in source.named_modules(remove_duplicate=False):  # all there now: the order
        held = target.get_submodule(path)
        for mine, theirs in ((held._modules, module._modules),
                             (held._parameters, module._parameters),
                             (held._buffers, module._buffers)):
            order = {key: i for i, key in enumerate(theirs)}
            items = sorted(mine.items(), key=lambda item: order.get(item[0], len(order)))
            mine.clear()
            mine.update(items)


# What a module may do its own way when saving or loading its state.
_STATE_DICT_METHODS = ("get_extra_state", "set_extra_state", "_save_to_state_dict",
                       "_load_from_state_dict", "state_dict", "load_state_dict")
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _state_dict_problem(model: nn.Module, gm: torch.fx.GraphModule) -> Optional[str]:
    """Why the fused model's state_dict would not be the model's, if it would not: a module FX
    traced through (the root among them) that saves or loads its state its own way, whose place
    in the fused model a plain container (at the root: the GraphModule) holds."""
    for path, module in model.named_modules():
        if path and gm.get_submodule(path) is module:
            continue
        custom = [name for name in _STATE_DICT_METHODS
                  if getattr(type(module), name) is not getattr(nn.Module, name)]
        custom += [name for name in _STATE_DICT_HOOKS if getattr(module, name, None)]
        if custom:
            return (f"{path or type(model).__name__} saves or loads its state its own way "
                    f"({', '.join(custom)}), which the container FX puts in its place would not: "
                    "the fused model's state_dict would not be the model's")
    return None


class _FusedModel(torch.fx.GraphModule):
    """What fuse() returns: a GraphModule running the fused graph that holds all of the model's
    state (_carry_state), through deepcopy and pickle too (GraphModule's own rebuild them from
    the graph, keeping only what it reads)."""

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        type(copied).__name__ = type(self).__name__  # GraphModule's copy names itself GraphModule
        # The rebuild deep-copied all of self.__dict__ under `memo`, so these are those copies.
        _carry_state(self, copied, lambda value: copy.deepcopy(value, memo))
        return copied

    def __copy__(self):
        # Sharing the graph, as GraphModule's copy does.
        copied = _FusedModel(self, self.graph, type(self).__name__)
        _carry_state(self, copied)
        copied.meta = self.meta
        return copied

    def __reduce__(self):
        rebuild, (body, import_block) = super().__reduce__()
        return (_unpickle_fused_model, (body, import_block, type(self).__name__))


def _unpickle_fused_model(body, import_block, class_name) -> _FusedModel:
    plain = torch.fx.graph_module.reduce_graph_module(body, import_block)
    source = nn.Module()
    source.__dict__ = body  # the pickled model's root, with all of its children and tensors
    fused = _FusedModel(source, copy.deepcopy(plain.graph), class_name)
    _carry_state(source, fused)
    fused.meta = plain.meta
    return fused


def _hooks_traced_through(model: nn.Module) -> List[str]:
    """Hooks that would run while tracing, on traced values, and be missing from the graph: on
    modules FX traces into (not leaves), and global module hooks (on every module)."""
    leaf = _Tracer().is_leaf_module
    found = [name or type(model).__name__ for name, m in model.named_modules()
             if (m is model or not leaf(m, name)) and _hooked(m)]
    return found + ["every module (global module hooks)"] if _global_module_hooks() else found


@functools.lru_cache(maxsize=None)
def _graph_module_attributes() -> frozenset:
    """The names a GraphModule uses itself: its class's and those its __init__ sets."""
    instance = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    return frozenset(dir(torch.fx.GraphModule)) | (set(vars(instance)) - set(vars(nn.Module())))


def _optional_parameters(model: nn.Module, example: Optional[tuple]) -> Tuple[dict, List[str]]:
    """forward's parameters whose default is None: those the example inputs (positional; None:
    no example) leave out or give as None, each mapped to None, and those they give. A traced
    value is never None, so `if x is not None:` always takes its branch: traced as a value, a
    parameter left out would make the graph fail, or compute the other branch, when called
    without it. So the first kind are specialised to None (torch.fx's concrete_args, which
    asserts the parameter is None), and the graph asserts the second kind are given. **kwargs
    would hide such a parameter: refused."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}, []
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise _Refusal("forward takes **kwargs, which a trace fixes at what it is given "
                       "(a `kwargs.get(name)` is never None in it)")
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    specialised, given = {}, []
    for i, p in enumerate(parameters):
        if p.default is not None:
            continue
        if example is None or p.kind not in positional or i >= len(example) or example[i] is None:
            specialised[p.name] = None
        else:
            given.append(p.name)
    return specialised, given


def _assert_given(value, name: str) -> None:
    if isinstance(value, torch.fx.Proxy):  # traced again (unpickling, fusing again): stay a node
        value.tracer.create_proxy("call_function", _assert_given, (value, name), {})
        return
    if value is None:
        raise ValueError(f"fusedskip.fuse: this model was fused for calls with `{name}` "
                         "(example_inputs gave it); fuse it with example_inputs that leave it "
                         "out for calls without it")


def _assert_left_out(value, name: str, keyword_only: bool) -> None:
    """In place of FX's own guard for a parameter specialised to None: that one, traced again
    when a fused model is unpickled, broke every later FX trace in the process."""
    if isinstance(value, torch.fx.Proxy):  # traced again: stay a node
        value.tracer.create_proxy("call_function", _assert_left_out, (value, name, keyword_only),
                                  {})
        return
    if value is not None:
        how = ("a keyword-only parameter, which example_inputs (positional) cannot give, so it "
               "is always fused at None; to fuse the model for calls with it, make it "
               "positional" if keyword_only else
               "example_inputs left it out; pass example_inputs that include it to fuse the "
               "model for calls with it")
        raise ValueError(f"fusedskip.fuse: this model was fused for calls without `{name}` "
                         f"({how})")


def _trace(model: nn.Module, example: Optional[tuple] = None) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace, made safe for what a graph cannot hold, leaving the model as it
    was (_ModelState) whatever happens.

    Buffers are traced as values of the graph first, so a forward that updates one in place
    (`self.steps.add_(1)`) keeps the update in the graph (FX's default reads buffers as plain
    tensors, which ran such an update once on the real buffer while tracing and left it out).
    Where that fails (a buffer in Python control flow: `int(self.n)`, `if self.initialized:`),
    FX's default is taken, but only if tracing changed nothing in the model. A forward that
    reads self.training in Python gets a graph fixed at one mode: the other mode is traced too,
    and the two must agree; so must a trace under no_grad (`torch.is_grad_enabled()` read in
    Python) and one with autocast switched (`torch.is_autocast_enabled()`). Like every FX
    trace, it patches torch.nn.Module calls for the whole process while it runs: run no other
    model in another thread meanwhile. `example`: the example inputs, if
    any (_optional_parameters)."""
    concrete, given = _optional_parameters(model, example)
    concrete = concrete or None
    keyword_only = {p.name for p in inspect.signature(model.forward).parameters.values()
                    if p.kind == inspect.Parameter.KEYWORD_ONLY} if concrete else set()
    scripted = [name or type(model).__name__ for name, m in model.named_modules()
                if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise _Refusal(f"TorchScript modules ({_names(scripted)}: torch.jit.script or "
                       "trace), which FX cannot trace: fuse the eager model; the fused layers "
                       "do not support torch.jit.script, but torch.jit.trace, torch.compile "
                       "and torch.export take the result")
    # Checked here too, not only where _carry_state meets them: a Linear named `code` that a
    # pattern reads broke the fusion's own graph edit first (an AttributeError out of fuse()).
    taken = [name for name in itertools.chain(model._modules, model._parameters, model._buffers)
             if name in _graph_module_attributes()]
    if taken:
        raise _Refusal(f"the model's {_names(taken)} has the name of an attribute of torch.fx's "
                       "GraphModule, which the fused model is: rename it to fuse this model")
    hooked = _hooks_traced_through(model)
    if hooked:
        raise _Refusal(f"hooks on {_names(hooked)}, which FX traces through: they would "
                       "run while tracing and be missing from the graph; fuse the model "
                       "without them (a leaf module's, such as an nn.Linear's, are kept)")
    if not isinstance(model, torch.fx.GraphModule) and (
            not _runs_its_class_forward(model) or type(model).__call__ is not nn.Module.__call__):
        raise _Refusal("a forward set on the model's instance, or a __call__ its class "
                       "defines, which a trace of the class's forward would leave out: fuse "
                       "the model it wraps, then wrap the result")
    state = _ModelState(model)
    try:
        with torch.enable_grad():
            tracer = _Tracer(proxy_buffers=True)
            try:
                graph = tracer.trace(model, concrete_args=concrete)
                proxied_error = None
            except Exception as error:
                proxied_error = error
                state.restore()
                tracer = _Tracer(proxy_buffers=False)
                try:
                    graph = tracer.trace(model, concrete_args=concrete)
                except Exception:
                    raise proxied_error from None

            def again():  # the graph in another mode, which must be the same
                try:
                    return _Tracer(proxy_buffers=tracer.proxy_buffer_attributes).trace(
                        model, concrete_args=concrete)
                except Exception:
                    return None

            for module in state.modules:
                module.training = not module.training
            other = again()
            for module, attributes in zip(state.modules, state.attributes):
                module.training = attributes["training"]
            with torch.no_grad():  # for a forward that reads the grad mode in Python
                without_grad = again()
            with _autocast_flipped():  # and one that reads the autocast state
                other_autocast = again()
        changed = state.changed()
        if changed and proxied_error is not None:
            raise proxied_error  # why the graph could not hold what forward changes
        if changed:
            raise _Refusal(f"forward changes {', '.join(sorted(set(changed)))} in a way a "
                           "traced graph cannot record (e.g. `self.count += 1` on a plain "
                           "attribute or a buffer; update buffers in place: "
                           "`self.count.add_(1)`)")
        if other is None or _code(other) != _code(graph):
            raise _Refusal("forward depends on self.training in Python (e.g. "
                           "F.dropout(x, p, self.training), `if self.training:`), which a "
                           "traced graph fixes at one mode; nn.Dropout and the like follow "
                           "the mode")
        if without_grad is None or _code(without_grad) != _code(graph):
            raise _Refusal("forward depends on the grad mode in Python (e.g. "
                           "`if torch.is_grad_enabled():`), which a traced graph fixes at "
                           "one mode")
        if other_autocast is None or _code(other_autocast) != _code(graph):
            raise _Refusal("forward depends on the autocast state in Python (e.g. "
                           "`if torch.is_autocast_enabled():`), which a traced graph fixes "
                           "at one state")
        state.restore(keep_constants=True)
        placeholders = list(graph.find_nodes(op="placeholder"))
        for node in placeholders:
            # FX names a specialised parameter's placeholder `<name>_1`: the signature keeps the
            # parameter's own name, so that a keyword call (`mask=None`) still works.
            name = node.target[:-len("_1")] if node.target.endswith("_1") else None
            if concrete and name in concrete:
                node.target = name
                for check in list(node.users):  # FX's guard that it is None: ours instead
                    if getattr(check.target, "__name__", "") == "_assert_is_none":
                        check.target = _assert_left_out
                        check.args = (node, name, name in keyword_only)
            elif node.target in given:
                with graph.inserting_after(placeholders[-1]):
                    graph.call_function(_assert_given, (node, node.target))
        return _FusedModel(tracer.root, graph, type(model).__name__)
    finally:
        state.restore()


def _as_args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) \
        else (example_inputs,)


def _unchanged(model: nn.Module, why: str) -> nn.Module:
    """The model itself, with a report of why nothing was fused."""
    report = FuseReport(traced=False)
    report.skip((type(model).__name__, why))
    model.fuse_report = report
    return model


def fuse(model: nn.Module, *, example_inputs: Optional[Sequence[Any]] = None) -> nn.Module:
    """A copy of `model`'s graph using the fused layers, with `model`'s parameters (shared, not
    copied); its `.fuse_report` says what was fused and what was skipped and why.

    example_inputs: arguments of one forward call (a tuple); with them the residual and concat
    patterns are checked against real shapes and fused. forward's parameters whose default is
    None and which they leave out or give as None (all of them, without example_inputs) are
    fused at None: the result refuses calls that pass them. If FX cannot trace the model, or
    the result could not hold its state as the model does, `model` itself is returned
    unchanged, with the reason in `model.fuse_report`."""
    report = FuseReport()
    args = None if example_inputs is None else _as_args(example_inputs)
    try:
        gm = _trace(model, args)
    except Exception as error:  # anything FX raises: report it, never crash the caller
        hint = ("; it is a torch.compile'd module: fuse the model first and compile the result "
                "(or pass its ._orig_mod)" if hasattr(model, "_orig_mod") else
                f"; it is a {type(model).__name__} wrapper: fuse the model first and wrap the "
                "result (or pass its .module)"
                if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
                else "")
        return _unchanged(model, f"not traceable by torch.fx ({_reason(error)}); model left "
                                 f"unchanged{hint}")
    # Why a node has no shape, for the patterns that need one.
    no_shapes = "pass example_inputs"
    if args is not None:
        problem = _propagate_shapes(gm, args)
        no_shapes = "not a tensor in the run of example_inputs"
        if problem:
            report.skip(("example_inputs", problem))
            no_shapes = "the run of example_inputs stopped at or before this node"
    modules = dict(gm.named_modules())
    _fuse_concats(gm, modules, report, no_shapes)
    modules = dict(gm.named_modules())
    _fuse_linear_chains(gm, modules, report, no_shapes)
    # No eliminate_dead_code(): _replace has erased the chains, and a node whose result is unused
    # may still act (an in-place ReLU, a buffer update) and must stay.
    gm.delete_all_unused_submodules()
    try:
        _carry_state(model, gm)  # after the deletion, which would take what forward leaves alone
        problem = _state_dict_problem(model, gm)
    except RuntimeError as error:
        problem = str(error)
    if problem:
        return _unchanged(model, f"{problem}; model left unchanged")
    gm.graph.lint()
    gm.recompile()
    gm.fuse_report = report
    # GraphModule's deepcopy rebuilds the module from its graph and restores only what its meta
    # lists under this key (torch.fx.graph_module's _USER_PRESERVED_ATTRIBUTES_KEY).
    gm.meta.setdefault("_user_preserved_attributes", {})["fuse_report"] = report
    return gm
