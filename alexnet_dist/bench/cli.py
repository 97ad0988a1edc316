"""alexnet-bench MODE ...: throughput measurements, one JSON object per line.

model   forward + backward + SGD step on random tensors already on the device (compute ceiling)
loader    a loader alone (--loader dali or wds), reading shards made by alexnet-prepare, the
          training augmentation of --augment, batches delivered where training would use them
train     the whole framework: the loader, the data module and Lightning's training step, with
          the share of step time spent waiting for data
baseline  a plain PyTorch loop over a plain webdataset + PIL DataLoader, same model, optimiser,
          batch and precision: what one would write without this project
ddp       train with 1 process, then with --devices processes (DDP): the scaling efficiency
scale     what one rank costs at start-up (time, files, bytes, memory, checkpoint state) as the
          world grows, one simulated rank at a time on a data set of ImageNet's shape in tiny
          images, written to --data first (see scale.py)
"""

import argparse
import difflib
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..cli import one_line_errors, refuse_credentials
from ..config import LOADERS, Data, Loader, Optim, make, own_keys
from ..errors import ConfigError
from ..models import compiled, complete, create, named_config
from . import scale
from .scale import WORLDS, parse_worlds


class Help(argparse.RawDescriptionHelpFormatter):
    """The module's text as written, and every option's default beside its help."""

    def _get_help_string(self, action):  # how argparse's own ArgumentDefaultsHelpFormatter adds it
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, answering a wrong option in one `error:` line (the nearest option named) like the
    other commands, instead of a usage block."""

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = unknown[0].split("=")[0]
            # every option string the parser knows (argparse keeps them in this mapping)
            nearest = difflib.get_close_matches(flag, list(self._option_string_actions), n=1, cutoff=0.5)
            hint = f"the nearest is {nearest[0]}" if nearest else "alexnet-bench --help lists them"
            self.error(f"{flag}: no such option ({hint})")
        return parsed

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(prog="alexnet-bench", description=__doc__, formatter_class=Help)
    p.add_argument("mode", choices=["model", "loader", "train", "baseline", "ddp", "scale"])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if cuda else "cpu", help="where to run")
    p.add_argument(
        "--model",
        default="alexnet2012",
        help="a model config of conf/model (alexnet_small) or any class by its dotted name",
    )
    p.add_argument("--num-classes", type=int, default=1000, help="model mode: the classifier's classes")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--size", type=int, default=224, help="input side for model mode; crop for loader mode")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="model mode: torch.compile the whole model")
    p.add_argument(
        "--fuse-norms", action="store_true", help="model mode: torch.compile only the LRN and spatial-norm blocks"
    )
    p.add_argument(
        "--data", help="loader mode: where manifest.json is (a folder, s3://bucket/prefix or http(s)://host/path)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="loader mode: time whole epochs instead of --steps, one line each with the bytes fetched from the store",
    )
    p.add_argument("--cache", help="loader mode: a node-local folder caching remote tars (data.cache_dir)")
    p.add_argument(
        "--cache-limit-gb",
        type=float,
        default=make(Data, {"root": "-"}).cache_limit_gb,
        help="loader mode: the cache's size limit (data.cache_limit_gb)",
    )
    p.add_argument(
        "--against",
        help="loader mode: the same shards elsewhere (say, on local disk), measured right after --data in the same "
        "run; adds a line with the ratio of the two speeds",
    )
    p.add_argument(
        "--loader", choices=["auto", *LOADERS], default="auto", help="which loader (auto: DALI where it imports)"
    )
    p.add_argument(
        "--augment",
        choices=["paper", "modern"],
        default="paper",
        help="loader mode: paper (random crop of the stored image + flip) or modern (random-resized crop + flip)",
    )
    loader = make(Loader)  # the loader settings' defaults, declared once in config.py
    p.add_argument("--workers", type=int, default=loader.workers, help="loader mode: worker processes (wds)")
    p.add_argument("--threads", type=int, default=loader.threads, help="loader mode: DALI threads (dali)")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="train mode: DDP processes (default 1); ddp mode: processes to compare with one (default 2)",
    )
    p.add_argument(
        "--shuffle-window",
        type=int,
        default=make(Data, {"root": "-"}).shuffle_window,
        help="loader mode: samples shuffled together within a part of the epoch's order (data.shuffle_window)",
    )
    scale = p.add_argument_group("scale mode")
    scale.add_argument("--worlds", type=parse_worlds, default=WORLDS, help="world sizes, e.g. 8,64,512,1024")
    scale.add_argument("--samples", type=int, default=1_281_167, help="training images (ImageNet's)")
    scale.add_argument("--val-samples", type=int, default=50_000, help="validation images (ImageNet's)")
    scale.add_argument("--shards", type=int, default=1000, help="training shards")
    scale.add_argument("--image-size", type=int, default=8, help="stored side of the tiny images (also the crop)")
    scale.add_argument("--repeats", type=int, default=3, help="fresh processes per point; the median start-up is kept")
    return p.parse_args(argv)


# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, SXM parts), for the
# fraction of peak that model mode reports on a GPU.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_device(args) -> torch.device:
    if args.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--device gpu: no CUDA device is visible; use --device cpu")
    return torch.device("cuda" if args.device == "gpu" else "cpu")


def data_module(args, target: torch.device, **loader):
    """The shards of --data with the configured loader, as training would read them; batches go to
    `target` outside a Trainer."""
    from ..config import Loader as LoaderSettings
    from ..data.datamodule import ShardDataModule

    if not args.data:
        raise ConfigError(f"{args.mode} mode needs --data DIR (a folder made by alexnet-prepare)")
    loader = {
        "name": args.loader,
        "workers": args.workers,  # each loader reads its own of these and ignores the other's
        "threads": args.threads,
        **loader,
    }
    data = {
        "root": args.data,
        "batch_size": args.batch_size,
        "crop": args.size,
        "augment": args.augment,
        "shuffle_window": args.shuffle_window,
        "cache_dir": args.cache,
        "cache_limit_gb": args.cache_limit_gb,
    }
    return ShardDataModule(make(Data, data), make(LoaderSettings, loader), device=target)


def bench_model(args) -> dict:
    device = torch_device(args)
    model = create(args.model, args.num_classes, args.size).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    o = make(Optim)  # the schema's rate and momentum
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step(net):
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # on the plain model: the arithmetic is the same
        step(model)
    net = compiled(model, args.compile, args.fuse_norms)
    compiling = args.compile or args.fuse_norms
    for _ in range(max(args.warmup, 1 if compiling else 0)):  # the first call compiles: never timed
        step(net)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(net)
    sync(device)
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tflops = counter.get_total_flops() * args.steps / seconds / 1e12
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return {
        "name": f"model/{args.model}",
        "images_per_sec": round(args.batch_size * args.steps / seconds, 1),
        "step_ms": round(1000 * seconds / args.steps, 3),
        "tflops": float(f"{tflops:.3g}"),  # small models on a CPU reach thousandths
        "fraction_of_bf16_peak": round(tflops / peak, 3) if peak else None,
        "device": name,
        "batch_size": args.batch_size,
        "size": args.size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "fuse_norms": args.fuse_norms,
        "steps": args.steps,
    }


def bench_loader(args) -> dict:
    device = torch_device(args)
    data = data_module(args, device, device=args.device)
    loader = data.train_dataloader()

    def batches():  # pass after pass, as training does
        while True:
            yield from loader

    stream = batches()
    for _ in range(args.warmup):
        next(stream)
    sync(device)
    start = time.perf_counter()
    images = 0
    for _ in range(args.steps):
        batch = next(stream)
        images += len(batch[1])
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "name": f"loader/{data.loader_name}",
        "data": args.data,
        "images_per_sec": round(images / seconds, 1),
        "device": args.device,
        "augment": args.augment,
        "batch_size": args.batch_size,
        "crop": args.size,
        # the loader's own settings that this command sets (--workers, --threads)
        **{key: getattr(args, key) for key in ("workers", "threads") if key in own_keys(data.loader_name)},
        "steps": args.steps,
        "images": images,
        "seconds": round(seconds, 3),
    }


def bench_epochs(args) -> list[dict]:
    """Whole training epochs of the loader, one after another as training reads them: each one's
    speed and the bytes fetched from the store during it (loader workers included), beside the
    training split's size. With a shard cache the first epoch fills it and later ones read from it."""
    from ..data import store

    device = torch_device(args)
    data = data_module(args, device, device=args.device)
    loader = data.train_dataloader()
    size = sum(store.size(shard.tar) for shard in data.manifest.shards("train"))
    rows = []
    for epoch in range(args.epochs):
        loader.position = lambda epoch=epoch: (epoch, 0)  # what the Trainer's step count says at an epoch start
        fetched, images = store.fetched_bytes(), 0
        sync(device)
        start = time.perf_counter()
        for batch in loader:
            images += len(batch[1])
        sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "name": f"loader/{data.loader_name}/epoch",
                "data": args.data,
                "epoch": epoch,
                "images_per_sec": round(images / seconds, 1),
                "fetched_bytes": store.fetched_bytes() - fetched,
                "dataset_bytes": size,
                "cache": args.cache,
                "batch_size": args.batch_size,
                "images": images,
                "seconds": round(seconds, 3),
            }
        )
    if data.cache is not None:
        data.cache.close()
    return rows


def settings(args) -> dict:
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "crop": args.size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "device": args.device,
        "steps": args.steps,
    }


def bench_train(args) -> dict | None:
    import lightning.pytorch as pl

    from ..training.callbacks import Throughput
    from ..training.module import Classifier

    data = data_module(args, torch_device(args), device="auto", layout="NHWC" if args.channels_last else "NCHW")
    # torch's SGD with the schema's rate, momentum and decay, at a constant rate and unscaled
    optim = make(Optim, {"name": "sgd", "reference_batch": None, "schedule": {"name": "constant"}})
    module = Classifier(
        complete(named_config(args.model), data.num_classes, args.size),
        optim,
        global_batch=args.batch_size,
        channels_last=args.channels_last,
    )
    throughput = Throughput(skip=args.warmup)
    devices = args.devices or 1
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "gpu" else "cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[throughput],
    )
    trainer.fit(module, datamodule=data)
    if not trainer.is_global_zero:
        return None
    if throughput.steps < args.steps // 2:
        raise ConfigError(
            f"only {throughput.steps} steps were timed: an epoch of {data.steps_per_epoch()} steps "
            f"is too short for --warmup {args.warmup}; use a larger data set or a smaller --warmup"
        )
    return {
        "name": f"train/{data.loader_name}",
        "images_per_sec": round(throughput.images_per_sec, 1),
        "data_wait": round(throughput.data_wait, 3),
        "step_ms": round(throughput.step_ms, 2),
        "processes": devices,
        "loader": data.loader_name,
        **settings(args),
    }


def bench_baseline(args) -> dict:
    from .baseline import run_baseline

    if not args.data:
        raise ConfigError("baseline mode needs --data DIR (a folder made by alexnet-prepare)")
    result = run_baseline(
        args.data,
        model=args.model,
        batch_size=args.batch_size,
        crop=args.size,
        workers=args.workers,
        steps=args.steps,
        warmup=args.warmup,
        device=torch_device(args),
        bf16=args.precision == "bf16",
        channels_last=args.channels_last,
    )
    return {"name": "baseline/plain-pytorch-webdataset", **result, "workers": args.workers, **settings(args)}


def bench_ddp(args, argv) -> list[dict]:
    """`train` once with one process and once with --devices, each in its own process tree."""
    rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "ddp"]
    if "--devices" in rest:
        del rest[rest.index("--devices") : rest.index("--devices") + 2]
    processes = args.devices or 2
    runs = []
    for devices in (1, processes):
        cmd = [sys.executable, "-m", "alexnet_dist.bench.cli", "train", *rest, "--devices", str(devices)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise ConfigError(
                f"alexnet-bench train --devices {devices} failed: "
                f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}"
            )
        runs.append(json.loads(lines[-1]))
    one, many = runs
    runs.append(
        {
            "name": "ddp/scaling",
            "images_per_sec": many["images_per_sec"],
            "processes": processes,
            "images_per_sec_one_process": one["images_per_sec"],
            "efficiency": round(many["images_per_sec"] / (processes * one["images_per_sec"]), 3),
            "speedup": round(many["images_per_sec"] / one["images_per_sec"], 3),
            **settings(args),
        }
    )
    return runs


@one_line_errors
def main(argv=None):
    refuse_credentials(sys.argv[1:] if argv is None else argv)  # before anything prints or stores it
    args = parse_args(argv)
    if args.against and args.mode != "loader":
        raise ConfigError(f"--against compares two places of the same shards in loader mode, not in {args.mode} mode")
    if args.mode == "ddp":
        results = bench_ddp(args, argv)
    elif args.mode == "scale":
        results = scale.run(args)
    elif args.mode == "loader" and args.epochs:
        results = bench_epochs(args)
        if args.against:  # the same epochs from the other place, and each epoch's ratio of speeds
            loader = results[0]["name"].split("/")[1]
            other = bench_epochs(
                argparse.Namespace(**{**vars(args), "data": args.against, "loader": loader, "cache": None})
            )
            ratios = [
                {
                    "name": f"{a['name']}/ratio",
                    "epoch": a["epoch"],
                    "data": a["data"],
                    "against": b["data"],
                    "ratio": round(a["images_per_sec"] / b["images_per_sec"], 3),
                }
                for a, b in zip(results, other, strict=True)
            ]
            results += other + ratios
    else:
        run = {"model": bench_model, "loader": bench_loader, "train": bench_train, "baseline": bench_baseline}
        results = [run[args.mode](args)]
        if args.mode == "loader" and args.against:
            # the loader the first run took (loader=auto may choose by where the data is): one loader compared
            loader = results[0]["name"].split("/")[1]
            results.append(bench_loader(argparse.Namespace(**{**vars(args), "data": args.against, "loader": loader})))
            first, second = results
            results.append(
                {
                    "name": f"{first['name']}/ratio",
                    "data": first["data"],
                    "against": second["data"],
                    "ratio": round(first["images_per_sec"] / second["images_per_sec"], 3),
                }
            )
    for result in results:
        if result is not None:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
