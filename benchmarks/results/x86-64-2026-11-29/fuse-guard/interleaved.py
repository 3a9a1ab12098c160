import sys, timeit, torch, fusedskip
torch.set_num_threads(1)
F = sys.modules["fusedskip.fuse"]
x, r = torch.randn(64, 10), torch.randn(64, 10)
plain = fusedskip.LinearReLUResidual(10, 10)
fused = F._FusedLinearReLUResidual.from_linear(torch.nn.Linear(10, 10))
fused2 = fusedskip.LinearReLUResidual.from_linear(torch.nn.Linear(10, 10))
res = {k: [] for k in ("plain", "fused", "plain_from_linear")}
for _ in range(15):
    for k, m in (("plain", plain), ("fused", fused), ("plain_from_linear", fused2)):
        res[k].append(min(timeit.repeat(lambda: m(x, r), number=1000, repeat=3)) * 1e3)
for k, v in res.items(): print(k, round(min(v), 2))
