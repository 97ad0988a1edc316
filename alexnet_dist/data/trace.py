"""data.trace=DIR: what each training step read, per rank, for anyone to audit. Rank r appends to
DIR/rank-<r>.jsonl one line per training batch, {"epoch": E, "step": S, "rank": r, "keys":
["<tar>:<key>", ...]} with S the global step the batch is trained in and each tar named relative to
the data folder. Lines are flushed at every checkpoint; a resumed run first drops the lines of steps
its checkpoint does not hold (written after it, by a run that died), so the files always describe the
training the checkpoint carries, on whatever number of ranks each part of it ran."""

import json
import os
from pathlib import Path


class Trace:
    def __init__(self, folder: str, root: str, rank: int, world: int):
        self.folder, self.root, self.rank, self.world = Path(folder), root.rstrip("/") + "/", rank, world
        self.file = None

    def name(self, tar: str) -> str:
        return tar[len(self.root) :] if tar.startswith(self.root) else tar

    def open(self, step: int) -> None:
        """Start writing at global step `step`: lines of later steps are dropped (this rank's file,
        and rank zero drops them from the files of ranks this run does not have)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        own = self.folder / f"rank-{self.rank}.jsonl"
        files = [own]
        if self.rank == 0:
            files += [f for f in self.folder.glob("rank-*.jsonl") if int(f.stem.split("-")[1]) >= self.world]
        for path in files:
            if path.exists():
                keep = [line for line in path.read_text().splitlines(True) if kept(line, step)]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(keep))
                os.replace(tmp, path)
        self.file = open(own, "a")

    def write(self, epoch: int, step: int, keys) -> None:
        if self.file is None:
            self.open(step)
        line = {"epoch": epoch, "step": step, "rank": self.rank, "keys": [f"{self.name(t)}:{k}" for t, k in keys]}
        self.file.write(json.dumps(line) + "\n")

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.flush()
            self.file.close()
            self.file = None


def kept(line: str, step: int) -> bool:
    """A whole line of a step before `step` (a line cut short by a killed process is dropped)."""
    try:
        return line.endswith("\n") and json.loads(line)["step"] < step
    except (ValueError, KeyError, TypeError):
        return False


def read(folder: str) -> list[dict]:
    """Every line of a trace folder, all ranks."""
    lines = []
    for path in sorted(Path(folder).glob("rank-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line]
    return lines
