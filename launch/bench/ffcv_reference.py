"""FFCV CPU loader throughput on an image folder, as a reference for our own loaders.

FFCV is not a project dependency (it needs libturbojpeg/OpenCV headers and pins its own
stack), so run this from a separate venv, e.g. /work/ffcv-venv:

    /work/ffcv-venv/bin/python launch/bench/ffcv_reference.py --data /work/bench-data/imagefolder

Prints one JSON line per measurement, in the same spirit as `alexnet-bench --mode loader`.
"""

import argparse
import json
import time
from pathlib import Path

from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter
from PIL import Image


class ImageFolder:
    """Minimal indexable (PIL image, label) dataset; avoids pulling in torchvision."""

    def __init__(self, root: Path):
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.items = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).glob("*.jpg"))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return Image.open(path).convert("RGB"), label


def write_beton(folder: Path, beton: Path, workers: int) -> None:
    # JPEG storage (not 'raw') so FFCV pays a real JPEG decode per sample, like the
    # loaders we compare against; max_resolution=None keeps the original sizes.
    # Note FFCV re-encodes with OpenCV at jpeg_quality=90, the fixture's own quality.
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=None, jpeg_quality=90), "label": IntField()}
    DatasetWriter(str(beton), fields, num_workers=workers).from_indexed_dataset(ImageFolder(folder))


def measure(name: str, beton: Path, args, image_pipeline, label_pipeline) -> dict:
    loader = Loader(
        str(beton),
        batch_size=args.batch_size,
        num_workers=args.workers,
        order=OrderOption.RANDOM,
        drop_last=True,
        pipelines={"image": image_pipeline, "label": label_pipeline},
    )
    # The first epoch includes numba JIT compilation and page-cache warm-up; ignore it.
    for _ in loader:
        pass
    images, start = 0, time.perf_counter()
    for _ in range(args.epochs):
        for batch in loader:
            images += len(batch[0])
    seconds = time.perf_counter() - start
    return {
        "name": name,
        "images_per_sec": round(images / seconds, 1),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "images": images,
        "seconds": round(seconds, 3),
        "epochs": args.epochs,
        "crop": args.size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="image folder with train/<class>/*.jpg")
    p.add_argument("--beton", type=Path, help="default: DATA/train_jpg.beton")
    p.add_argument("--rebuild", action="store_true", help="rewrite the .beton even if it exists")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="also time decode + random-resized-crop alone (no flip, no tensor conversion)",
    )
    args = p.parse_args()

    beton = args.beton or args.data / "train_jpg.beton"
    if args.rebuild or not beton.exists():
        write_beton(args.data / "train", beton, args.workers)

    crop = RandomResizedCropRGBImageDecoder((args.size, args.size))
    full = [crop, RandomHorizontalFlip(), ToTensor(), ToTorchImage()]
    print(json.dumps(measure("ffcv", beton, args, full, [IntDecoder(), ToTensor()])), flush=True)
    if args.decode_only:
        # FFCV has no plain decoder for mixed-size images, so the crop+resize stays in;
        # None drops the label field entirely.
        crop = RandomResizedCropRGBImageDecoder((args.size, args.size))
        print(json.dumps(measure("ffcv/decode-only", beton, args, [crop], None)), flush=True)


if __name__ == "__main__":
    main()
