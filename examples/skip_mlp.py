"""Skip connections in an nn.Sequential-style MLP, by addition and by concatenation.

The MLP 30 -> 10 -> 15 -> 10 -> 20 -> 2, where the fourth linear reads the outputs of both the
second and the third: as a ResNet-like add skip and as a UNet-like concat skip, each built from
fusedskip's layers and from the plain-PyTorch reference layers with the same initial weights,
trained side by side on a small synthetic regression task.

    python examples/skip_mlp.py [--steps 300] [--device cpu|cuda] [--out skip_mlp.png]

Prints the loss of each model every 50 steps and the time per training step, and saves the loss
curves as a PNG. On CPU the fused layers run the reference ops (so the curves coincide exactly);
on a GPU they run the fused kernels.
"""

import argparse
import time

import torch
from torch import nn

import fusedskip


class AddSkipMLP(nn.Module):
    """ResNet-like: h3 = relu(linear3(h2)) + h2, so linear2 and linear3 are 10 wide."""

    def __init__(self, api):
        super().__init__()
        self.linear1 = nn.Linear(30, 10)
        self.linear2 = api.LinearReLUResidual(10, 10)
        self.linear3 = api.LinearReLUResidual(10, 10)
        self.linear4 = nn.Linear(10, 20)
        self.linear5 = nn.Linear(20, 2)

    def forward(self, x):
        h1 = torch.relu(self.linear1(x))
        h2 = self.linear2(h1)
        h3 = self.linear3(h2, residual=h2)  # relu(linear3(h2)) + h2 in one op
        return self.linear5(torch.relu(self.linear4(h3)))


class ConcatSkipMLP(nn.Module):
    """linear4 sees cat(h2, h3): its in_features are linear2's and linear3's widths, 15 + 10."""

    def __init__(self, api):
        super().__init__()
        self.linear1 = nn.Linear(30, 10)
        self.linear2 = api.LinearReLUResidual(10, 15)
        self.linear3 = api.LinearReLUResidual(15, 10)
        self.linear4 = api.ConcatLinear([15, 10], 20, activation="relu")
        self.linear5 = nn.Linear(20, 2)

    def forward(self, x):
        h1 = torch.relu(self.linear1(x))
        h2 = self.linear2(h1)
        h3 = self.linear3(h2)
        return self.linear5(self.linear4(h2, h3))  # no torch.cat


def synthetic_task(samples, generator, device):
    """Targets from a fixed random nonlinear function of the inputs."""
    x = torch.randn(samples, 30, generator=generator)
    mix = torch.randn(30, 2, generator=generator) / 30 ** 0.5
    y = torch.sin(x @ mix) + 0.1 * (x[:, :2] ** 2)
    return x.to(device), y.to(device)


def train(model, x, y, steps, batch, seed):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=generator).to(x.device)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    sync()
    return losses, (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda" if fusedskip.cuda_available() else "cpu")
    parser.add_argument("--out", default="skip_mlp.png")
    args = parser.parse_args()
    import matplotlib  # before training: a missing matplotlib fails now, not at the end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = synthetic_task(8192, torch.Generator().manual_seed(0), args.device)
    curves = {}
    for name, cls in (("add skip", AddSkipMLP), ("concat skip", ConcatSkipMLP)):
        torch.manual_seed(1)
        reference_model = cls(fusedskip.reference).to(args.device)
        fused_model = cls(fusedskip).to(args.device)
        fused_model.load_state_dict(reference_model.state_dict())  # same starting weights
        for label, model in (("reference", reference_model), ("fusedskip", fused_model)):
            losses, seconds = train(model, x, y, args.steps, args.batch, seed=2)
            curves[f"{name}, {label}"] = losses
            print(f"{name:12s} {label:10s} loss {losses[0]:.4f} -> {losses[-1]:.4f}   "
                  f"{seconds * 1e3:.2f} ms/step on {args.device}")
            for step in range(0, args.steps, 50):
                print(f"    step {step:4d}  loss {losses[step]:.4f}")

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        style = "--" if "fusedskip" in label else "-"
        ax.plot(losses, style, label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(f"Skip connections in a 30-10-15-10-20-2 MLP ({args.device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
