"""Writing WebDataset shards (<key>.jpg + <key>.cls), their DALI index files and manifest.json.

A shard is a plain tar. Beside each tar lies the index file DALI's webdataset reader uses to
seek to samples ("v1.2 <count>" then one line per sample: ext offset size name ...), written
from the offsets we know while writing, so no separate wds2idx pass is needed.
"""

import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from .manifest import MANIFEST
from .sources import Sample, Source
from .transforms import center_crop as crop_center
from .transforms import resize_short


def to_storage(image: Image.Image, resize: int | None, center_crop: bool) -> Image.Image:
    """RGB (or L for grey sources), short side resized to `resize`, optionally centre-cropped
    square: the paper's storage format is short side 256 then the central 256x256 (section 2)."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # CMYK, palette, RGBA, 16-bit grey ...
    if resize:
        image = resize_short(image, resize, Image.BICUBIC)  # bicubic: stored once, read many times
        if center_crop:
            image = crop_center(image, resize)
    return image


def encode(sample: Sample, resize: int | None, center_crop: bool, quality: int) -> tuple[bytes, Image.Image]:
    item = sample.load()
    if isinstance(item, bytes):
        try:
            image = Image.open(io.BytesIO(item))
            image.load()
        except Exception as exc:
            raise DataError(f"{sample.key}: cannot decode image ({exc})") from None
        if image.format == "JPEG" and image.mode in ("RGB", "L") and not resize:
            return item, image  # already a JPEG we can decode as-is: keep the original bytes
    else:
        image = item
    image = to_storage(image, resize, center_crop)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue(), image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    # The data starts right after this member's header; DALI's index wants that offset.
    offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(data))
    return offset, info.size


def write_shard(path: Path, samples: list[Sample], resize, center_crop, quality, stats: bool):
    """Writes one tar and its index atomically; returns the count, skipped keys, sizes and the
    per-channel sum and sum of squares (0-255 scale, RGB) when `stats` is set."""
    tmp = path.with_suffix(".tar.tmp")
    index_lines, skipped, sizes, labels = [], [], set(), {}
    sums, sq, pixels = np.zeros(3), np.zeros(3), 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            try:
                data, image = encode(sample, resize, center_crop, quality)
            except DataError as exc:
                skipped.append(str(exc))
                continue
            sizes.add(image.size)
            labels[sample.label] = labels.get(sample.label, 0) + 1
            parts = []
            for ext, payload in (("jpg", data), ("cls", str(sample.label).encode())):
                offset, size = _add(tar, f"{sample.key}.{ext}", payload)
                parts.append(f"{ext} {offset} {size} {sample.key}.{ext}")
            index_lines.append(" ".join(parts))
            if stats:
                a = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
                sums += a.sum(0)
                sq += (a * a).sum(0)
                pixels += len(a)
    os.replace(tmp, path)
    idx = path.with_suffix(".idx")
    idx.write_text(f"v1.2 {len(index_lines)}\n" + "\n".join(index_lines) + "\n")
    result = {
        "count": len(index_lines),
        "skipped": skipped,
        "sizes": sorted(sizes),
        "sums": sums.tolist(),
        "squares": sq.tolist(),
        "pixels": pixels,
        "labels": {str(k): v for k, v in labels.items()},
        "plan": plan_digest(samples),
    }
    # Written last: a shard with its .json beside it is finished, and a re-run keeps it.
    done = path.with_suffix(".json.tmp")
    done.write_text(json.dumps(result))
    os.replace(done, path.with_suffix(".json"))
    return result


def plan_digest(samples: list[Sample]) -> str:
    return hashlib.sha1("\n".join(f"{s.key} {s.label}" for s in samples).encode()).hexdigest()


def finished_shard(path: Path, samples: list[Sample]) -> dict | None:
    """The record of a shard an earlier run finished with exactly these samples, if any."""
    record = path.with_suffix(".json")
    if not (record.exists() and path.exists() and path.with_suffix(".idx").exists()):
        return None
    try:
        result = json.loads(record.read_text())
    except json.JSONDecodeError:
        return None
    return result if result.get("plan") == plan_digest(samples) else None


def verify_split(out: Path, split: str, shards: list[dict], expected: dict) -> None:
    """Reads every shard's labels back and compares the counts per class with what was written."""
    found = {}
    for shard in shards:
        with tarfile.open(out / shard["tar"]) as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    label = tar.extractfile(member).read().decode().strip()
                    found[label] = found.get(label, 0) + 1
    if found != expected:
        wrong = sorted(set(found) | set(expected), key=lambda k: int(k))
        diff = [
            f"class {k}: {found.get(k, 0)} in the shards, {expected.get(k, 0)} written"
            for k in wrong
            if found.get(k, 0) != expected.get(k, 0)
        ]
        raise DataError(
            f"{out / split}: verification failed ({'; '.join(diff[:3])}); delete {out / split} and "
            "re-run alexnet-prepare"
        )


def _clean_key(key: str) -> str:
    # webdataset splits a file name at its first dot and DALI at its last: keep keys dot-free.
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def write_dataset(
    source: Source,
    out: Path,
    *,
    source_name: str,
    resize: int | None = None,
    center_crop: bool = False,
    quality: int = 90,
    shard_size: int = 5000,
    min_shards: int = 8,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Shuffles each split (so every shard holds a mix of classes), cuts it into shards of at
    most `shard_size` samples and at least `min_shards` shards (so several ranks and loader
    workers each get some), writes them, then manifest.json."""
    out = Path(out)
    manifest = {
        "version": 1,
        "source": source_name,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "splits": {},
    }
    all_sizes = set()
    for split, samples in source.splits.items():
        samples = [Sample(_clean_key(s.key), s.load, s.label) for s in samples]
        if len({s.key for s in samples}) != len(samples):
            raise DataError(
                f"{split}: two images map to the same shard key; rename files that differ only in punctuation"
            )
        random.Random(seed).shuffle(samples)
        n_shards = max(math.ceil(len(samples) / shard_size), min(min_shards, len(samples)))
        per = math.ceil(len(samples) / n_shards)
        (out / split).mkdir(parents=True, exist_ok=True)
        plan = [(out / split / f"{i:06d}.tar", samples[i * per : (i + 1) * per]) for i in range(n_shards)]
        plan = [(p, s) for p, s in plan if s]
        shards, skipped, total = [], [], 0
        sums, sq, pixels = np.zeros(3), np.zeros(3), 0
        bar = tqdm(total=len(samples), desc=f"{split} shards", unit="img", disable=not progress)
        class_counts = {}
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            # Resumable: shards an earlier run finished with the same samples are kept.
            futures = [
                finished_shard(path, chunk)
                or pool.submit(write_shard, path, chunk, resize, center_crop, quality, split == "train")
                for path, chunk in plan
            ]
            for (path, chunk), future in zip(plan, futures, strict=True):
                r = future if isinstance(future, dict) else future.result()
                bar.update(len(chunk))
                shards.append(
                    {
                        "tar": f"{split}/{path.name}",
                        "index": f"{split}/{path.with_suffix('.idx').name}",
                        "count": r["count"],
                    }
                )
                skipped += r["skipped"]
                total += r["count"]
                all_sizes |= {tuple(size) for size in r["sizes"]}
                sums, sq, pixels = sums + r["sums"], sq + r["squares"], pixels + r["pixels"]
                for label, n in r["labels"].items():
                    class_counts[label] = class_counts.get(label, 0) + n
        bar.close()
        verify_split(out, split, shards, class_counts)
        manifest["splits"][split] = {
            "count": total,
            "shards": shards,
            "skipped": skipped,
            "class_counts": dict(sorted(class_counts.items(), key=lambda kv: int(kv[0]))),
        }
        if split == "train" and pixels:
            mean = sums / pixels
            manifest["mean"] = [round(float(v), 3) for v in mean]
            manifest["std"] = [round(float(v), 3) for v in np.sqrt(np.maximum(sq / pixels - mean**2, 0))]
    # One size for every image (square storage) lets configs and checks rely on it.
    manifest["min_side"] = min((min(size) for size in all_sizes), default=None)  # the smallest stored side
    manifest["image_size"] = list(all_sizes.pop()) if len(all_sizes) == 1 else None
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest
