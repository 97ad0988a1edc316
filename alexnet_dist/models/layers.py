"""Normalisation layers of the 2012 network (layers/layers-145.cfg in the original code)."""
import torch
import torch.nn.functional as F
from torch import nn


class TowerLRN(nn.Module):
    """Local response normalisation applied to each tower's channels separately.

    In 2012 each tower lived on its own GPU, so the 5-channel window never crossed from one
    tower's channels into the other's. With towers=1 this is plain LocalResponseNorm.
    The paper's k=2, n=5, alpha=1e-4, beta=0.75 with alpha divided by n is exactly torch's
    LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2).
    """

    def __init__(self, towers: int = 2, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.towers = towers
        self.lrn = nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.towers == 1:
            return self.lrn(x)
        return torch.cat([self.lrn(t) for t in x.chunk(self.towers, dim=1)], dim=1)


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
