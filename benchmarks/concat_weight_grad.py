"""The concat layer's weight gradient, G^T [x1 x2 ...], three ways, on the layer's own shapes:

  per block     one GEMM per input, each writing its column block of the gradient in place (what
                the library path does where every block is aligned and at least 64 wide:
                library_gemm_per_block in csrc/backend.cpp)
  cat + GEMM    the inputs copied into one matrix, then one GEMM over the whole width (the
                library path's fallback)
  saved cat     one GEMM over a concatenation that already exists: what eager's backward
                costs, having saved the cat in the forward (which the fused op does not, to save
                its memory)

Per-block GEMMs each end in a partly filled wave of tiles, and each pays its launch; the cat
costs a pass over the inputs. Which wins depends on the shape, and the threshold between them
should come from a GPU. Time per call with calls queued back to back (CUDA events around a
loop; on CPU the wall clock), the strategies interleaved over rounds, the median round kept.

    python benchmarks/concat_weight_grad.py [--sizes 8192x4096x4096,65536x1024x1024]
        [--parts 2,4] [--dtype bfloat16] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List

import torch

from fusedskip.bench import append_markdown, parse_sizes, split_widths, time_queued_us

DEFAULT_SIZES = "4096x1024x1024,8192x4096x4096,65536x256x256,65536x1024x1024"


def strategies(grad: torch.Tensor, inputs: List[torch.Tensor],
               out: torch.Tensor) -> Dict[str, Callable[[], None]]:
    saved = torch.cat(inputs, 1)

    def per_block():
        offset = 0
        for x in inputs:
            torch.mm(grad.t(), x, out=out[:, offset:offset + x.shape[1]])
            offset += x.shape[1]

    return {"per block": per_block,
            "cat + GEMM": lambda: torch.mm(grad.t(), torch.cat(inputs, 1), out=out),
            "saved cat": lambda: torch.mm(grad.t(), saved, out=out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="MxKxN[,...]: rows, in_features "
                        "(split as the benchmark's concat layers are), out_features")
    parser.add_argument("--parts", default="2,4", help="how many inputs, each size")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("concat_weight_grad: needs a CUDA GPU (or --device cpu)")
    dtype = getattr(torch, args.dtype)
    parts = [int(p) for p in args.parts.split(",")]
    lines = ["| M | widths | N | per block µs | cat + GEMM µs | saved cat µs | best of the two |",
             "|---:|---|---:|---:|---:|---:|---|"]
    print(lines[0], flush=True)
    for m, k, n in parse_sizes(args.sizes):
        for count in parts:
            widths = split_widths(k, count)
            inputs = [torch.randn(m, w, device=args.device, dtype=dtype) for w in widths]
            grad = torch.randn(m, n, device=args.device, dtype=dtype)
            out = torch.empty(n, k, device=args.device, dtype=dtype)
            runs = strategies(grad, inputs, out)
            expected = grad.t().float() @ torch.cat(inputs, 1).float()
            for name, fn in runs.items():  # warm-up, and each way must give the gradient
                out.fill_(float("nan"))
                fn()
                err = (out.float() - expected).norm() / expected.norm()
                if not err < 1e-2:
                    raise SystemExit(f"{name} at {m}x{widths}x{n}: relative error {err}")
            times: Dict[str, List[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    times[name].append(time_queued_us(fn, args.calls, args.device))
            us = {name: statistics.median(t) for name, t in times.items()}
            best = min(("per block", "cat + GEMM"), key=us.get)
            lines.append(f"| {m} | {list(widths)} | {n} | {us['per block']:.1f} | "
                         f"{us['cat + GEMM']:.1f} | {us['saved cat']:.1f} | {best} |")
            print(lines[-1], flush=True)
    text = (f"{args.dtype}, per call with {args.calls} calls queued back to back, median of "
            f"{args.rounds} interleaved rounds\n\n" + "\n".join(lines))
    if args.out:
        print("wrote", append_markdown(args.out, "concat-weight-grad",
                                       "Concat weight gradient: per block or over a cat", text,
                                       device=args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
