"""Build a small image-folder fixture of real-photo JPEGs for data-loader benchmarks.

Loader speed depends on JPEG decode cost, which depends on image size and content
entropy, so synthetic noise or tiny images give misleading numbers. We start from a
handful of real ImageNet photos (e.g. the ones shipped in the `foolbox` wheel under
foolbox/data/imagenet_*.jpg) and derive many distinct files from them.

    python launch/bench/make_jpeg_fixture.py --src SEEDS --out /work/bench-data/imagefolder

Output: OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg. Labels are arbitrary
(seed i feeds class i % classes); only sizes and pixel statistics matter here.
"""

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def vary(img: Image.Image, rng: random.Random) -> Image.Image:
    # Rescale so the decoded sizes spread out like a real dataset instead of all
    # matching the seed's size.
    s = rng.uniform(0.8, 1.2)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR)

    # Crop with independent side fractions so aspect ratios vary too.
    w, h = round(img.width * rng.uniform(0.8, 1.0)), round(img.height * rng.uniform(0.8, 1.0))
    x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
    img = img.crop((x, y, x + w, y + h))

    if rng.random() < 0.5:
        img = ImageOps.mirror(img)

    # Slight per-channel gain plus brightness shift: the files stay photo-like but are
    # not byte-identical, so no layer (page cache, dedup, codec) can shortcut them.
    a = np.asarray(img, dtype=np.float32)
    gain = np.array([rng.uniform(0.9, 1.1) for _ in range(3)], dtype=np.float32)
    a = a * gain + rng.uniform(-10, 10)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True, help="directory of seed JPEGs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    seeds = sorted(args.src.glob("*.jp*g")) + sorted(args.src.glob("*.JP*G"))
    if not seeds:
        raise SystemExit(f"no JPEGs in {args.src}")
    photos = [Image.open(f).convert("RGB") for f in seeds]
    rng = random.Random(args.seed)

    for split, n in (("train", args.train), ("val", args.val)):
        for i in range(n):
            k = i % len(photos)
            cls_dir = args.out / split / f"class_{k % args.classes:03d}"
            cls_dir.mkdir(parents=True, exist_ok=True)
            # Quality 90 matches typical re-encoded training sets; ImageNet itself is ~q75-96.
            vary(photos[k], rng).save(cls_dir / f"{split}_{i:06d}.jpg", quality=90)
        print(f"{split}: {n} images from {len(photos)} seeds -> {args.out / split}")


if __name__ == "__main__":
    main()
