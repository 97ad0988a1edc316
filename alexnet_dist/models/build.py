"""Any network from its config: Hydra's `_target_` names an importable class or factory (ours in
alexnet_dist.models, a user's in their own file on PYTHONPATH, torchvision's, timm's), the other
keys are its arguments. The data decides the class count and, for a callable that asks for it, the
input size; the completed config (target, arguments, class count) is what a checkpoint records,
so that it alone rebuilds the network."""

import importlib
import inspect
from collections.abc import Callable
from importlib import resources

import yaml
from torch import nn

from ..errors import ConfigError

# Argument names under which a callable asks for its input's side in pixels (timm says img_size).
INPUT_SIZE_ARGS = ("image_size", "img_size")


def resolve(target) -> Callable:
    """The object a dotted path names: package.module.Name (or package.module.Class.factory)."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(
            f"model._target_={target!r}: not a dotted name; name a class or function, e.g. "
            "model._target_=mymodels.TinyNet (its file on PYTHONPATH)"
        )
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise ConfigError(f"model._target_={target}: importing {module_name} failed ({exc})") from None
            continue
        except Exception as exc:  # the user's file itself raises on import
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(
                f"model._target_={target}: importing {module_name} failed ({type(exc).__name__}: {reason})"
            ) from None
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                raise ConfigError(f"model._target_={target}: {'.'.join(parts[:i])} has no {attr}; check the spelling")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ConfigError(f"model._target_={target}: not a class or function")
        return obj
    raise ConfigError(
        f"model._target_={target}: no module {parts[0]} to import; put its folder on PYTHONPATH or install its package"
    )


def _parameters(factory: Callable, target: str) -> tuple[set[str], bool]:
    """The argument names `factory` takes and whether it takes any keyword (**kwargs)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: anything goes
        return set(), True
    named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def complete(spec: dict, num_classes: int, image_size: int, data: str = "the data") -> dict:
    """The model config `spec` ({"_target_": ..., argument: value}) with the class count of the
    data (`data` names it in messages) and, where the callable asks for one, its input size
    (data.crop); checked against the callable's signature. A setting that disagrees with the data
    is refused, naming both."""
    spec = dict(spec)
    if "_target_" not in spec:
        raise ConfigError(
            f"model: no _target_ in {sorted(spec) or 'the model config'}; name the network's class, "
            "e.g. model=alexnet_small or model._target_=mymodels.TinyNet"
        )
    target = spec.pop("_target_")
    named, any_keyword = _parameters(resolve(target), target)
    given = {"num_classes": (num_classes, f"{data} has {num_classes} classes")}
    given |= {key: (image_size, f"data.crop is {image_size}") for key in INPUT_SIZE_ARGS if key in named}
    for key, (value, why) in given.items():
        if key in spec and spec[key] != value:
            raise ConfigError(f"model.{key}={spec[key]}: {why}; drop the setting, it follows the data")
    if "num_classes" not in named and not any_keyword:
        raise ConfigError(
            f"model._target_={target}: takes no num_classes argument; the class count comes from the "
            "data, so give its constructor a num_classes argument"
        )
    if not any_keyword and (unknown := sorted(set(spec) - named)):
        raise ConfigError(
            f"model.{unknown[0]}: not an argument of {target}; its arguments: {', '.join(sorted(named)) or 'none'}"
        )
    return {"_target_": target, **spec, **{key: value for key, (value, _) in given.items()}}


def build(spec: dict) -> nn.Module:
    """The network of a completed config (`complete`, or a checkpoint's hyper_parameters["model"])."""
    args = dict(spec)
    target = args.pop("_target_")
    factory = resolve(target)
    try:
        model = factory(**args)
    except Exception as exc:  # a wrong value: the constructor's own complaint, in one line
        reason = str(exc).splitlines()[0] if str(exc) else ""
        shown = ", ".join(f"{k}={v}" for k, v in args.items())
        raise ConfigError(f"model._target_={target}({shown}): {type(exc).__name__}: {reason}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={target}: made a {type(model).__name__}, not a torch.nn.Module")
    return model


def named_config(name: str) -> dict:
    """A model config by the name a command line gives it: NAME of the package's conf/model/NAME.yaml
    (model=alexnet_owt), or a dotted target of any importable callable."""
    if "." in name:
        return {"_target_": name}
    folder = resources.files("alexnet_dist.conf") / "model"
    choices = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    if name not in choices:
        raise ConfigError(
            f"model={name}: no such model config; choose one of {', '.join(choices)} or a dotted _target_"
        )
    return yaml.safe_load((folder / f"{name}.yaml").read_text())


def create(name: str, num_classes: int, image_size: int = 224, **arguments) -> nn.Module:
    """A network by the name a command line gives it (`named_config`), its config's arguments
    replaced by `arguments`: the same path as a run's model config."""
    return build(complete(named_config(name) | arguments, num_classes, image_size))
