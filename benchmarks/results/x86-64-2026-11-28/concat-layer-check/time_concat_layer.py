"""Host time of one ConcatLinear call on the CPU, 64x(10+15)->20, no_grad, one thread: the
modules' per-call cost of the layer's input check. Run with PYTHONPATH at the tree to time."""
import timeit

import torch

import fusedskip
from fusedskip import ConcatLinear

torch.set_num_threads(1)
layer = ConcatLinear((10, 15), 20)
x1, x2 = torch.randn(64, 10), torch.randn(64, 15)
print("fusedskip from", fusedskip.__file__, "| torch", torch.__version__)
with torch.no_grad():
    for _ in range(5):
        best = min(timeit.repeat(lambda: layer(x1, x2), number=2000, repeat=7)) / 2000
        print(f"{best * 1e6:.2f} us per call (best of 7 x 2000)")
