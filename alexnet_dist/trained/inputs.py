"""A trained network and what its inputs were, from its checkpoint: the network's config and
weights, the class names, the normalisation and the data settings it was validated with.

Checkpoints carry all of it (the "data" part, training/ckpt_format.py). One of an earlier release
does not: then its run's config.yaml (two folders up, where alexnet-train writes it) names the data
settings and the shards' manifest gives the rest; with neither, one line says so.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import Data, make
from ..config import Loader as LoaderSettings
from ..data.photos import Geometry
from ..errors import ConfigError
from ..models import build
from ..training.checkpoint import read_checkpoint
from ..training.ckpt_format import PARTS_KEY


@dataclass
class Trained:
    path: Path
    hparams: dict  # the Classifier's arguments; hparams["model"] the network's completed config
    state_dict: dict  # the Classifier's (network tensors under "model.")
    inputs: dict  # classes, mean, std, mean_image, settings (config.Data, plain), loader
    validation: dict  # {val_top1, val_top5, val_loss} of the latest validation, or {}

    @property
    def model(self) -> dict:
        return self.hparams["model"]

    def weights(self) -> dict:
        """The network's own state dict (the names of the plain nn.Module)."""
        return {k.removeprefix("model."): v for k, v in self.state_dict.items() if k.startswith("model.")}

    def geometry(self) -> Geometry:
        """How photos become this network's input: the storage of its shards, its crop and resize."""
        storage = self.inputs.get("storage") or {"resize": None, "center_crop": False, "quality": None}
        settings = self.inputs["settings"]
        values = {**storage, "crop": settings["crop"], "val_resize": settings["val_resize"]}
        return Geometry.from_dict(values, str(self.path))

    def network(self) -> torch.nn.Module:
        """The network with its trained weights, in eval mode."""
        net = build(self.model)
        net.load_state_dict(self.weights())
        return net.eval()


def load(path: str | Path, data_root: str | None = None, key: str = "ckpt_path", hint: str = "") -> Trained:
    """The checkpoint at `path` (of alexnet-train, any format) and its inputs; `data_root`
    replaces the shards' folder an older checkpoint's config.yaml names. Errors name the
    command's `key` and end with `hint`."""
    path = Path(path)
    ckpt, problem = read_checkpoint(path)
    if problem:
        raise ConfigError(f"{key}={path}: cannot be loaded ({problem}){hint}")
    if "hyper_parameters" not in ckpt or "model" not in ckpt["hyper_parameters"]:
        raise ConfigError(f"{key}={path}: not a checkpoint of alexnet-train (it names no network){hint}")
    parts = ckpt.get(PARTS_KEY, {})
    inputs = parts.get("data") or inputs_of_run(path, data_root, key)
    validation = (parts.get("training") or {}).get("validation", {})
    return Trained(path, ckpt["hyper_parameters"], ckpt["state_dict"], inputs, validation)


def inputs_of_run(path: Path, data_root: str | None, key: str) -> dict:
    """An older checkpoint's inputs: its run's config.yaml and the manifest of its shards."""
    from ..data.datamodule import ShardDataModule  # the data's manifest gives what the config does not

    config = path.resolve().parent.parent / "config.yaml"
    if not config.exists():
        raise ConfigError(
            f"{key}={path}: this checkpoint of an earlier release does not record its data settings, and no "
            f"config.yaml of its run is at {config}; put it back into its run directory (RUN/checkpoints/)"
        )
    settings, loader = run_settings(config)
    if data_root is not None:
        settings["root"] = data_root
    return ShardDataModule(make(Data, settings), make(LoaderSettings, loader)).description()


def run_settings(config: Path) -> tuple[dict, dict]:
    """The data and loader settings of a run's config.yaml (alexnet-train writes it), checked.
    OmegaConf reads YAML with a safe loader: a python tag (!!python/object...) is refused there,
    before anything is built; here every refusal becomes one line naming the file."""
    fix = "restore the config.yaml alexnet-train wrote, or move it away and pass data.root=DIR"
    try:
        run = OmegaConf.load(config)
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        raise ConfigError(f"{config}: cannot be read ({getattr(exc, 'strerror', None) or exc}); {fix}") from None
    except yaml.YAMLError as exc:  # not YAML, or a tag the safe loader does not construct
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{config}: not a run's config ({reason}); {fix}") from None
    if not isinstance(run, DictConfig):
        raise ConfigError(f"{config}: not a mapping of settings; {fix}")
    if not isinstance(run.get("data"), DictConfig) or not isinstance(run.get("loader"), DictConfig):
        raise ConfigError(f"{config}: no data and loader settings; {fix}")
    try:
        data = OmegaConf.to_container(run.data, resolve=True)
        loader = {"name": run.loader.name}
    except OmegaConfBaseException as exc:  # no loader.name, an interpolation that does not resolve
        raise ConfigError(f"{config}: {str(exc).splitlines()[0]}; {fix}") from None
    for section, schema, values in (("data", Data, {"root": "-", **data}), ("loader", LoaderSettings, loader)):
        try:
            make(schema, values)  # the keys and types
        except ConfigError as exc:
            reason = str(exc).split("; fix the override")[0]  # that advice is for alexnet-train's overrides
            raise ConfigError(f"{config}: {section}.{reason}; {fix}") from None
    return data, loader
