"""Linearize a "pretrained" PyTorch CNN around its weights, train the linearization, and take its eNTK.

    python examples/linearize_pretrained.py

What it shows:
1. loading weights from a local `state_dict` file into a fresh module (here the file is written by
   the script itself, standing in for a downloaded checkpoint: no network access);
2. `entk.adapters.torch.linearize(module)`: a `torch.nn.Module` computing
   f(θ₀, x) + J(θ₀, x)(θ − θ₀) (one `torch.func.jvp` per forward pass), trained like any torch model
   with `torch.optim.SGD` — the loss goes down while the model stays linear in θ;
3. `entk.ntk(module, x)`: the empirical NTK at θ₀ (torch tensors in, a torch tensor out), the kernel
   that governs the training dynamics of the linearized model.

Data is synthetic: 64 random 3×16×16 images with targets from a fixed random "teacher" network.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

import entk
import entk.adapters.torch  # the PyTorch adapter (imports torch)


class SmallCNN(torch.nn.Module):
    """Two 3×3 convolutions (16 channels), ReLU, global average pooling, a dense readout to 10 outputs."""

    def __init__(self, channels: int = 16, outputs: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.head = torch.nn.Linear(channels, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) → logits (N, outputs)."""
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y))
        return self.head(y.mean(dim=(2, 3)))


def load_pretrained(path: str) -> SmallCNN:
    """A fresh module with weights read from the `state_dict` file at `path`."""
    module = SmallCNN()
    module.load_state_dict(torch.load(path, weights_only=True))
    return module.eval()


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)

    # "Pretrained" weights: saved to a local file, then loaded into a new module.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small_cnn.pt")
        torch.save(SmallCNN().state_dict(), path)
        module = load_pretrained(path)
    print(f"loaded {sum(p.numel() for p in module.parameters())} parameters from a state_dict file")

    x = torch.randn(64, 3, 16, 16)
    teacher = SmallCNN()
    with torch.no_grad():
        y = teacher(x)

    lin = entk.adapters.torch.linearize(module)
    with torch.no_grad():
        gap = (lin(x) - module(x)).abs().max().item()
    print(f"at θ₀ the linearized model equals the network: max |f_lin - f| = {gap:.1e}")

    optimizer = torch.optim.SGD(lin.parameters(), lr=0.5)
    losses = []
    for step in range(30):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(lin(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == 29:
            print(f"step {step:3d}  loss {loss.item():.5f}")
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"training the linearized model did not lower the loss: {losses[0]} → "
                           f"{losses[-1]}")

    # The eNTK at θ₀ (the original module's weights), on the first 8 examples, all output pairs.
    kernel = entk.ntk(module, x[:8], trace_axes=())
    print(f"eNTK at θ₀: {type(kernel).__name__} of shape {tuple(kernel.shape)} "
          f"(N1, N2, O1, O2), dtype {kernel.dtype}")
    traced = torch.diagonal(kernel, dim1=2, dim2=3).sum(-1)  # trace over outputs: (N1, N2)
    print(f"Θ(x_i, x_i) traced over outputs, first 4: "
          f"{[round(v, 3) for v in torch.diagonal(traced)[:4].tolist()]}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
