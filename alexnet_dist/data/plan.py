"""What one rank reads in one pass over a split, for every loader alike: the policy of sampling,
written once.

Training. An epoch lays the split's shards end to end in an order drawn from (seed, epoch): N
samples, each named by its place L in that sequence. The first steps * B of them (B the global
batch, steps = N // B; the rest sit out this epoch) are cut into `partitions` contiguous parts, part
p holding steps * q_p samples where q_p = B*(p+1)//P - B*p//P, and each part is shuffled within
windows of `window` samples. Global batch i is, from every part, its samples i*q_p .. (i+1)*q_p - 1.
None of this mentions the number of processes, so the sequence of global batches (as sets of
samples) is the same on any number of them: rank r of W takes parts P*r/W .. P*(r+1)/W - 1, whose
q_p add up to B/W. That needs W to divide both P and B: the family of world sizes a run can move
between (config.check_world says so in one line). A checkpoint needs only the global step to resume exactly
on any member of the family. A rank's parts are one contiguous stretch of the epoch's shards, so it
opens only the tars that stretch covers, and the windows keep the tars it reads at once few.

Evaluation. The shards in the manifest's order; rank r of W reads samples N*r/W .. N*(r+1)/W - 1 in
order, in batches, so every sample is counted exactly once across ranks.

Each sample's random draws (crop, flip, colour noise) come from (seed, epoch, L) alone
(`sample_seed`), so they do not depend on the world size, the loader's workers or threads either.
"""

import random
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..config import check_world, per_rank
from ..errors import ConfigError, DataError
from .manifest import Shard


@dataclass(frozen=True)
class EpochPlan:
    shards: tuple[Shard, ...]  # the split's, in the manifest's order
    mode: str  # train | val | test (the ten views)
    batch: int  # per rank
    rank: int = 0
    world: int = 1
    seed: int = 0
    steps: int | None = None  # training: batches per epoch, the same on every rank
    partitions: int = 1  # training: the parts of the epoch's order (data.partitions)
    window: int = 2000  # training: samples shuffled together within a part (data.shuffle_window)

    @property
    def train(self) -> bool:
        return self.mode == "train"

    def order(self, epoch: int) -> list[Shard]:
        """All shards in this epoch's order (training), or the manifest's (evaluation)."""
        order = list(self.shards)
        if self.train:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    @cached_property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def span(self) -> tuple[int, int]:
        """Evaluation: this rank's samples of the laid-out split, [start, stop)."""
        return self.total * self.rank // self.world, self.total * (self.rank + 1) // self.world

    def samples(self) -> int:
        """How many samples this rank has in a pass."""
        if self.train:
            return self.steps * self.batch
        start, stop = self.span()
        return stop - start

    def batches(self) -> int:
        """Batches of one pass: `steps` in training, enough for this rank's samples otherwise."""
        return self.steps if self.train else -(-self.samples() // self.batch)

    def part(self, epoch: int, p: int) -> np.ndarray:
        """Part p's samples (places L) in their order for `epoch`: (steps, q_p), batch by batch."""
        global_batch, parts = self.batch * self.world, self.partitions
        q = global_batch * (p + 1) // parts - global_batch * p // parts
        start, size = self.steps * (global_batch * p // parts), self.steps * q
        rng = np.random.default_rng(zlib.crc32(f"{self.seed}-{epoch}-{p}".encode()))
        places = np.arange(start, start + size, dtype=np.int64)
        for first in range(0, size, self.window):
            rng.shuffle(places[first : first + self.window])  # a view: shuffled in place
        return places.reshape(self.steps, q)

    def places(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of the pass: each the places L of its samples."""
        if not self.train:
            start, stop = self.span()
            return [np.arange(b, min(b + self.batch, stop), dtype=np.int64) for b in range(start, stop, self.batch)]
        parts = range(self.partitions * self.rank // self.world, self.partitions * (self.rank + 1) // self.world)
        table = np.concatenate([self.part(epoch, p) for p in parts], axis=1)
        return list(table)

    def locate(self, epoch: int, places: np.ndarray) -> list[tuple[Shard, int]]:
        """(shard, sample number in the shard) of each place in `epoch`'s layout."""
        order = self.order(epoch)
        starts = np.cumsum([0] + [s.count for s in order])
        which = np.searchsorted(starts, places, side="right") - 1
        return [(order[w], int(place - starts[w])) for w, place in zip(which, places, strict=True)]

    def first_uses(self, epoch: int, batches: list[np.ndarray]) -> list[tuple[int, str]]:
        """(batch, tar) of each tar this rank reads in the pass, in the order first read."""
        first = {}
        for i, places in enumerate(batches):
            for shard, _ in self.locate(epoch, places):
                first.setdefault(shard.tar, i)
        return [(i, tar) for tar, i in first.items()]

    def shard_use(self, epoch: int) -> dict[Shard, int]:
        """How many samples of each shard this rank reads in the pass."""
        use = {}
        for shard, _ in self.locate(epoch, np.concatenate(self.places(epoch))):
            use[shard] = use.get(shard, 0) + 1
        return use

    def sample_seed(self, epoch: int, place: int) -> str:
        """The name of a sample's random generator: its place in the epoch, not who reads it."""
        return f"{self.seed}-{epoch}-{place}"


def make_plan(
    shards: list[Shard],
    mode: str,
    global_batch: int,
    rank: int,
    world: int,
    seed: int,
    where: str,
    partitions: int = 1,
    window: int = 2000,
) -> EpochPlan:
    """The plan of one rank, checked: the world size is one the order allows, every rank has a
    sample, and training has at least one whole batch. `where` names the data for the messages."""
    count = sum(s.count for s in shards)
    if count < world:
        raise DataError(
            f"{where}: {count} samples for {world} ranks; every rank needs at least one: use fewer ranks or more data"
        )
    if window < 1:
        raise ConfigError(f"data.shuffle_window={window}: give 1 or more")
    steps = None
    if mode == "train":
        check_world(partitions, global_batch, world)
        steps = count // global_batch
        if steps == 0:
            raise ConfigError(
                f"data.batch_size={global_batch} is larger than the training set ({count} images); use a smaller batch"
            )
    batch = per_rank(global_batch, world, "data.batch_size" if mode == "train" else "data.val_batch_size")
    return EpochPlan(tuple(shards), mode, batch, rank, world, seed, steps, partitions, window)


def position(global_step: int, batches_per_epoch: int, accumulate: int = 1) -> tuple[int, int]:
    """(epoch, batches of it already trained on) after `global_step` optimizer steps, with
    `batches_per_epoch` batches an epoch (as the Trainer counts them, limits applied) and one step
    every `accumulate` batches (and one at each epoch's end)."""
    epoch, steps = divmod(global_step, -(-batches_per_epoch // accumulate))
    return epoch, steps * accumulate
