"""alexnet-prepare SOURCE --src DIR --out DIR: image folders, ImageNet, Fashion-MNIST or synthetic images to shards;
alexnet-prepare index --train PATTERN (--val PATTERN | --val-fraction F) --out DIR: a manifest for WebDataset tars
made elsewhere.
--out may be s3://BUCKET/PREFIX: the files are made in a local staging folder and uploaded as they are finished."""

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .. import locks
from ..data import sources, store
from ..data.index import MAX_SKIPPED
from ..data.manifest import MANIFEST
from ..data.members import IMAGES, index_format
from ..data.shards import write_dataset
from ..errors import ConfigError, DataError
from . import one_line_errors, refuse_credentials


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="alexnet-prepare", description=__doc__)
    p.add_argument(
        "source",
        choices=["imagefolder", "imagenet", "fashion-mnist", "synthetic", "stats", "index"],
        help="stats: the mean image, channel means and colour axes of the shards in --out; "
        "index: index existing WebDataset tars (--train, --val) where they lie, copying nothing",
    )
    p.add_argument(
        "--src",
        type=Path,
        help="input: SRC/train/<class>/* (imagefolder, imagenet: also SRC/train/<wnid>.tar) "
        "or the IDX files' folder (fashion-mnist)",
    )
    p.add_argument(
        "--val-labels",
        type=Path,
        help="imagenet with flat SRC/val/*.JPEG: the devkit's "
        "ILSVRC2012_validation_ground_truth.txt (meta.mat beside it), "
        "LOC_val_solution.csv or one synset id per line "
        "(default SRC/LOC_val_solution.csv)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder for train/, val/ and manifest.json, or s3://BUCKET/PREFIX (made in --staging, "
        "each file uploaded as it is finished, manifest.json last)",
    )
    p.add_argument(
        "--staging",
        type=Path,
        help=f"s3:// --out: the local folder it is made in before upload (default {store.STAGING}/BUCKET/PREFIX, "
        "removed once all is uploaded; a folder named here is kept)",
    )
    p.add_argument("--resize", type=int, help="resize so the short side is this many pixels (the paper: 256)")
    p.add_argument(
        "--center-crop", action="store_true", help="after --resize, keep the central square (the paper's 256x256)"
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--shard-size", type=int, default=5000, help="at most this many samples per shard")
    p.add_argument(
        "--min-shards",
        type=int,
        default=8,
        help="at least this many shards per split: each epoch reads whole shards in a new order, so more mix better "
        "(default 8)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0, help="shuffles samples across shards (and draws synthetic images)")
    p.add_argument("--sample", type=int, default=10000, help="stats, index: training images to sample")
    g = p.add_argument_group(
        "index", "WebDataset tars made by other tools: a sample is the members of one key, an image and a label"
    )
    for split in ("train", "val"):
        g.add_argument(
            f"--{split}",
            metavar="PATTERN",
            help=f"the {split} tars: a path, s3:// or http(s):// URL, with {{000000..000099}} ranges, "
            "a local glob, or a folder or s3:// prefix ending in / (every .tar under it)",
        )
    g.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="index without --val: hold out this part (0 < F < 1) of the training samples for validation, "
        "chosen from the hashes of their tar names and keys, the same on every run",
    )
    g.add_argument(
        "--max-skipped",
        type=float,
        metavar="F",
        help=f"index: stop when more than this part of a split's samples is unusable (default {MAX_SKIPPED})",
    )
    g.add_argument(
        "--classes",
        metavar="FILE|N",
        help="index: a file of class names, one a line, for labels 0, 1, ... (default: the train split's class "
        "names, sorted, or 0 up to its largest class number); synthetic: the number of classes (default 10)",
    )
    g.add_argument(
        "--image",
        metavar="EXT",
        help=f"index: the image member's extension, one of {', '.join(IMAGES)} "
        "(default: the first of them a sample has)",
    )
    g.add_argument(
        "--label",
        metavar="SPEC",
        help="index: where the label is: cls (the class number as text; the default), txt (a class name or number) "
        "or json:FIELD (a dotted path into the .json member, holding a class number or name)",
    )
    g = p.add_argument_group("synthetic")
    g.add_argument("--train-count", type=int, default=2000)
    g.add_argument("--val-count", type=int, default=500)
    g.add_argument("--size", type=int, default=32, help="side of the synthetic images")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Settings that cannot work, or would be silently ignored, in one line each."""
    store.check_writable(args.out)  # before anything looks there
    if args.staging and not args.out.startswith("s3://"):
        raise ConfigError(f"--staging is where an s3:// --out is made; --out {args.out} is a local folder")
    if args.source == "index":
        check_index_args(args)
    else:
        if args.train or args.val:
            raise ConfigError(f"--train and --val name the tars of alexnet-prepare index; {args.source} reads --src")
        for name in ("image", "label", "val_fraction", "max_skipped"):
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} is for alexnet-prepare index; {args.source} reads --src")
        try:
            args.classes = int(args.classes or 10)
        except ValueError:
            raise ConfigError(f"--classes {args.classes}: a number of classes (a file of names is for index)") from None
    # (a synthetic split of no images would make a manifest that training refuses later)
    for name in ("shard_size", "min_shards", "workers", "resize", "size", "train_count", "val_count", "sample"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be 1 or more")
    if args.source != "index" and args.classes < 1:
        raise ConfigError(f"--classes {args.classes}: must be 1 or more")
    if not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality {args.quality}: JPEG quality goes from 1 to 100 (default 90)")
    if args.center_crop and not args.resize:
        raise ConfigError("--center-crop crops to the --resize side: pass --resize N too (the paper: 256)")


def check_index_args(args) -> None:
    """index reads --train and either --val or --val-fraction (training needs both splits), and
    stores nothing anew."""
    if not args.train:
        raise ConfigError("index: --train PATTERN missing")
    if args.val and args.val_fraction is not None:
        raise ConfigError(
            "index: --val and --val-fraction both given; validate on the --val tars or on a held-out part"
        )
    if not args.val and args.val_fraction is None:
        raise ConfigError(
            "index: no validation data; give --val PATTERN (validation tars) or --val-fraction F "
            "(hold out that part of the training samples, e.g. 0.05)"
        )
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise ConfigError(f"index: --val-fraction {args.val_fraction:g}: must be between 0 and 1 (e.g. 0.05)")
    if args.max_skipped is None:
        args.max_skipped = MAX_SKIPPED
    elif not 0 <= args.max_skipped <= 1:
        raise ConfigError(
            f"index: --max-skipped {args.max_skipped:g}: a part of the samples, from 0 to 1 (default {MAX_SKIPPED})"
        )
    for name in ("src", "val_labels", "resize"):
        if getattr(args, name) is not None:
            raise ConfigError(f"index: --{name.replace('_', '-')} does not apply (the tars are indexed as they are)")
    if args.center_crop:
        raise ConfigError("index: --center-crop does not apply (the tars are indexed as they are)")
    args.sample_format = index_format(args.image, args.label)


def hold_out_folder(args, argv: list[str]):
    """The lock on the folder --out is made in (for s3://, its staging folder), held open while
    this command writes there; one line naming the holder when another command holds it. Every
    subcommand writes there (shards, index files, manifest.json, stats), so every one takes it."""
    folder = store.Destination(args.out, args.staging).folder
    made = not folder.exists()
    command = " ".join(["alexnet-prepare", *argv])
    try:
        claim = locks.take(
            folder / locks.DATA_FOLDER,
            {"command": command if len(command) <= 200 else command[:197] + "..."},
            "nothing stops a second alexnet-prepare from writing there at the same time",
        )
    except OSError as exc:  # not a folder, no permission, a read-only disk: before anything is made
        raise ConfigError(
            f"{exc.filename or folder}: cannot hold the data set ({exc.strerror}); give --out a folder you can write"
        ) from None
    if isinstance(claim, dict):
        staged = f" (staged in {folder})" if args.out.startswith("s3://") else ""
        raise ConfigError(
            f"{args.out}{staged}: being written by another alexnet-prepare ({locks.describe(claim)}); one writer "
            "per data folder: wait for it to end, or stop it, then run this command again"
        )
    return claim, folder if made else None


def let_go(lock, made: Path | None) -> None:
    """Drops the lock; a folder this command made and left empty (it failed before writing) is
    removed with its lock file, as if never made (while still held, so no other took it)."""
    if made is not None and made.is_dir() and [p.name for p in made.iterdir()] == [locks.DATA_FOLDER]:
        # best effort: on NFS the open lock file becomes .nfsXXXX and the folder stays; the command's
        # own error line must not give way to a traceback for that
        with contextlib.suppress(OSError):
            (made / locks.DATA_FOLDER).unlink()
            made.rmdir()
    lock.close()


@one_line_errors
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_credentials(argv)  # before anything prints or stores it
    args = parse_args(argv)
    check_args(args)
    lock, made = hold_out_folder(args, argv)
    try:
        prepare(args)
    except KeyboardInterrupt:  # Ctrl-C: write_dataset has stopped its workers and dropped their half shards
        print("error: interrupted; finished shards are kept, run the same command again to continue", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    finally:
        let_go(lock, made)  # lets the next writer in


def prepare(args) -> None:
    if args.source == "stats":
        from ..data.stats import compute_stats

        stats = compute_stats(args.out, args.sample, staging=args.staging)
        print(f"{stats['images']} images: channel mean {stats['channel_mean']}, colour axes' std {stats['pca_std']}")
        print(f"wrote {store.join(args.out, 'stats.json')}, mean_image.npy and mean_image.png")
        return
    # A bucket that refuses is one line before anything is read there or made
    store.Destination(args.out, args.staging).check()
    stats = [store.join(args.out, name) for name in ("stats.json", "mean_image.npy")]
    had_stats = any(store.exists(location) for location in stats)
    if args.source == "index":
        from ..data.index import index_shards

        manifest = index_shards(
            args.train,
            args.val,
            args.out,
            classes=args.classes,
            sample=args.sample,
            workers=args.workers,
            fmt=args.sample_format,
            val_fraction=args.val_fraction,
            max_skipped=args.max_skipped,
            staging=args.staging,
        )
        print_skipped(manifest)
    else:
        manifest = write_shards(args)
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['count']} images in {len(info['shards'])} shards"
            + (f", {len(info['skipped'])} skipped (see manifest.json)" if info["skipped"] else "")
        )
    print(f"wrote {store.join(args.out, MANIFEST)}")
    if had_stats and not any(store.exists(location) for location in stats):
        print(
            "removed stats.json and mean_image.* (they described the earlier shards): "
            f"run alexnet-prepare stats --out {args.out} again"
        )


def print_skipped(manifest: dict, shown: int = 20) -> None:
    """The first `shown` skipped samples of each split on stderr, one line each; all are in the manifest."""
    for info in manifest["splits"].values():
        for line in info["skipped"][:shown]:
            print(line, file=sys.stderr)
        if len(info["skipped"]) > shown:
            print(f"... and {len(info['skipped']) - shown} more (see manifest.json)", file=sys.stderr)


def write_shards(args) -> dict:
    """Shards of the images of an image folder, ImageNet, Fashion-MNIST or synthetic images."""
    if args.source == "synthetic":
        source = sources.synthetic(args.classes, args.train_count, args.val_count, args.size, args.seed)
    elif args.source == "fashion-mnist":
        src = args.src or sources.default_fashion_mnist_dir()
        if src is None:
            raise DataError(
                "fashion-mnist: no --src given and /usr/share/datasets/fashion-mnist is absent; "
                "install the Debian package dataset-fashion-mnist or pass --src DIR with the 4 IDX files"
            )
        source = sources.fashion_mnist(src)
    else:
        if args.src is None:
            raise DataError(f"{args.source} needs --src DIR (DIR/train/<class>/*.jpg and DIR/val/...)")
        source = (
            sources.imagefolder(args.src)
            if args.source == "imagefolder"
            else sources.imagenet(args.src, args.val_labels)
        )
    return write_dataset(
        source,
        args.out,
        source_name=args.source,
        resize=args.resize,
        center_crop=args.center_crop,
        quality=args.quality,
        shard_size=args.shard_size,
        min_shards=args.min_shards,
        workers=args.workers,
        seed=args.seed,
        staging=args.staging,
    )


if __name__ == "__main__":
    main()
