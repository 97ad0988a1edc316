"""alexnet-eval ckpt_path=PATH [views=1|10] [probs=FILE.npz] ...: top-1, top-5 and NLL of a
checkpoint on the validation split, from the centre crop or the paper's 10 views (section 4.1).

  ckpt_path   a checkpoint of alexnet-train (checkpoints/last.ckpt, best.ckpt, step-*.ckpt)
  views       1: the centre crop; 10: four corners, centre and their mirrors, softmax averaged
  data.root   the shards (default: the run's own, which the checkpoint records)
  loader      auto (default: the run's loader), dali or wds
  batch_size  images per batch (default 100)
  probs       also write every image's class probabilities and label to this .npz, and which
              image each row is: `shards` (its tar, as manifest.json names it) and `keys` (its
              WebDataset __key__), string arrays; a skipped undecodable image has no row
  model       with a plain state dict instead of a checkpoint (torchvision's AlexNet weights:
              model=alexnet_owt), the network it belongs to: a conf/model name or a dotted
              _target_; needs data.root

A checkpoint evaluates with its run's data settings (crop, resize, normalisation), which it
records; one of an earlier release takes them from its run's config.yaml two folders up.

alexnet-eval ensemble probs=A.npz,B.npz,...: the metrics of the averaged probabilities of several
runs (the paper's 5- and 7-model rows), each file written by alexnet-eval on the same data. Files
that name their rows must name the same images in the same order (DALI's rows follow the
manifest; the webdataset loader's workers take turns with their batches, so its order depends on
batch_size); files written before alexnet-eval stored keys are compared by their labels.
"""

import json
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..config import Data, Eval, make
from ..config import Loader as LoaderSettings
from ..data import store
from ..errors import ConfigError
from ..models import complete, named_config
from ..trained.inputs import load as load_trained
from ..trained.inputs import run_settings
from ..training import ckpt_format
from ..training.checkpoint import mismatch
from . import key_values, one_line_errors


def read_state_dict(path: Path):
    """(a plain state dict of another tool, None), or (None, why it cannot be loaded). Not a
    checkpoint of alexnet-train, so no format to check."""
    try:
        return ckpt_format.load(path), None
    except ckpt_format.Unreadable as exc:
        return None, str(exc)


def not_a_state_dict(weights) -> str | None:
    plain = isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())
    return None if plain else "not a state dict of tensors"


def metrics(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    from ..training.module import topk_correct

    n = len(labels)
    return {
        "val_top1": topk_correct(log_probs, labels, 1).item() / n,
        "val_top5": topk_correct(log_probs, labels, 5).item() / n,
        "val_loss": torch.nn.functional.nll_loss(log_probs, labels).item(),
        "val_count": n,
    }


def evaluate(args: Eval) -> dict:
    from lightning.pytorch.utilities import move_data_to_device

    from ..data.datamodule import ShardDataModule
    from ..training.module import Classifier

    if args.ckpt_path is None:
        raise ConfigError(
            "alexnet-eval needs ckpt_path=PATH (a checkpoint of alexnet-train, or a state dict with model=NAME)"
        )
    path = Path(args.ckpt_path)
    if args.probs is not None and not Path(args.probs).resolve().parent.is_dir():
        raise ConfigError(f"probs={args.probs}: no folder {Path(args.probs).parent} to write it in; create it")
    if args.model is not None:  # a bare state dict, e.g. torchvision's alexnet-owt-*.pth
        weights, problem = read_state_dict(path)
        if problem := problem or not_a_state_dict(weights):
            raise ConfigError(f"ckpt_path={path}: cannot be loaded ({problem})")
        config = path.resolve().parent.parent / "config.yaml"
        # the run's data and loader settings where it has a run directory, else the defaults
        data, loader = run_settings(config) if config.exists() else ({}, {})
        spec, state_dict = named_config(args.model), {f"model.{k}": v for k, v in weights.items()}
    else:
        trained = load_trained(
            path, args.data.root, key="ckpt_path", hint="; for a plain state dict also pass model=NAME"
        )
        # the run's own settings and normalisation, whatever the shards' statistics say now
        data = {**trained.inputs["settings"], "mean": trained.inputs["mean"], "std": trained.inputs["std"]}
        loader, spec, state_dict = {"name": trained.inputs["loader"]}, trained.model, trained.state_dict
    if args.data.root is not None:
        data["root"] = args.data.root
    if "root" not in data:
        raise ConfigError(f"ckpt_path={path}: no config.yaml two folders up to name the data; pass data.root=DIR")
    if args.loader is not None:
        loader["name"] = args.loader
    data.update(batch_size=args.batch_size, val_batch_size=None, test_views=args.views)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # DALI decodes on the GPU when there is one
    dm = ShardDataModule(make(Data, data), make(LoaderSettings, loader), device=device)
    # what rebuilds the network, without compiling it: one pass over the test set does not repay
    # the compilation, and the plain model computes the same (tests/test_models.py)
    if args.model is not None:
        spec = complete(spec, dm.num_classes, dm.settings.crop)
    module = Classifier(spec, optim={}, global_batch=1).eval()
    if problem := mismatch(state_dict, module.state_dict()):
        raise ConfigError(
            f"ckpt_path={path}: does not fit {spec['_target_']} with {dm.num_classes} classes ({problem})"
        )
    module.load_state_dict(state_dict)
    module.to(device)
    outputs, labels, keys = [], [], []
    with torch.inference_mode():
        for batch in dm.test_dataloader():
            images, y = dm.on_after_batch_transfer(move_data_to_device(batch, device), 0)
            outputs.append(module.predict_log_probs(images).cpu())
            labels.append(y.cpu())
            keys.extend(batch.keys)
    log_probs, labels = torch.cat(outputs), torch.cat(labels)
    result = {"ckpt_path": str(path), "views": args.views, **metrics(log_probs, labels)}
    if args.probs is not None:
        arrays = {"probs": log_probs.exp().numpy(), "labels": labels.numpy()}
        if len(keys) == len(labels):  # both loaders name every image; a loader that does not gives no keys
            names = shard_names(dm.manifest)
            arrays["shards"] = np.array([names.get(tar, tar) for tar, _ in keys], dtype=str)
            arrays["keys"] = np.array([key for _, key in keys], dtype=str)
        np.savez_compressed(args.probs, **arrays)
        result["probs"] = args.probs
    return result


def shard_names(manifest) -> dict[str, str]:
    """Each shard's location, as the loaders name it, -> its tar as manifest.json names it:
    relative to data.root for alexnet-prepare's shards, so that evaluations of copies of the same
    shards in other places store the same names."""
    return {
        store.join(manifest.root, shard["tar"]): shard["tar"]
        for split in manifest.data["splits"].values()
        for shard in split["shards"]
    }


def read_probs(f: str) -> dict:
    """The probabilities (N, C), labels (N,) and, where the file has them, each row's shard and
    key (N,) (None in files written before alexnet-eval stored them) of a file `alexnet-eval
    probs=...` wrote, checked to be just that. Loaded without pickle (object arrays would run
    code), and everything read here, since numpy reads an archive's arrays only when asked and
    fails with many kinds of error."""
    fix = f"write it again with alexnet-eval ckpt_path=... probs={f}"
    try:
        archive = np.load(f, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ConfigError(f"probs: {f} is a single array, not an .npz of probs and labels; {fix}")
        with archive:
            if missing := sorted({"probs", "labels"} - set(archive.files)):
                raise ConfigError(f"probs: {f} holds no '{missing[0]}' array; {fix}")
            probs, labels = archive["probs"], archive["labels"]
            named = [name for name in ("shards", "keys") if name in archive.files]
            if len(named) == 1:
                other = "keys" if named == ["shards"] else "shards"
                raise ConfigError(f"probs: {f} holds no '{other}' array beside its '{named[0]}'; {fix}")
            shards, keys = (archive["shards"], archive["keys"]) if named else (None, None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ConfigError(f"probs: {f} is not an .npz of alexnet-eval ({str(exc).splitlines()[0]}); {fix}") from None
    if probs.dtype.kind != "f" or probs.ndim != 2 or labels.dtype.kind not in "iu" or labels.shape != probs.shape[:1]:
        raise ConfigError(
            f"probs: {f} holds probs {probs.dtype} {probs.shape} and labels {labels.dtype} {labels.shape}, not "
            f"(N, classes) floats and N whole numbers; {fix}"
        )
    if labels.size and not (0 <= labels.min() and labels.max() < probs.shape[1]):
        raise ConfigError(f"probs: {f} has labels outside 0..{probs.shape[1] - 1}; {fix}")
    if not np.isfinite(probs).all():
        raise ConfigError(f"probs: {f} holds NaN or infinite probabilities; {fix}")
    if keys is not None and not all(a.dtype.kind == "U" and a.shape == labels.shape for a in (shards, keys)):
        raise ConfigError(
            f"probs: {f} holds shards {shards.dtype} {shards.shape} and keys {keys.dtype} {keys.shape}, not "
            f"{len(labels)} strings each; {fix}"
        )
    return {"probs": probs, "labels": labels, "shards": shards, "keys": keys}


def ensemble(args: Eval) -> dict:
    files = [f for f in (args.probs or "").split(",") if f]
    if len(files) < 2:
        raise ConfigError("ensemble needs probs=A.npz,B.npz,... (two or more files written by alexnet-eval probs=...)")
    for f in files:
        if not Path(f).exists():
            raise ConfigError(f"probs: {f} does not exist; write it with alexnet-eval ckpt_path=... probs={f}")
    loaded = [read_probs(f) for f in files]
    labels = loaded[0]["labels"]
    check_same_images(files, loaded)
    for f, item in zip(files[1:], loaded[1:], strict=True):
        if item["probs"].shape != loaded[0]["probs"].shape or not np.array_equal(item["labels"], labels):
            raise ConfigError(
                f"{f}: not the same images in the same order as {files[0]}; evaluate every run on "
                "the same data with the same loader"
            )
    probs = np.mean([item["probs"] for item in loaded], axis=0)
    log_probs = torch.from_numpy(np.log(np.maximum(probs, 1e-30)))
    return {"ensemble": files, **metrics(log_probs, torch.from_numpy(labels))}


def check_same_images(files: list[str], loaded: list[dict]) -> None:
    """The files that name their rows' images (shard and key) name the same ones in the same
    order; the first row that differs is named. Files written before alexnet-eval stored keys are
    compared by their labels alone, as before."""
    named = [(f, item) for f, item in zip(files, loaded, strict=True) if item["keys"] is not None]
    if not named:
        return
    first, reference = named[0]
    for f, item in named[1:]:
        rows = zip(reference["shards"], reference["keys"], item["shards"], item["keys"], strict=False)
        for row, (shard_a, key_a, shard_b, key_b) in enumerate(rows):
            if (shard_a, key_a) != (shard_b, key_b):
                raise ConfigError(
                    f"{f}: row {row} is image {shard_b}:{key_b} but in {first} it is {shard_a}:{key_a}; "
                    "evaluate every run on the same data with the same loader and batch_size"
                )
        if len(item["keys"]) != len(reference["keys"]):
            raise ConfigError(
                f"{f}: holds {len(item['keys'])} images but {first} {len(reference['keys'])}; evaluate "
                "every run on the same data with the same loader"
            )


@one_line_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    task = ensemble if argv and argv[0] == "ensemble" else evaluate
    if (args := key_values(Eval, __doc__, argv[1:] if task is ensemble else argv)) is None:
        return
    result = task(args)
    print(json.dumps(result), flush=True)
    print(
        f"top-1 {result['val_top1']:.4f}  top-5 {result['val_top5']:.4f}  (errors {1 - result['val_top1']:.4f} / "
        f"{1 - result['val_top5']:.4f}, {result['val_count']} images)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
