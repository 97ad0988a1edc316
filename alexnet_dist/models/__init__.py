"""AlexNet-family models as plain nn.Modules, chosen by name."""

import inspect

import torch
from torch import nn

from ..errors import ConfigError
from .alexnet2012 import AlexNet2012, alexnet2012
from .layers import fuse_norms
from .owt import AlexNetOWT, alexnet_owt
from .small import AlexNetSmall, alexnet_small

MODELS = {"alexnet2012": AlexNet2012, "alexnet_owt": AlexNetOWT, "alexnet_small": AlexNetSmall}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"model.name={name}: unknown model; choose one of {', '.join(sorted(MODELS))} (model=NAME)")
    factory = MODELS[name]
    known = set(inspect.signature(factory).parameters) - {"num_classes"}
    if unknown := sorted(set(kwargs) - known):
        raise ConfigError(
            f"model.{unknown[0]}: not a setting of model {name}; its settings: {', '.join(sorted(known))}"
        )
    return factory(num_classes=num_classes, **kwargs)


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
    "MODELS",
    "create_model",
    "compiled",
    "fuse_norms",
    "AlexNet2012",
    "AlexNetOWT",
    "AlexNetSmall",
    "alexnet2012",
    "alexnet_owt",
    "alexnet_small",
]
