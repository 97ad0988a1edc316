"""Networks as plain nn.Modules. The package's own (the 2012 two-tower network, the 2014 single
tower, AlexNet-BN of the large-batch papers, a small AlexNet shape for small images) are built like
any user's: a config names the class with Hydra's `_target_` (build.py)."""

import torch
from torch import nn

from .alexnet2012 import AlexNet2012
from .alexnet_bn import AlexNetBN
from .build import build, complete, create, named_config, resolve
from .layers import fuse_norms
from .owt import AlexNetOWT
from .small import AlexNetSmall


def compiled(model: nn.Module, compile: bool = False, norms: bool = False) -> nn.Module:
    """What to call for the settings compute.compile and compute.fuse_norms: the whole model
    compiled (a wrapper sharing its parameters, whose graph holds the norm blocks too, so `norms`
    adds nothing then), or the model with its norm blocks compiled in place, or the model as is."""
    if compile:
        return torch.compile(model)
    if norms:
        fuse_norms(model)
    return model


__all__ = [
    "build",
    "complete",
    "create",
    "named_config",
    "resolve",
    "compiled",
    "fuse_norms",
    "AlexNet2012",
    "AlexNetBN",
    "AlexNetOWT",
    "AlexNetSmall",
]
