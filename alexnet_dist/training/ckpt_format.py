"""What a checkpoint of alexnet-train holds, and its format version.

A checkpoint is the dictionary Lightning writes, with Lightning's own keys as Lightning writes
them: `state_dict`, `optimizer_states`, `lr_schedulers`, `loops`, `epoch`, `global_step`,
`hyper_parameters` (the Classifier's arguments, enough to rebuild the network alone) and
`callbacks` (each callback's state under its class name: `Pictures` {"series"},
`BestCheckpoint` {"monitor", "best"}). alexnet_dist adds two keys and no others:

    "alexnet_dist_format": FORMAT_VERSION, stamped by FormatIO on every save
    "alexnet_dist": {part: state} for the parts in PARTS, written by the CheckpointParts registry

Everything in it is plain values, bytes and tensors, so `torch.load(weights_only=True)` loads it.

Every reader, Lightning's resume included (FormatIO), goes through `upgrade`: a checkpoint of an
older format is brought to the current layout by the steps of UPGRADES, one after the other, and
one of a newer format is refused in one line. Nothing else needs to guess a layout from a value's
shape.

To add a part: name it in PARTS and register it in Run.callbacks (training/run.py); an older checkpoint simply lacks
it, so its restore function is not called. To change what an existing part or key holds (rename,
move, convert): add FORMAT_VERSION's step to UPGRADES, which turns a checkpoint of the previous
format into the new layout, then bump FORMAT_VERSION.
"""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..errors import ConfigError

FORMAT_VERSION = 2
VERSION_KEY = "alexnet_dist_format"
PARTS_KEY = "alexnet_dist"

# The parts of a run that keep state of their own, and what each holds (one entry per rank where
# ranks differ, gathered to rank zero).
PARTS = {
    "training": "Classifier: {plateau, skipped_steps, rng: every rank's rng_state() or None, validation: metrics}",
    "loader": "ShardDataModule: what the order of samples depends on (data/plan.py): seed, batch_size, partitions...",
    "data": "ShardDataModule: what the inputs were (class names, normalisation, evaluation geometry); not restored",
}


class Unreadable(Exception):
    """A file that does not load as a checkpoint at all (truncated, garbage, not a checkpoint);
    the message says why in one line. (Not a UserError: a resume falls back to an older file.)"""


def load(path: str | Path, mmap: bool = False):
    """What the file at `path` holds, loaded with weights_only=True and as it is (a checkpoint of
    any format, or another tool's state dict); Unreadable says why not in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a truncated zip, garbage, a pickle of objects ...
        reason = str(exc).strip()
        raise Unreadable(reason.splitlines()[0][:200] if reason else type(exc).__name__) from None


def read(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint at `path` in the current layout, loaded with weights_only=True."""
    ckpt = load(path, mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise Unreadable("no state_dict in it")
    return upgrade(ckpt, path)


def upgrade(ckpt: dict, where) -> dict:
    """`ckpt` brought from its format to FORMAT_VERSION; a newer one stops with one line."""
    version = ckpt.get(VERSION_KEY, 0)  # format 0: written before checkpoints carried one
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"{where}: checkpoint format {version!r} is not a version number; pick another checkpoint")
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{where}: checkpoint format {version} is newer than this alexnet_dist reads ({FORMAT_VERSION}); "
            "upgrade alexnet_dist to load it"
        )
    for _, step in UPGRADES[version:]:
        ckpt = step(ckpt)
    ckpt[VERSION_KEY] = FORMAT_VERSION
    return ckpt


# Format 0 stored generator states as tensors and tuples in its first releases, bytes later.
def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else value.numpy().tobytes()


def _words(value) -> bytes:
    """32-bit generator words: bytes, or a tuple of ints or an int64 tensor in early format 0."""
    if isinstance(value, bytes):
        return value
    return np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value).astype(np.uint32).tobytes()


def _rng_as_bytes(state: dict) -> dict:
    version, words, gauss = state["python"]
    kind, keys, *rest = state["numpy"]
    out = {
        "python": [version, _words(words), gauss],
        "torch": _as_bytes(state["torch"]),
        "numpy": [kind, _words(keys), *rest],
    }
    if "cuda" in state:
        out["cuda"] = [_as_bytes(s) for s in state["cuda"]]
    return out


def _v0_to_v1(ckpt: dict) -> dict:
    """Format 0 (before e367520 and at it) had each part write its own top-level keys: the module
    `plateau`, `skipped_steps`, `rng`, the data module `ShardDataModule` {"loader": [...]}; its
    first releases kept generator states as tensors, used Lightning's ModelCheckpoint for
    best.ckpt (its score as `best_model_score`) and saved two arguments the module no longer takes."""
    parts = {}
    if "plateau" in ckpt:  # the first format 0 wrote it alone; skipped_steps and rng came later
        rng = ckpt.pop("rng", None)
        parts["training"] = {
            "plateau": ckpt.pop("plateau"),
            "skipped_steps": ckpt.pop("skipped_steps", 0),
            "rng": None if rng is None else [_rng_as_bytes(state) for state in rng],
        }
    loader = ckpt.pop("ShardDataModule", {}).get("loader")
    if loader is not None:
        parts["loader"] = loader
    ckpt[PARTS_KEY] = parts
    callbacks = ckpt.setdefault("callbacks", {})
    for key, state in list(callbacks.items()):
        if key.startswith("ModelCheckpoint") and "BestCheckpoint" not in callbacks and state.get("monitor"):
            score = state.get("best_model_score")
            callbacks["BestCheckpoint"] = {"monitor": state["monitor"], "best": None if score is None else float(score)}
    for dropped in ("steps_per_epoch", "max_epochs"):  # the schedule now counts the Trainer's steps
        ckpt.get("hyper_parameters", {}).pop(dropped, None)
    return ckpt


# The package's networks by the names format 1 stored them under (conf/model/NAME.yaml then).
FORMAT_1_MODELS = {
    "alexnet2012": "alexnet_dist.models.AlexNet2012",
    "alexnet_owt": "alexnet_dist.models.AlexNetOWT",
    "alexnet_small": "alexnet_dist.models.AlexNetSmall",
}


def _v1_to_v2(ckpt: dict) -> dict:
    """Format 1 named the network {"name": "alexnet_small", ...}; format 2 names any importable
    callable the Hydra way, {"_target_": "alexnet_dist.models.AlexNetSmall", ...}."""
    model = ckpt.get("hyper_parameters", {}).get("model")
    if isinstance(model, dict) and "name" in model and "_target_" not in model:
        name = model.pop("name")
        model["_target_"] = FORMAT_1_MODELS.get(name, name)
    return ckpt


# UPGRADES[n] turns format n into format n + 1, so there is one per version below the current.
UPGRADES = [
    ("v0 -> v1: parts under one key, generator states as bytes, BestCheckpoint's score", _v0_to_v1),
    ("v1 -> v2: the network named by its _target_", _v1_to_v2),
]
assert len(UPGRADES) == FORMAT_VERSION


class CheckpointParts(pl.Callback):
    """The registry: each stateful part of a run registers its name (one of PARTS), a function
    giving its state and one taking it back. On every save (every rank calls, so a part may
    gather from all ranks) their states go under checkpoint["alexnet_dist"]; on resume each part
    gets its own back, before any loader is built or training starts."""

    def __init__(self):
        self.parts = {}

    def register(self, name: str, save, restore) -> None:
        if name not in PARTS or name in self.parts:
            raise ValueError(f"{name}: not a part of the checkpoint format, or registered twice (see PARTS)")
        self.parts[name] = (save, restore)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[PARTS_KEY] = {name: save() for name, (save, _) in self.parts.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        saved = checkpoint.get(PARTS_KEY, {})
        for name, (_, restore) in self.parts.items():
            if name in saved:
                restore(saved[name])


class FormatIO(TorchCheckpointIO):
    """Lightning's own checkpoint reading and writing, with the format version stamped on every
    save and every load (a resume included) checked and upgraded."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint({**checkpoint, VERSION_KEY: FORMAT_VERSION}, path, storage_options)

    def load_checkpoint(self, path, *args, **kwargs):
        return upgrade(super().load_checkpoint(path, *args, **kwargs), path)
