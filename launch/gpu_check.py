"""The GPU check behind docs/performance.md: python3 launch/gpu_check.py OUT [--quick] [--parts a,b,...]

Runs the project's own commands on one GPU, each part in its own processes, and writes what they
report as JSON lines to OUT/<part>.jsonl, with one line per part in OUT/summary.jsonl (ok, seconds,
the error's last lines). A part that fails or runs out of its time is recorded and the next one runs:
one lent GPU session should bring back every figure it can.

  data  256x256 synthetic JPEG shards (alexnet-prepare synthetic, then stats for the mean image)
  a     the DALI loader alone, decoding on the GPU: paper crops, then modern random-resized crops
  b     alexnet-bench model, both networks, bf16: eager and compiled, channels-last off and on, and
        alexnet2012 with only its normalisation layers compiled (compute.fuse_norms)
  c     alexnet-train experiment=alexnet2012 end to end, DALI on the GPU, bf16, a few hundred steps
  d     DDP: one process over NCCL; then two ranks sharing the one GPU over gloo, started as two
        torchrun agents so that each rank's DALI pipeline picks its own device
  e     what the DALI decoder does with JPEGs that are no JPEG, cut short or garbled inside
  f     kill -9 and resume: the resumed run's weights against two uninterrupted runs, deterministic

Without a GPU (or with --quick) the same commands run at toy sizes on the CPU, DALI in its CPU
mode: that is how the script is tested (tests/test_gpu_check.py); its figures then mean nothing.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch

BUDGET_S = 8 * 60  # the whole check, machine start and DALI's arrival not included
B_SHARE_S = 150  # of which the model benchmarks may take this much
PY = sys.executable


class Check:
    def __init__(self, out: Path, work: Path, quick: bool):
        self.out, self.work, self.quick = out, work, quick
        self.gpu = torch.cuda.is_available() and not quick
        self.device = "gpu" if self.gpu else "cpu"
        self.data = work / "syn256"  # made once, checked again by each later invocation
        # new runs each invocation: the runs of an earlier one would be resumed, already finished
        self.runs = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
        self.started = time.monotonic()
        # inductor compiles plain C++ loops several times faster than vectorised ones on two cores
        self.env = {"TORCHINDUCTOR_VEC_ISA_OK": "0"} if quick else {}

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.started)

    def emit(self, part: str, record: dict) -> None:
        with open(self.out / f"{part}.jsonl", "a") as f:
            f.write(json.dumps({"part": part, **record}) + "\n")

    def run(self, args: list[str], limit: float, env: dict | None = None) -> str:
        """Runs a command of the project; its stdout, or an error with the last lines of its output."""
        limit = min(limit, self.left())
        if limit < 5:
            raise TimeoutError("the check's time is spent")
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=limit,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})},
        )
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-6:]
            raise RuntimeError(f"{' '.join(args[:4])} ... exited {done.returncode}: " + " | ".join(tail))
        return done.stdout

    def json_lines(self, stdout: str) -> list[dict]:
        return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]

    # ---- parts ---------------------------------------------------------------------------------

    def part_data(self) -> None:
        if self.quick:
            sizes = ["--classes", "4", "--train-count", "64", "--val-count", "32", "--min-shards", "4"]
        else:  # 100 steps of 256 per epoch; 32 shards so loader workers and ranks each own some
            sizes = ["--classes", "100", "--train-count", "25600", "--val-count", "2048", "--min-shards", "32"]
        workers = str(min(16, os.cpu_count() or 1))
        prepare = [PY, "-m", "alexnet_dist.cli.prepare"]
        self.run([*prepare, "synthetic", "--out", str(self.data), "--size", "256", *sizes, "--workers", workers], 180)
        self.run([*prepare, "stats", "--out", str(self.data), "--sample", "512"], 60)
        manifest = json.loads((self.data / "manifest.json").read_text())
        self.emit("data", {"train": manifest["splits"]["train"]["count"], "val": manifest["splits"]["val"]["count"]})

    def bench(self, mode: str, *args: str, limit: float) -> list[dict]:
        steps = ["--batch-size", "4", "--steps", "2", "--warmup", "1"] if self.quick else []
        return self.json_lines(self.run([PY, "-m", "alexnet_dist.bench.cli", mode, *args, *steps], limit))

    def part_a(self) -> None:
        for augment in ("paper", "modern"):
            sizes = [] if self.quick else ["--batch-size", "256", "--steps", "100", "--warmup", "10"]
            for line in self.bench(
                "loader",
                *["--loader", "dali", "--device", self.device, "--data", str(self.data), "--size", "224"],
                *["--augment", augment, "--threads", "4", *sizes],
                limit=90,
            ):
                self.emit("a", line)

    def part_b(self) -> None:
        sizes = [] if self.quick else ["--batch-size", "256", "--steps", "50", "--warmup", "10"]
        until = time.monotonic() + B_SHARE_S  # the whole-network compiles come last and may not fit
        for model, variant, layout in self.model_variants():
            if time.monotonic() > until:
                self.emit(
                    "b", {"name": f"model/{model}", "skipped": " ".join(variant + layout) + f": past {B_SHARE_S} s"}
                )
                continue
            precision = "fp32" if self.quick else "bf16"  # a CPU without bf16 units emulates it, slowly
            args = ["--model", model, "--precision", precision, "--device", self.device, *variant, *layout]
            for line in self.bench("model", *args, *sizes, limit=150):
                self.emit("b", line)

    def model_variants(self):
        if self.quick:  # compiles take a minute on two CPU cores; tests/test_bench.py compiles both ways
            yield "alexnet2012", [], ["--channels-last"]
            yield "alexnet_owt", [], []
            return
        for variant in ([], ["--fuse-norms"], ["--compile"]):
            for model in ("alexnet2012", "alexnet_owt"):
                for layout in ([], ["--channels-last"]):
                    if not (model == "alexnet_owt" and variant == ["--fuse-norms"]):  # it has no norms
                        yield model, variant, layout

    def train_args(self, run_id: str, *extra: str) -> list[str]:
        quick = ["data.batch_size=4", "trainer.max_steps=2", "trainer.limit_val_batches=1"]
        steps = quick if self.quick else ["data.batch_size=256"]
        return [
            *["experiment=alexnet2012", f"data.root={self.data}", "logger=csv", f"run_id={run_id}"],
            *[f"paths.runs={self.runs}", "loader=dali", "+trainer.enable_progress_bar=false"],
            *(["trainer.precision=bf16-mixed"] if self.gpu else ["trainer.accelerator=cpu"]),
            *steps,
            *extra,
        ]

    def results(self, run_id: str) -> dict:
        return json.loads((self.runs / "alexnet2012" / run_id / "results.json").read_text())

    def part_c(self) -> None:
        steps = [] if self.quick else ["trainer.max_steps=300"]
        args = self.train_args("e2e", "compute.fuse_norms=true", *steps)
        self.run([PY, "-m", "alexnet_dist.cli.train", *args], 240)
        self.emit("c", self.results("e2e"))

    def part_d(self) -> None:
        short = ["trainer.max_steps=20", "trainer.limit_val_batches=2"] if not self.quick else []
        one = self.train_args("ddp1", "trainer.strategy=ddp", "trainer.devices=1", *short)
        self.run([PY, "-m", "alexnet_dist.cli.train", *one], 120)
        self.emit("d", {"what": "one process, " + ("nccl" if self.gpu else "gloo"), **self.results("ddp1")})
        # Two torchrun agents of one process each: both ranks see LOCAL_RANK 0, so both train and
        # decode on cuda:0, which NCCL refuses (one GPU per rank) and gloo allows.
        port = str(29400 + os.getpid() % 500)
        two = self.train_args("ddp2", "trainer.strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2")
        two += ["ddp.backend=gloo", *short]
        agents = [
            subprocess.Popen(
                [PY, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1"]
                + ["--master-addr=127.0.0.1", f"--master-port={port}", "-m", "alexnet_dist.cli.train", *two],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", **self.env},
            )
            for rank in (0, 1)
        ]
        try:
            outputs = [a.communicate(timeout=min(180, self.left()))[0] for a in agents]
        finally:
            for a in agents:
                a.kill()
        if any(a.returncode for a in agents):
            tail = " | ".join(outputs[0].strip().splitlines()[-6:])
            raise RuntimeError(f"two agents exited {[a.returncode for a in agents]}: {tail}")
        self.emit("d", {"what": "two ranks on one device, gloo", **self.results("ddp2")})

    def part_e(self) -> None:
        from alexnet_dist.config import Data, Loader, make
        from alexnet_dist.data.datamodule import ShardDataModule
        from alexnet_dist.errors import DataError

        root = bad_jpeg_set(self.data, self.work / "bad")
        device = torch.device("cuda" if self.gpu else "cpu")
        data = make(Data, {"root": str(root), "batch_size": 8, "crop": 224, "mean": [0.0] * 3, "std": [1.0] * 3})

        def module(bad_images: str) -> ShardDataModule:
            loader = make(Loader, {"name": "dali", "device": self.device, "bad_images": bad_images})
            return ShardDataModule(data, loader, device=device)

        dm = module("skip")
        batches = list(dm.val_dataloader())
        delivered = [int(label) for b in batches for label in b.labels]
        means = [round(float(image.double().mean()), 1) for b in batches for image in b.images]
        for label, case in enumerate(BAD_CASES):
            skipped = [s for s in dm.skipped_images() if f"/{case}" in s or f":{case}" in s]
            record = {"case": case, "device": self.device, "skipped": bool(skipped), "why": skipped[:1]}
            if label in delivered:  # decoded without an error: what did the picture come out as?
                record["delivered_mean_pixel"] = means[delivered.index(label)]
            self.emit("e", record)
        try:
            list(module("error").val_dataloader())
            self.emit("e", {"case": "bad_images=error", "error": None})
        except DataError as exc:
            self.emit("e", {"case": "bad_images=error", "error": str(exc)})

    def part_f(self) -> None:
        data = self.work / "small"
        counts = ["--train-count", "128", "--val-count", "32"] if self.quick else []  # 4 or 63 steps an epoch
        self.run([PY, "-m", "alexnet_dist.cli.prepare", "synthetic", "--out", str(data), *counts], 120)
        runs = self.runs / "resume"
        args = [
            *["experiment=smoke", f"data.root={data}", "logger=csv", "+trainer.enable_progress_bar=false"],
            *[
                f"trainer.max_epochs={2 if self.quick else 3}",
                "trainer.deterministic=warn",
                "model.dropout=0.5",
                f"paths.runs={runs}",
            ],
            *["loader=dali", "trainer.accelerator=" + ("gpu" if self.gpu else "cpu")],
        ]
        train = [PY, "-m", "alexnet_dist.cli.train", *args]
        # two uninterrupted runs: are they the same on this device? (On the CPU, tests/test_resume.py
        # already holds a resumed run to an uninterrupted one, bit for bit.)
        for run_id in ("a",) if self.quick else ("a", "b"):
            self.run([*train, f"run_id={run_id}"], 120)
        killed = subprocess.Popen([*train, "run_id=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        checkpoints = runs / "smoke" / "killed" / "checkpoints"
        deadline = time.monotonic() + min(120, self.left())
        while not any(checkpoints.glob("step-*.ckpt")) and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        at = sorted(checkpoints.glob("step-*.ckpt"))
        self.run([*train, "run_id=killed"], 120)
        ref = weights(runs / "smoke" / "a")
        record = {
            "device": self.device,
            "killed_after": at[-1].name if at else None,
            "steps": [ref[0], weights(runs / "smoke" / "killed")[0]],
            "uninterrupted_max_abs_diff": None if self.quick else max_diff(ref[1], weights(runs / "smoke" / "b")[1]),
            "resumed_max_abs_diff": max_diff(ref[1], weights(runs / "smoke" / "killed")[1]),
        }
        self.emit("f", record)


def goals(out: Path) -> dict:
    """The issue's goals beside what the parts measured (best of each kind; None where not measured)."""

    def best(part: str, keep) -> float | None:
        path = out / f"{part}.jsonl"
        found = list(map(json.loads, path.read_text().splitlines())) if path.exists() else []
        speeds = [x.get("images_per_sec", x.get("train_images_per_sec")) for x in found if keep(x)]
        return max((v for v in speeds if v), default=None)

    loader = best("a", lambda x: x.get("augment") == "paper")
    net2012 = best("b", lambda x: x.get("name") == "model/alexnet2012")
    owt = best("b", lambda x: x.get("name") == "model/alexnet_owt")
    e2e = best("c", lambda x: True)
    bound = min(loader, net2012) if loader and net2012 else None
    return {
        "loader_img_s": loader,
        "loader_goal": 30000,
        "alexnet2012_img_s": net2012,
        "alexnet2012_goal": 25000,
        "alexnet2012_vs_owt": round(net2012 / owt, 3) if net2012 and owt else None,
        "owt_img_s": owt,
        "owt_goal": 40000,
        "end_to_end_img_s": e2e,
        "end_to_end_goal": 20000,
        "end_to_end_vs_lower_of_loader_and_model": round(e2e / bound, 3) if e2e and bound else None,
    }


def weights(run: Path) -> tuple[int, dict]:
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return saved["global_step"], saved["state_dict"]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# Labels 0..3 in this order, so a delivered label names its case.
BAD_CASES = ("good", "not-a-jpeg", "cut-short", "garbled")


def bad_jpeg_set(source: Path, root: Path) -> Path:
    """A copy of `source`'s manifest whose validation split is one hand-made shard of BAD_CASES."""
    import io
    import shutil

    from PIL import Image

    from alexnet_dist.data.shards import index_line, write_index

    shutil.rmtree(root, ignore_errors=True)
    (root / "val").mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    (root / "train").symlink_to(source / "train")  # training shards stay where they are
    picture = Image.effect_mandelbrot((256, 256), (-2, -1.5, 1, 1.5), 100).convert("RGB")
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=90)
    good = out.getvalue()
    scan = good.index(b"\xff\xda")  # start of scan: keep the headers, damage the coded data
    garbled = bytearray(good)
    for i in range(scan + 200, len(good) - 2, 7):
        garbled[i] = (garbled[i] * 31 + 17) % 255  # never 0xff, so no marker appears
    images = [good, b"\xff\xd8\xff\xe0 not a JPEG" * 8, good[: len(good) // 2], bytes(garbled)]
    tar_path = root / "val" / "bad-000000.tar"
    lines = []
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for label, (case, data) in enumerate(zip(BAD_CASES, images, strict=True)):
            members = []
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{case}.{ext}")
                info.size = len(payload)
                offset = tar.fileobj.tell() + tarfile.BLOCKSIZE
                tar.addfile(info, io.BytesIO(payload))
                members.append((ext, offset, len(payload), info.name))
            lines.append(index_line(members))
    write_index(tar_path.with_suffix(".idx"), lines)
    manifest["splits"]["val"] = {
        **manifest["splits"]["val"],
        "count": len(BAD_CASES),
        "shards": [{"tar": "val/bad-000000.tar", "index": "val/bad-000000.idx", "count": len(BAD_CASES)}],
        "class_counts": {str(label): 1 for label in range(len(BAD_CASES))},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


PARTS = {"data": "part_data", "a": "part_a", "b": "part_b", "c": "part_c", "d": "part_d", "e": "part_e"}
PARTS["f"] = "part_f"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the JSON lines (made if missing)")
    p.add_argument("--quick", action="store_true", help="toy sizes on the CPU: tests the script, measures nothing")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts, in this order (default: all)")
    p.add_argument("--work", type=Path, default=Path("/tmp/alexnet-gpu-check"), help="scratch folder")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.work, args.quick or not torch.cuda.is_available())
    failed = 0
    for part in args.parts.split(","):
        start = time.monotonic()
        try:
            getattr(check, PARTS[part])()
            error = None
        except Exception as exc:  # recorded; the next part still runs
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            failed += 1
        seconds = round(time.monotonic() - start, 1)
        check.emit("summary", {"of": part, "ok": error is None, "seconds": seconds, "error": error})
        print(f"part {part}: {'ok' if error is None else 'FAILED ' + error} ({seconds} s)", flush=True)
    check.emit("goals", goals(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
