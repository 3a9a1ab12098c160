"""fusedskip.fuse() on a model written with plain PyTorch: what it fuses, what it skips, and
proof that the outputs did not change.

    python examples/fuse_existing_model.py
"""

import torch
from torch import nn

import fusedskip


class ExistingModel(nn.Module):
    """A residual MLP with a UNet-like concat skip, written without fusedskip."""

    def __init__(self, width=64):
        super().__init__()
        self.stem = nn.Linear(32, width)
        self.block1 = nn.Linear(width, width)
        self.block2 = nn.Linear(width, width)
        self.merge = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h0 = torch.relu(self.stem(x))
        h1 = torch.relu(self.block1(h0)) + h0       # ResNet-like: relu, then add
        h2 = torch.relu(self.block2(h1) + h1)       # the other order: add, then relu
        h3 = torch.relu(self.merge(torch.cat([h2, h0], dim=-1)))  # UNet-like concat skip
        return self.head(h3)


def main():
    torch.manual_seed(0)
    model = ExistingModel()
    x = torch.randn(128, 32)
    fused = fusedskip.fuse(model, example_inputs=(x,))
    print(fused.fuse_report)
    print()
    print(fused.code)
    same = torch.allclose(fused(x), model(x), rtol=1e-6, atol=1e-6)
    shared = all(any(p is q for q in model.parameters()) for p in fused.parameters())
    print(f"outputs equal: {same}; parameters shared with the original: {shared}")


if __name__ == "__main__":
    main()
