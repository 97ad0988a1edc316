"""Normalisation layers of the 2012 network (layers/layers-145.cfg in the original code)."""

import torch
import torch.nn.functional as F
from torch import nn


class TowerLRN(nn.Module):
    """Local response normalisation (paper section 3.3) applied within each tower's channels.

    b_i = a_i / (k + alpha/n * sum of a_j^2 over the n channels centred on i) ^ beta, where the
    window never leaves the tower: in 2012 each tower lived on its own GPU. With the paper's
    k=2, n=5, alpha=1e-4, beta=0.75 and towers=1 this equals torch's
    LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2), which is computed with a 3-d average pool;
    summing n shifted slices instead is about three times faster on a CPU for the same result.
    """

    def __init__(self, towers: int = 2, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.towers, self.size, self.alpha, self.beta, self.k = towers, size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        sq = (x * x).view(n, self.towers, c // self.towers, h, w)
        sq = F.pad(sq, (0, 0, 0, 0, self.size // 2, (self.size - 1) // 2))  # zeros past each tower's edge
        window = sum(sq[:, :, i : i + c // self.towers] for i in range(self.size)).view(n, c, h, w)
        return x * (self.k + self.alpha / self.size * window).pow(-self.beta)

    def extra_repr(self) -> str:
        return f"towers={self.towers}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class SpatialNorm(nn.Module):
    """The "same-map" normalisation after conv2 in layers-145.cfg (not in the paper).

    y = x * (1 + scale/size^2 * sum of x^2 over a size x size window) ^ -pow, zero outside the
    image. The window sum over size^2 pixels is an average pool that counts the zero padding.
    """

    def __init__(self, size: int = 5, scale: float = 1e-3, pow: float = 0.75):
        super().__init__()
        self.size, self.scale, self.pow = size, scale, pow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_sq = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x * (1 + self.scale * mean_sq).pow(-self.pow)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, pow={self.pow}"


class AvgPoolTo(nn.Module):
    """nn.AdaptiveAvgPool2d(size): each output cell is the mean of the input cells its bin covers.
    Where the input's side is not a multiple of `size` (alexnet_small's 2x2 maps at 28 px pooled to
    3x3) the bins overlap, and ONNX has no such operator; there the same means are taken as a
    product with a fixed matrix per axis, which every exporter takes."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size == 0 and w % self.size == 0:
            return F.adaptive_avg_pool2d(x, self.size)
        return self.bins(h, x) @ x @ self.bins(w, x).T

    def bins(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(size, n): row i averages the cells floor(i*n/size) .. ceil((i+1)*n/size) - 1."""
        rows = torch.zeros(self.size, n, dtype=like.dtype, device=like.device)
        for i in range(self.size):
            start, end = i * n // self.size, -(-(i + 1) * n // self.size)
            rows[i, start:end] = 1.0 / (end - start)
        return rows

    def extra_repr(self) -> str:
        return f"size={self.size}"


def fuse_norms(model: nn.Module) -> int:
    """torch.compile every TowerLRN and SpatialNorm of `model` in place; returns how many.

    Each block is a chain of memory-bound elementwise steps (square, pad, window sum, pow, multiply)
    that eager mode runs as about ten kernels, each reading and writing the whole activation;
    inductor fuses a block into one forward and one backward kernel with the same formula, so the
    results agree with the plain block within float rounding (tests/test_models.py). Only these
    blocks are compiled: the convolutions and the rest stay eager and start at once. Compiling in
    place (nn.Module.compile) keeps the module tree, so state_dict names, and thus checkpoints,
    are those of the plain model; the blocks have no parameters of their own.
    """
    blocks = [m for m in model.modules() if isinstance(m, (TowerLRN, SpatialNorm))]
    for block in blocks:
        block.compile()
    return len(blocks)
