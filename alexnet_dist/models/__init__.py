"""AlexNet-family models as plain nn.Modules, chosen by name."""

from torch import nn

from ..errors import ConfigError
from .alexnet2012 import AlexNet2012, alexnet2012
from .owt import AlexNetOWT, alexnet_owt
from .small import AlexNetSmall, alexnet_small

MODELS = {"alexnet2012": alexnet2012, "alexnet_owt": alexnet_owt, "alexnet_small": alexnet_small}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"model.name={name}: unknown model; choose one of {', '.join(sorted(MODELS))} (model=NAME)")
    return MODELS[name](num_classes=num_classes, **kwargs)


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
