"""fusedskip.bench.relative_error on a correct bfloat16 relu_add and on planted errors, against
the float64 result of the same (bfloat16-rounded) inputs. Run: python tolerance.py"""
import torch

from fusedskip import bench

torch.manual_seed(0)
x = torch.randn(2048, 1024).bfloat16()
w = (torch.randn(1024, 1024) / 32).bfloat16()
r = torch.randn(2048, 1024).bfloat16()
want = torch.relu(x.double() @ w.double().t()) + r.double()
got = torch.relu(x @ w.t()) + r
print(f"torch {torch.__version__}; relu_add 2048x1024x1024 bfloat16; "
      f"tolerance {bench.TOLERANCE[torch.bfloat16]}")
print(f"correct:                      {bench.relative_error(got, want):.4f}")
bad = got.clone()
bad[:, 5] -= r[:, 5]
print(f"one column without residual:  {bench.relative_error(bad, want):.4f}")
bad = got.clone()
bad[:64, :128] = 0
print(f"one 64x128 tile zeroed:       {bench.relative_error(bad, want):.4f}")
