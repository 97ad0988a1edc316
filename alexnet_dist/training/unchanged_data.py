"""A run stops when its data changes under it (the data module says what it watches: data/watch.py), with the
checkpoint of its last finished step and one line naming the file.

The whole set is looked at when each training or validation pass starts: rank zero looks, and
every rank learns its answer (one broadcast), so that all ranks stop together. Each reader also
looks at a tar or index file as it opens it, in the loader's own process; that error reaches the
training loop as the next batch is fetched, after the last step finished.
"""

from collections.abc import Callable

import lightning.pytorch as pl

from ..errors import DataChanged, DataError, UserError


class UnchangedData(pl.Callback):
    """`check()` raises DataChanged when the data is not as the run started with it; `save(trainer)`
    saves the checkpoint of the step the run stands at (LastCheckpoint.save: nothing if it has
    one already)."""

    def __init__(self, check: Callable[[], None], save: Callable[[pl.Trainer], None]):
        self.check, self.save = check, save
        self.agreed = False  # every rank raised the same DataChanged at the same point

    def _look(self, trainer: pl.Trainer) -> None:
        problem = None
        if trainer.is_global_zero:
            try:
                self.check()
            except DataChanged as exc:
                problem = ("changed", str(exc))
            except UserError as exc:  # the manifest could not be read (a store gone): every rank stops
                problem = ("failed", str(exc))
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            kind, message = problem
            if kind == "failed":
                raise DataError(message)
            self.agreed = True
            raise DataChanged(message)

    def on_train_epoch_start(self, trainer, pl_module):
        self._look(trainer)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._look(trainer)

    def on_exception(self, trainer, pl_module, exception):
        # A checkpoint needs every rank: saved where all stopped together (the pass's start) or
        # where there is one rank; a reader's error on one of several ranks keeps the last saved.
        if (
            isinstance(exception, DataChanged)
            and trainer.state.fn == "fit"
            and (self.agreed or trainer.world_size == 1)
        ):
            self.save(trainer)
