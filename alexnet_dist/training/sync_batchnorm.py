"""ddp.sync_batchnorm=true: batch norm over the global batch instead of each rank's share.

torch's SyncBatchNorm refuses CPU tensors; `GlobalBatchNorm` computes the same statistics on any
device and backend (gloo, NCCL) with one differentiable all-reduce of each layer's per-channel sums,
so a CPU run of the tests means what a GPU run means. `SyncBatchNorm`, the Trainer plugin, converts
every BatchNorm layer of the model when a fit starts (before the model moves to its device). The
layers keep BatchNorm's state-dict names, so checkpoints load into the plain network.
"""

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from lightning.pytorch.plugins import LayerSync
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Its replacement in torch (functional collectives) is private and differentiable only in recent releases.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of all ranks' batches together."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        # sums in float64: the variance as E[x^2] - E[x]^2 loses nothing at these magnitudes
        local = torch.cat([x.double().sum(dims), (x.double() ** 2).sum(dims), count])
        total = dist_nn.all_reduce(local)  # its backward sums every rank's gradient, as the loss does
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean**2
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def to_global(module: nn.Module) -> nn.Module:
    """`module` with each BatchNorm layer replaced by a GlobalBatchNorm holding the same tensors."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                setattr(converted, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(module, name, None) is not None:
                converted.register_buffer(name, getattr(module, name))
        converted.train(module.training)
        module = converted
    for name, child in module.named_children():
        module.add_module(name, to_global(child))
    return module


class SyncBatchNorm(LayerSync):
    """The Trainer plugin of ddp.sync_batchnorm=true."""

    def apply(self, model: nn.Module) -> nn.Module:
        return to_global(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return model  # same names and tensors as BatchNorm: checkpoints need no conversion back
