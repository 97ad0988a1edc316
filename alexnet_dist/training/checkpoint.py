"""checkpoints/last.ckpt: the state a resumed run continues from."""
from pathlib import Path

import lightning.pytorch as pl


class LastCheckpoint(pl.Callback):
    """Saves last.ckpt every `every_n_steps` optimizer steps (if set) and at the end of every
    training epoch, after its validation. Lightning's ModelCheckpoint does one or the other."""

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.saved_step = -1

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self.saved_step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls; rank zero writes
            self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.save(trainer)
