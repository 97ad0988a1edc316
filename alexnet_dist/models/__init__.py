"""AlexNet-family models as plain nn.Modules, chosen by name."""

import inspect

from torch import nn

from ..errors import ConfigError
from .alexnet2012 import AlexNet2012, alexnet2012
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


__all__ = [
    "MODELS",
    "create_model",
    "AlexNet2012",
    "AlexNetOWT",
    "AlexNetSmall",
    "alexnet2012",
    "alexnet_owt",
    "alexnet_small",
]
