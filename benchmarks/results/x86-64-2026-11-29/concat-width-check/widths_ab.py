"""ConcatLinear's per-input width check: the C fast path (fusedskip._C.widths_match) against the
Python loop it stands in front of, alternated in one process (toggled through
fusedskip.reference._op_widths_match), 64x10 layers of two inputs, one thread, no_grad.

Two paths of the layer: the CPU one (the reference ops, what a CPU tensor takes) and the one a
CUDA tensor takes (the fused op, here its CPU kernel: the modules' choice forced), whose Python is
the same as on a GPU."""
import timeit

import torch

import fusedskip
from fusedskip import modules, reference

torch.set_num_threads(1)
torch.manual_seed(0)
x, s = torch.randn(64, 10), torch.randn(64, 10)
layer = fusedskip.ConcatLinear([10, 10], 10, activation="relu")
linear = torch.nn.Linear(20, 10)
fast = reference._op_widths_match
assert fast is not None, "needs the built extension"


def best(f, n=20000):
    return min(timeit.repeat(f, number=n, repeat=7)) / n * 1e6


use_fused = modules._use_fused
rows = []
with torch.no_grad():
    for round_ in range(3):
        for path in ("cpu", "fused"):
            modules._use_fused = use_fused if path == "cpu" else (lambda t: True)
            for check in ("python", "c"):
                reference._op_widths_match = fast if check == "c" else None
                rows.append((round_, path, check, best(lambda: layer(x, s))))
            rows.append((round_, path, "eager block", best(
                lambda: torch.relu(linear(torch.cat([x, s], -1))))))
modules._use_fused, reference._op_widths_match = use_fused, fast
print("| round | path | width check | µs per call |")
print("|---:|---|---|---:|")
for round_, path, check, us in rows:
    print(f"| {round_} | {path} | {check} | {us:.2f} |")
