"""What one rank reads in one pass over a split, for every loader alike: the policy of sampling,
written once.

The split's shards are laid end to end, in the manifest's order for evaluation and in a new order
from (seed, epoch) for each training epoch, and rank r of W takes the samples from N*r/W to
N*(r+1)/W of that sequence (N samples in all). So no sample is read twice in an epoch, every
rank sees all the data over the epochs, and evaluation counts every sample exactly once across
ranks (the counts may differ by one, as the metrics are summed once at the end). Training takes
`steps` batches from every rank, the same number (DDP would hang on an unequal count): the
samples that do not fill a global batch are left out of that epoch.
"""

import random
import zlib
from dataclasses import dataclass

from ..config import per_rank
from ..errors import ConfigError, DataError
from .manifest import Shard


@dataclass(frozen=True)
class Piece:
    """Samples start..stop-1 of a shard, in the shard's own order."""

    shard: Shard
    start: int
    stop: int


@dataclass(frozen=True)
class EpochPlan:
    shards: tuple[Shard, ...]  # the split's, in the manifest's order
    mode: str  # train | val | test (the ten views)
    batch: int  # per rank
    rank: int = 0
    world: int = 1
    seed: int = 0
    steps: int | None = None  # training: batches per epoch, the same on every rank

    @property
    def train(self) -> bool:
        return self.mode == "train"

    def order(self, epoch: int) -> list[Shard]:
        """All shards in this epoch's order (training), or the manifest's (evaluation)."""
        order = list(self.shards)
        if self.train:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def span(self) -> tuple[int, int]:
        """This rank's samples of the laid-out split: [start, stop)."""
        total = sum(s.count for s in self.shards)
        return total * self.rank // self.world, total * (self.rank + 1) // self.world

    def samples(self) -> int:
        """How many samples this rank has in a pass (what an evaluation pass yields)."""
        start, stop = self.span()
        return stop - start

    def batches(self) -> int:
        """Batches of one pass: `steps` in training, enough for this rank's samples otherwise."""
        return self.steps if self.train else -(-self.samples() // self.batch)

    def pieces(self, epoch: int, start: int, stop: int) -> list[Piece]:
        """Samples [start, stop) of the split laid out in `epoch`'s order, shard by shard."""
        pieces, offset = [], 0
        for shard in self.order(epoch):
            lo, hi = max(start, offset), min(stop, offset + shard.count)
            if lo < hi:
                pieces.append(Piece(shard, lo - offset, hi - offset))
            offset += shard.count
        return pieces

    def mine(self, epoch: int) -> list[Piece]:
        """This rank's samples in `epoch`."""
        return self.pieces(epoch, *self.span())

    def seed_for(self, epoch: int, *more) -> int:
        """A 31-bit seed of (seed, epoch, rank, mode, ...): each rank and pass its own draws."""
        text = "-".join(map(str, (self.seed, epoch, self.rank, self.mode, *more)))
        return zlib.crc32(text.encode()) & 0x7FFFFFFF


def make_plan(
    shards: list[Shard], mode: str, global_batch: int, rank: int, world: int, seed: int, where: str
) -> EpochPlan:
    """The plan of one rank, checked: the global batch divides over the ranks, every rank has a
    sample, and training has at least one whole batch. `where` names the data for the messages.
    Ranks need no shard of their own: a shard may be split between several."""
    count = sum(s.count for s in shards)
    if count < world:
        raise DataError(
            f"{where}: {count} samples for {world} ranks; every rank needs at least one: use fewer ranks or more data"
        )
    batch = per_rank(global_batch, world, "data.batch_size" if mode == "train" else "data.val_batch_size")
    steps = None
    if mode == "train":
        steps = count // global_batch
        if steps == 0:
            raise ConfigError(
                f"data.batch_size={global_batch} is larger than the training set ({count} images); use a smaller batch"
            )
    return EpochPlan(tuple(shards), mode, batch, rank, world, seed, steps)


def position(global_step: int, batches_per_epoch: int, accumulate: int = 1) -> tuple[int, int]:
    """(epoch, batches of it already trained on) after `global_step` optimizer steps, with
    `batches_per_epoch` batches an epoch (as the Trainer counts them, limits applied) and one step
    every `accumulate` batches (and one at each epoch's end)."""
    epoch, steps = divmod(global_step, -(-batches_per_epoch // accumulate))
    return epoch, steps * accumulate
