"""Checkpoints a run can always resume from: written atomically, the last few kept, damaged ones
skipped, random number generator states included."""

import os
import random
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from ..errors import ConfigError, TrainingError
from . import ckpt_format
from .agreement import StepAgreement


def rng_state() -> dict:
    """Every generator training draws from, each state as plain bytes: small (every rank's are
    gathered into each checkpoint) and loadable with torch.load(weights_only=True)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, np.array(words, np.uint32).tobytes(), gauss],
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": [kind, keys.astype(np.uint32).tobytes(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(value: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(value), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    """Sets the generators from what rng_state gave (checkpoints of earlier formats are converted
    on loading, by ckpt_format)."""
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in np.frombuffer(words, np.uint32)), gauss))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_last_at(target: Path) -> None:
    """Makes last.ckpt beside `target` the same file (a hard link, else a copy), atomically."""
    link = target.with_name("last.ckpt.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(target, link)
    except OSError:  # a file system without hard links
        link.write_bytes(target.read_bytes())
    os.replace(link, target.with_name("last.ckpt"))


def set_aside_damaged_last(good: Path, ckpt_dir: Path) -> None:
    """After resume=auto fell back to `good` because the run's own last.ckpt does not load: keep
    that file as last.ckpt.damaged (nothing a user saved is deleted) and point last.ckpt at the good
    one. Only ever in this run's own checkpoint folder, and only when last.ckpt really is damaged: a
    checkpoint read from elsewhere (another run's, a read-only copy) leaves its folder as it was."""
    last = ckpt_dir / "last.ckpt"
    if good.parent.resolve() != ckpt_dir.resolve() or good.name == "last.ckpt" or not last.exists():
        return
    if loadable(last) is None:
        return
    os.replace(last, last.with_name("last.ckpt.damaged"))
    point_last_at(good)


def save_atomically(trainer: pl.Trainer, final: Path) -> None:
    """trainer.save_checkpoint to a temporary name, flushed, then renamed to `final` (every rank
    calls; rank zero writes). A full disk or a read-only folder is one line, the partial file is
    removed and every earlier checkpoint stays as it was."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            _fsync(tmp)
            os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = final.with_name("last.ckpt")
        raise TrainingError(
            f"{final}: cannot be written ({exc.strerror or exc}); free space on that disk or make "
            f"{final.parent} writable, then run the same command again to resume from "
            + (f"{kept}" if kept.exists() else "the start (no checkpoint was saved yet)")
        ) from None


class LastCheckpoint(pl.Callback):
    """Saves `step-<global step>.ckpt` every `every_n_steps` steps and/or `every_n_minutes`
    minutes and at the end of every training epoch (after its validation), keeps the newest
    `keep` of them, and points `last.ckpt` at the newest.

    Each file is written under a temporary name, flushed to disk, then renamed: a crash in the
    middle of a save leaves the previous checkpoints as they were. `last.ckpt` is a hard link to
    the newest file (no second copy), replaced by an atomic rename too.
    """

    def __init__(
        self,
        dirpath: str | Path,
        agreement: StepAgreement,
        every_n_steps: int | None = None,
        every_n_minutes: float | None = None,
        keep: int = 2,
    ):
        self.dir = Path(dirpath)
        self.every_n_steps, self.every_n_minutes, self.keep = every_n_steps, every_n_minutes, max(1, keep)
        self.saved_step = -1
        self.last_save_time = time.monotonic()
        self.agreement = agreement
        if every_n_minutes:  # all ranks must save together: due when any rank's clock says so
            agreement.ask("save_due", self._time_is_up)

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.saved_step or trainer.sanity_checking:
            return
        final = self.dir / f"step-{trainer.global_step:09d}.ckpt"
        save_atomically(trainer, final)
        if trainer.is_global_zero:
            point_last_at(final)
            for old in sorted(self.dir.glob("step-*.ckpt"))[: -self.keep]:
                old.unlink()
            _fsync(self.dir)
        self.saved_step = trainer.global_step
        self.last_save_time = time.monotonic()

    def _time_is_up(self) -> bool:
        return time.monotonic() - self.last_save_time >= 60 * self.every_n_minutes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        by_steps = self.every_n_steps and trainer.global_step % self.every_n_steps == 0
        if self.agreement.take("save_due") or by_steps:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.save(trainer)


class BestCheckpoint(Checkpoint):
    """best.ckpt: the model of the best `monitor` (higher is better) seen by any validation of the
    run, written atomically like the others. best.ckpt holds its own score, and that file, not the
    checkpoint a run resumes from (which may predate the last best), is what a new score is
    compared with: after any resume, best.ckpt is replaced only by a better model, under the same
    name. (A Checkpoint subclass, so Lightning adds no checkpointing of its own.)"""

    def __init__(self, dirpath: str | Path, monitor: str = "val_top1"):
        self.dir, self.monitor = Path(dirpath), monitor
        self.best = None  # read from best.ckpt at this process's first validation

    def on_validation_end(self, trainer, pl_module):
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or trainer.state.fn != "fit" or score is None:
            return
        better = None
        if trainer.is_global_zero:  # one reader of best.ckpt, one decision for every rank
            if self.best is None:
                self.best = self.score_on_disk()
            better = self.best is None or float(score) > self.best
        if trainer.strategy.broadcast(better, src=0):
            self.best = float(score)  # before saving: best.ckpt holds its own score
            save_atomically(trainer, self.dir / "best.ckpt")

    def score_on_disk(self) -> float | None:
        """The score an existing best.ckpt holds (this callback's state in it)."""
        path = self.dir / "best.ckpt"
        ckpt = read_checkpoint(path, mmap=True)[0] if path.exists() else None
        state = (ckpt or {}).get("callbacks", {}).get(self.state_key, {})
        if state.get("monitor") != self.monitor or state.get("best") is None:
            return None
        return float(state["best"])

    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "best": self.best}


def read_checkpoint(path: Path, mmap: bool = False):
    """(the checkpoint at `path`, in the current format, None), or (None, why it cannot be loaded,
    in one line). A checkpoint of a newer format is no damaged file: that stops with ConfigError."""
    try:
        return ckpt_format.read(path, mmap=mmap), None
    except ckpt_format.Unreadable as exc:
        return None, str(exc)


def loadable(path: Path) -> str | None:
    """None if `path` loads as a checkpoint, else why not (one line)."""
    return read_checkpoint(path, mmap=True)[1]


def newest_good_checkpoint(ckpt_dir: Path) -> Path | None:
    """last.ckpt, or if it is damaged the newest step-*.ckpt that loads; each damaged file is
    reported in one line on stderr."""
    candidates = [ckpt_dir / "last.ckpt"] + sorted(ckpt_dir.glob("step-*.ckpt"), reverse=True)
    seen = set()  # last.ckpt is a hard link to the newest step file: test each file once
    for path in candidates:
        if not path.exists() or path.stat().st_ino in seen:
            continue
        seen.add(path.stat().st_ino)
        problem = loadable(path)
        if problem is None:
            return path
        print(f"warning: {path} cannot be loaded ({problem}); trying an older checkpoint", file=sys.stderr)
    return None


def resume_checkpoint(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint this run continues from. resume=auto: the run directory's newest good
    checkpoint, if any; never: none. resume=PATH is where the run starts: once the run has
    checkpoints of its own it continues from its newest, with a notice, whatever PATH names (so the
    same command, run again after a crash or a SLURM requeue, goes on from there; going back to an
    older checkpoint would overwrite the later ones: that is a new run, forked from it)."""
    if resume == "never":
        return None
    own = newest_good_checkpoint(ckpt_dir)
    if resume == "auto":
        return own
    path = Path(resume)
    if own is not None and not (path.exists() and os.path.samefile(path, own)):
        print(
            f"notice: resume={resume}: this run has checkpoints of its own and continues from its newest, {own} "
            f"(to go on from {path.name} instead, start a new run from it: run_id=NEW resume={resume})",
            file=sys.stderr,
            flush=True,
        )
        return own
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such checkpoint; use resume=auto, resume=never or a .ckpt path")
    if problem := loadable(path):
        raise ConfigError(f"resume={resume}: cannot be loaded ({problem}); pick another checkpoint")
    return path


def _describe(model: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(model.items()))


def mismatch(saved: dict, own: dict) -> str | None:
    """The first difference between two state dicts' names and shapes, and how many there are."""
    wrong = [
        f"{k} is {tuple(v.shape)} there, {tuple(own[k].shape)} here"
        for k, v in saved.items()
        if k in own and v.shape != own[k].shape
    ]
    wrong += [f"{k} is missing" for k in sorted(set(own) - set(saved))]
    wrong += [f"{k} is unexpected" for k in sorted(set(saved) - set(own))]
    return f"{wrong[0]}; {len(wrong)} tensors differ" if wrong else None


def check_compatible(path: Path, module: torch.nn.Module, what: str) -> None:
    """A checkpoint of another network, width or class count stops the run with both named."""
    ckpt = ckpt_format.read(path, mmap=True)
    problem = mismatch(ckpt["state_dict"], module.state_dict())
    if problem:
        saved = ckpt.get("hyper_parameters", {}).get("model", {})
        raise ConfigError(
            f"{what}={path}: the checkpoint holds {_describe(saved)} but this run builds "
            f"{_describe(module.hparams.model)} ({problem}); use the same model and data, or a new run_id"
        )


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """init_from=PATH: the network's weights only (a new run: fresh optimizer, step 0)."""
    if problem := loadable(path):
        raise ConfigError(f"init_from={path}: cannot be loaded ({problem})")
    check_compatible(path, module, "init_from")
    module.load_state_dict(ckpt_format.read(path)["state_dict"])
