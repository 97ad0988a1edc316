"""alexnet-bench scale: what one rank of a large job costs, as the job grows, simulated one rank at
a time on one machine.

For each loader and world size a fresh process becomes rank `world // 2` of `world` (the data
module's own rank and world, no other ranks and no process group) on a data set of ImageNet's
shape made of tiny JPEGs, and reports from its start to its first training batch (the run with
the median start-up time of --repeats):

- startup_s: seconds from building the data module to holding the first batch;
- files_opened / tars_opened / opens: distinct files (tars among them), and opens, in the data
  folder (Linux inotify, so the opens of every thread and process count: DALI's C++ reader as
  much as Python);
- metadata_bytes: the size of the manifest and index files among them (read whole at most);
- bytes_read: bytes this process read through read() calls in that time (/proc/self/io: data,
  indexes, manifest and also the rank's own temporary index files), plus the pages of data files
  it mapped into memory and touched (/proc/self/smaps);
- rss_mb: its resident memory at the first batch (rss_start_mb: before the data module);
- state_bytes_per_rank: what a checkpoint gathers from this rank (loader state and generator
  states, pickled as the gather sends them), and state_write_s / state_file_mb: writing `world`
  such states in one file with torch.save, as rank zero does;
- epoch_files / epoch_mb: the tars and bytes the rank's slice of epoch 0 covers (from the plan).

A last line gives the gradient bytes each step all-reduces for --model, with and without
ddp.comm_hook=bf16 (from its parameter count).

The wds loader runs in the process itself (loader.workers=0) so that its reads are counted.
"""

import argparse
import ctypes
import importlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from ..config import LOADERS
from ..errors import ConfigError

WORLDS = (8, 64, 512, 1024)
IN_OPEN, IN_ISDIR, IN_Q_OVERFLOW = 0x20, 0x40000000, 0x4000


class Opens:
    """Every open of a file in `folders` (not below them), by any process, from now until
    `files()` (Linux inotify)."""

    def __init__(self, folders: list[Path]):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders = {libc.inotify_add_watch(self.fd, os.fsencode(f), IN_OPEN): f for f in folders}
        self.opened, self.overflow = [], False

    def files(self) -> list[str]:
        while True:
            try:
                events = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            pos = 0
            while pos < len(events):
                wd, mask, _, length = struct.unpack_from("iIII", events, pos)
                name = events[pos + 16 : pos + 16 + length].rstrip(b"\0").decode()
                self.overflow |= bool(mask & IN_Q_OVERFLOW)
                if name and not mask & IN_ISDIR:
                    self.opened.append(str(self.folders[wd] / name))
                pos += 16 + length
        if self.overflow:
            raise ConfigError("too many opens to count (inotify queue overflow); raise fs.inotify.max_queued_events")
        return self.opened


def proc_value(file: str, key: str) -> int:
    """The number after `key` in /proc/self/<file> (io: bytes; status: kB)."""
    for line in Path("/proc/self", file).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def read_bytes() -> int:
    """Bytes this process has read through read() and its kin."""
    return proc_value("io", "rchar:")


def mapped_bytes(root: Path) -> int:
    """Resident bytes of this process's mappings of files under `root`."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(str(root))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def rss_mb() -> float:
    return proc_value("status", "VmRSS:") / 1024


def one_rank(root: Path, loader: str, world: int, rank: int, batch: int, crop: int) -> dict:
    """The figures of rank `rank` of `world`, measured in this process (see the module's text)."""
    import torch

    from ..config import Data, make
    from ..config import Loader as LoaderSettings
    from ..data.datamodule import ShardDataModule
    from ..training.checkpoint import rng_state

    importlib.import_module(LOADERS[loader].module)  # DALI's imports nvidia.dali: before the clock starts

    folders = [root, *(p for p in root.iterdir() if p.is_dir())]
    start_rss, opens, before = rss_mb(), Opens(folders), read_bytes()
    start = time.perf_counter()
    data = ShardDataModule(
        make(Data, {"root": str(root), "batch_size": batch * world, "crop": crop}),
        make(LoaderSettings, {"name": loader, "workers": 0}),
        rank=rank,
        world=world,
    )
    train = data.train_dataloader()
    images = next(iter(train)).images
    startup = time.perf_counter() - start
    got = read_bytes() - before
    opened = opens.files()
    files = set(opened)
    figures = {
        "startup_s": round(startup, 3),
        "files_opened": len(files),
        "tars_opened": sum(f.endswith(".tar") for f in files),
        "opens": len(opened),
        "metadata_bytes": sum(os.path.getsize(f) for f in files if not f.endswith(".tar")),
        "bytes_read": got + mapped_bytes(root),
        "rss_mb": round(rss_mb(), 1),
        "rss_start_mb": round(start_rss, 1),
        "batch": len(images),
    }
    state = {"loader": data.order_state(), "rng": rng_state()}
    figures["state_bytes_per_rank"] = len(pickle.dumps(state))  # what gather_object sends
    with tempfile.TemporaryDirectory() as tmp:  # rank zero writes every rank's state in one file
        path = Path(tmp) / "states.pt"
        begin = time.perf_counter()
        states = [pickle.loads(pickle.dumps(state)) for _ in range(world)]  # distinct, as gathered
        torch.save({"loader": [s["loader"] for s in states], "rng": [s["rng"] for s in states]}, path)
        figures["state_write_s"] = round(time.perf_counter() - begin, 4)
        figures["state_file_mb"] = round(path.stat().st_size / 2**20, 3)
    use = data.plan("train").shard_use(0)
    figures["epoch_files"] = len(use)
    figures["epoch_mb"] = round(sum(os.path.getsize(s.tar) * n / s.count for s, n in use.items()) / 2**20, 2)
    return figures


def constant(data: bytes) -> bytes:
    return data


def tiny_source(train: int, val: int, classes: int, size: int):
    """ImageNet's shape in tiny images: one size x size JPEG per class, reused (the shard writer
    keeps JPEG bytes as they are)."""
    from PIL import Image

    from ..data.sources import Sample, Source

    jpegs = []
    for c in range(classes):
        out = io.BytesIO()
        Image.new("RGB", (size, size), (c * 37 % 256, c * 91 % 256, c * 53 % 256)).save(out, format="JPEG")
        jpegs.append(out.getvalue())
    splits = {
        split: [Sample(f"{split}-{i:07d}", partial(constant, jpegs[i % classes]), i % classes) for i in range(n)]
        for split, n in (("train", train), ("val", val))
    }
    return Source([f"class{c:04d}" for c in range(classes)], splits)


def make_tiny_set(out: Path, train: int, val: int, classes: int, shards: int, size: int) -> None:
    """The data set, unless `out` holds one made with the same shape."""
    from ..data.manifest import MANIFEST
    from ..data.shards import write_dataset

    shape = {"train": train, "val": val, "classes": classes, "shards": shards, "size": size}
    mark = out / "tiny-set.json"
    if (out / MANIFEST).exists() and mark.exists() and json.loads(mark.read_text()) == shape:
        return
    if out.exists() and any(out.iterdir()) and not mark.exists():
        raise ConfigError(f"--data {out}: holds other files; give scale mode an empty or new folder")
    print(f"writing {train:,} + {val:,} tiny images in about {shards} shards to {out} ...", file=sys.stderr)
    per_shard = -(-train // shards)
    write_dataset(
        tiny_source(train, val, classes, size),
        out,
        source_name=f"tiny {size}px",
        shard_size=per_shard,
        min_shards=shards,
        workers=os.cpu_count() or 1,
        progress=False,
    )
    mark.write_text(json.dumps(shape))


def run(args) -> list[dict]:
    """Makes the data set when needed, then measures each loader at each world size, every rank
    in a fresh process."""
    if not args.data:
        raise ConfigError("scale mode needs --data DIR (where the tiny data set is, or is to be written)")
    root = Path(args.data).expanduser().resolve()
    make_tiny_set(root, args.samples, args.val_samples, args.num_classes, args.shards, args.image_size)
    here = [name for name, entry in LOADERS.items() if entry.missing() is None]  # the loaders that run here
    loaders = [args.loader] if args.loader != "auto" else here
    rows = []
    for loader in loaders:
        for world in args.worlds:
            # the crop is the stored image: DALI cuts crops out of it
            size = str(args.image_size)
            cmd = [sys.executable, "-m", __name__, str(root), loader, str(world), str(args.batch_size), size]
            runs = []
            for _ in range(args.repeats):
                done = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode != 0 or not lines:
                    why = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    raise ConfigError(f"scale: the {loader} rank of {world} failed: {why}")
                runs.append(json.loads(lines[-1]))
            median = sorted(runs, key=lambda r: r["startup_s"])[len(runs) // 2]  # times vary, counts do not
            rows.append({"name": "scale/rank", "loader": loader, "world_size": world, **median})
    return rows + [gradient_bytes(args.model, args.num_classes)]


def gradient_bytes(model: str, num_classes: int) -> dict:
    """What DDP all-reduces each step, at any world size: every gradient element once, in fp32 or,
    with ddp.comm_hook=bf16, in bf16 (counted from the model, not measured on a network)."""
    from ..models import create

    parameters = sum(p.numel() for p in create(model, num_classes).parameters() if p.requires_grad)
    return {
        "name": "scale/step",
        "model": model,
        "parameters": parameters,
        "allreduce_bytes": 4 * parameters,
        "allreduce_bytes_bf16": 2 * parameters,
    }


def parse_worlds(text: str) -> tuple[int, ...]:
    try:
        worlds = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give world sizes as numbers, e.g. 8,64,512,1024") from None
    if not worlds or min(worlds) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: world sizes must be 1 or more")
    return worlds


if __name__ == "__main__":  # one rank: DATA LOADER WORLD BATCH CROP
    root, loader, world, batch, crop = sys.argv[1:6]
    figures = one_rank(Path(root), loader, int(world), int(world) // 2, int(batch), int(crop))
    print(json.dumps({"rank": int(world) // 2, **figures}), flush=True)
