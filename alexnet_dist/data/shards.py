"""Writing WebDataset shards (<key>.jpg + <key>.cls), their DALI index files and manifest.json.

A shard is a plain tar. Beside each tar lies the index file DALI's webdataset reader uses to
seek to samples ("v1.2 <count>" then one line per sample: ext offset size name ...), written
from the offsets we know while writing, so no separate wds2idx pass is needed.
"""

import ctypes
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import signal
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from . import shard_index, store
from .images import STORAGE_RULES, encode
from .manifest import MANIFEST, MANIFEST_VERSION
from .members import SampleFormat
from .sources import Sample, Source
from .stats import STATS

# A tar (ustar) header holds 100 bytes of name; "<key>.jpg" must fit without a '/' to split at.
MAX_KEY = 96


def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole or is left as it was: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def index_line(members: list[tuple[str, int, int, str]]) -> str:
    """A sample's line in a DALI index file from its members' (ext, data offset, size, name)."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def write_index(path: Path, lines: list[str]) -> None:
    """A DALI index file of these samples' lines (index_line)."""
    write_atomically(path, shard_index.text(lines))


def channel_stats(sums, squares, pixels: int) -> dict:
    """The manifest's mean and std per channel (0-255 scale) from the pixels' sums and sums of squares."""
    if not pixels:
        return {}
    mean = np.asarray(sums) / pixels
    std = np.sqrt(np.maximum(np.asarray(squares) / pixels - mean**2, 0))
    return {"mean": [round(float(v), 3) for v in mean], "std": [round(float(v), 3) for v in std]}


def size_stats(sizes: set) -> dict:
    """The manifest's min_side (the smallest side of any image) and image_size ([w, h] when every
    image has that one size, which lets configs and checks rely on it; else None)."""
    return {
        "min_side": min((min(size) for size in sizes), default=None),
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
    }


# What describes a data set's shards: the manifest and the statistics (`alexnet-prepare stats`).
DESCRIPTIONS = (MANIFEST, STATS, "mean_image.npy", "mean_image.png")


def forget_dataset(out: Path) -> None:
    """Removes the manifest and the statistics of `out` before its shards change: until the new
    manifest is written the folder is no data set, and an old manifest would list a mix of old and
    new shards. (In a bucket, store.Destination does the same with them, as its `volatile` files.)"""
    for name in DESCRIPTIONS:
        (out / name).unlink(missing_ok=True)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    # The data starts right after this member's header; DALI's index wants that offset.
    offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(data))
    return offset, info.size


_stop = None  # in a pool worker: the main process's "stop now", set on Ctrl-C


def _die_with_parent(main: int) -> None:
    """Ends this pool worker when the main process ends, even by kill -9: nothing else would stop
    it writing shards that no manifest will list. On Linux the kernel sends SIGKILL when the
    parent dies (prctl PR_SET_PDEATHSIG); elsewhere a thread watches for a new parent."""
    parent = os.getppid()
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1: PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux (no prctl), or refused

        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    try:
        os.kill(main, 0)  # the main process died before the request took effect
    except ProcessLookupError:
        os._exit(1)


def _worker_init(stop, main: int) -> None:
    global _stop
    _stop = stop
    # A terminal sends Ctrl-C to the whole process group; the main process alone decides what
    # happens (it sets `stop`), so workers neither die mid-write nor print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(main)


def write_shard(path: Path, samples: list[Sample], settings: dict, stats: bool) -> dict | None:
    """Writes one tar and its index atomically; returns the count, skipped samples, sizes and the
    per-channel sum and sum of squares (0-255 scale, RGB) when `stats` is set. Returns None,
    leaving nothing of the shard, when the main process asks to stop (Ctrl-C)."""
    tmp = path.with_suffix(".tar.tmp")
    index_lines, skipped, sizes, labels = [], [], set(), {}
    sums, sq, pixels = np.zeros(3), np.zeros(3), 0
    stopped = False
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if _stop is not None and _stop.is_set():
                    stopped = True
                    break
                try:
                    data, image = encode(sample, settings["resize"], settings["center_crop"], settings["quality"])
                except DataError as exc:
                    skipped.append(str(exc))
                    continue
                sizes.add(image.size)
                labels[sample.label] = labels.get(sample.label, 0) + 1
                parts = []
                for ext, payload in (("jpg", data), ("cls", str(sample.label).encode())):
                    offset, size = _add(tar, f"{sample.key}.{ext}", payload)
                    parts.append((ext, offset, size, f"{sample.key}.{ext}"))
                index_lines.append(index_line(parts))
                if stats:
                    a = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
                    sums += a.sum(0)
                    sq += (a * a).sum(0)
                    pixels += len(a)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk that filled up, a bug: no half shard stays behind
        raise
    if stopped:
        tmp.unlink()
        return None
    os.replace(tmp, path)
    write_index(path.with_suffix(".idx"), index_lines)
    result = {
        "count": len(index_lines),
        "skipped": skipped,
        "sizes": sorted(sizes),
        "sums": sums.tolist(),
        "squares": sq.tolist(),
        "pixels": pixels,
        "labels": {str(k): v for k, v in labels.items()},
        "plan": plan_digest(samples, settings),
    }
    # Written last: a shard with its .json beside it is finished, and a re-run keeps it.
    write_atomically(path.with_suffix(".json"), json.dumps(result))
    return result


def plan_digest(samples: list[Sample], settings: dict) -> str:
    """What a shard's bytes depend on: its samples' keys and labels, and every setting that
    changes how they are stored (source, resize, crop, quality, the conversion rules)."""
    lines = [json.dumps(settings, sort_keys=True)] + [f"{s.key} {s.label}" for s in samples]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def finished_shard(path: Path, samples: list[Sample], settings: dict) -> dict | None:
    """The record of a shard an earlier run finished with exactly these samples and settings."""
    record = path.with_suffix(".json")
    if not (record.exists() and path.exists() and path.with_suffix(".idx").exists()):
        return None
    try:
        result = json.loads(record.read_text())
    except json.JSONDecodeError:
        return None
    return result if result.get("plan") == plan_digest(samples, settings) else None


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


def shard_keys(samples: list[Sample], split: str) -> list[Sample]:
    """The samples under keys a shard can hold: only [A-Za-z0-9_-], so dot-free (webdataset
    splits a member's name at its first dot, DALI at its last), and short enough for a tar
    header. Where cleaning makes two keys equal ('café/x' and 'cafe_/x', 'a.b/x' and 'a_b/x')
    or cuts one short, a hash of the original key is appended: every image keeps its own key,
    the same on every run."""
    clean = [re.sub(r"[^A-Za-z0-9_-]", "_", s.key) for s in samples]
    counts = Counter(clean)
    keys = [
        k
        if counts[k] == 1 and len(k) <= MAX_KEY
        else f"{k[: MAX_KEY - 9]}_{hashlib.sha1(s.key.encode(errors='surrogateescape')).hexdigest()[:8]}"
        for k, s in zip(clean, samples, strict=True)
    ]
    seen = {}
    for key, s in zip(keys, samples, strict=True):
        if key in seen:
            raise DataError(
                f"{seen[key]} and {s.origin or s.key}: two {split} images with the key {s.key!r}; rename one of them"
            )
        seen[key] = s.origin or s.key
    return [dataclasses.replace(s, key=k) for k, s in zip(keys, samples, strict=True)]


def _remove_stale(folder: Path, plan: list) -> None:
    """Removes the shards of an earlier plan with more of them (another --shard-size) and the
    .tmp files of a killed run: no manifest lists them, but they mislead whoever looks."""
    keep = {path.stem for path, _ in plan}
    for f in folder.iterdir():
        m = re.fullmatch(r"(\d{6})\.(tar|idx|json)(\.tmp)?", f.name)
        if m and (m[3] or m[1] not in keep) and f.is_file():
            f.unlink()


def _write_split(
    pool, split: str, plan: list, settings: dict, finished: dict, progress: bool, dest: store.Destination
) -> list[dict]:
    """Each shard's record, in plan order: the `finished` one an earlier run left, written otherwise;
    each shard and its index put to `dest` (uploaded to a bucket) as soon as it is there."""
    futures = [
        finished[path] or pool.submit(write_shard, path, chunk, settings, split == "train") for path, chunk in plan
    ]
    results = []
    with tqdm(total=sum(len(c) for _, c in plan), desc=f"{split} shards", unit="img", disable=not progress) as bar:
        for (path, chunk), future in zip(plan, futures, strict=True):
            results.append(future if isinstance(future, dict) else future.result())
            for name in (f"{split}/{path.name}", f"{split}/{path.with_suffix('.idx').name}"):
                dest.put(name)
            bar.update(len(chunk))
    return results


def write_dataset(
    source: Source,
    out: Path | str,
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
    staging: Path | None = None,
) -> dict:
    """Shuffles each split (so every shard holds a mix of classes), cuts it into shards of at
    most `shard_size` samples and at least `min_shards` shards (so several ranks and loader
    workers each get some), writes them, then manifest.json. `out`: a folder, or an s3:// prefix
    (made in `staging` and uploaded: store.Destination)."""
    dest = store.Destination(out, staging, volatile=DESCRIPTIONS)
    dest.check()
    out = dest.folder
    # Every setting that changes a shard's bytes: a re-run with other ones rewrites its shards.
    settings = {
        "source": source_name,
        "origin": source.origin,
        "resize": resize,
        "center_crop": center_crop,
        "quality": quality,
        "rules": STORAGE_RULES,
    }
    plans = {}
    for split, samples in source.splits.items():
        samples = shard_keys(samples, split)
        random.Random(seed).shuffle(samples)
        n_shards = max(math.ceil(len(samples) / shard_size), min(min_shards, len(samples)))
        per = math.ceil(len(samples) / n_shards)
        plan = [(out / split / f"{i:06d}.tar", samples[i * per : (i + 1) * per]) for i in range(n_shards)]
        plans[split] = [(p, s) for p, s in plan if s]
    # Resumable: shards an earlier run finished with the same samples and settings are kept.
    finished = {path: finished_shard(path, chunk, settings) for plan in plans.values() for path, chunk in plan}
    for split, plan in plans.items():
        # An earlier run's shard that these settings do not keep: say why the run takes so long.
        redo = sum(1 for path, _ in plan if path.exists() and not finished[path])
        if redo:
            print(
                f"{split}: rewriting {redo} of {len(plan)} shards (made with other settings, from another source "
                "or source path, or by an older alexnet-prepare)",
                flush=True,
            )
    try:
        for split in plans:
            (out / split).mkdir(parents=True, exist_ok=True)
        if not all(finished.values()):
            # Until the new manifest is written the folder is no data set: an old manifest would
            # list shards this run is rewriting, a mix of both. (When every shard is kept, the old
            # one stays until the new one replaces it: a Ctrl-C now leaves a whole data set.) The
            # statistics (`alexnet-prepare stats`) describe shards that are about to change.
            forget_dataset(out)
    except OSError as exc:
        raise DataError(f"{exc.filename}: cannot write there ({exc.strerror}); pass --out a writable folder") from None
    context = multiprocessing.get_context()
    stop = context.Event()
    results = {}
    with ProcessPoolExecutor(
        max(1, workers), mp_context=context, initializer=_worker_init, initargs=(stop, os.getpid())
    ) as pool:
        try:
            for split, plan in plans.items():
                results[split] = _write_split(pool, split, plan, settings, finished, progress, dest)
        except BrokenProcessPool:  # the OOM killer, a kill -9
            raise DataError(
                f"{out}: a worker writing shards died (killed, or out of memory?); finished shards are kept: "
                "run the same command again, with fewer --workers if memory ran out"
            ) from None
        except BaseException:  # Ctrl-C, an upload that failed: no more shards
            stop.set()  # each worker drops its shard at its next image; finished shards are kept
            pool.shutdown(cancel_futures=True)
            raise
    manifest = {
        "version": MANIFEST_VERSION,
        "source": source_name,
        "classes": source.classes,
        "num_classes": len(source.classes),
        **SampleFormat().record(),  # <key>.jpg and <key>.cls, the class number
        # How every image was stored, so that a photo can later be read as its stored copy would
        # be (data/photos.py). Manifests written before it lack it: readers take it as unknown.
        "storage": {"resize": resize, "center_crop": center_crop, "quality": quality},
        "splits": {},
    }
    all_sizes = set()
    for split, plan in plans.items():
        shards, skipped, total = [], list(source.skipped.get(split, [])), 0
        sums, sq, pixels = np.zeros(3), np.zeros(3), 0
        class_counts = {}
        for (path, _), r in zip(plan, results[split], strict=True):
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
        verify_split(out, split, shards, class_counts)
        _remove_stale(out / split, plan)
        dest.prune(split, r"\d{6}\.(tar|idx)")
        manifest["splits"][split] = {
            "count": total,
            "shards": shards,
            "skipped": skipped,
            "class_counts": dict(sorted(class_counts.items(), key=lambda kv: int(kv[0]))),
        }
        if split == "train":
            manifest.update(channel_stats(sums, sq, pixels))
    manifest.update(size_stats(all_sizes))
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1))
    dest.put(MANIFEST)  # last: every file it names is in place
    if report := dest.finish():
        print(report, flush=True)
    return manifest
