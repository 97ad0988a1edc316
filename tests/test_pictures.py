"""The run's pictures: the learning curves drawn from a handmade history, the history recorded by
a real (tiny) fit and carried through a checkpoint into a resumed one, older checkpoints' curves,
and the captioned training inputs."""

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from alexnet_dist.training.pictures import Pictures, captioned_grid, curves

HISTORY = {
    "train_loss": [(1, 2.3), (2, 2.0), (5, 1.1), (10, 0.7), (15, 0.5), (20, 0.4)],
    "val_loss": [(10, 0.9), (20, 0.6)],
    "val_top1": [(10, 0.55), (20, 0.8)],
    "val_top5": [(10, 0.9), (20, 0.97)],
    "lr": [(1, 0.01), (10, 0.005), (20, 0.0)],
}


def test_the_curves_are_three_labelled_panels_over_epochs_with_top1_on_0_to_1():
    loss, accuracy, rate = curves(HISTORY, steps_per_epoch=10).axes
    assert [a.get_title() for a in (loss, accuracy, rate)] == ["loss", "validation accuracy", "learning rate"]
    assert {a.get_xlabel() for a in (loss, accuracy, rate)} == {"epoch"}
    assert [a.get_ylabel() for a in (loss, accuracy, rate)] == ["cross-entropy", "share correct", "learning rate"]
    assert accuracy.get_ylim() == (0, 1)
    assert {a.get_xlim() for a in (loss, accuracy, rate)} == {(0, 2.0)}  # train and val over the same epochs
    train, val = loss.lines
    assert (train.get_label(), val.get_label()) == ("training", "validation")
    assert list(train.get_xdata()) == [0.1, 0.2, 0.5, 1.0, 1.5, 2.0] and list(val.get_xdata()) == [1.0, 2.0]
    assert [list(line.get_ydata()) for line in accuracy.lines] == [[0.55, 0.8], [0.9, 0.97]]
    assert all(len(a.get_xticks()) > 1 and len(a.get_yticks()) > 1 for a in (loss, accuracy, rate))
    # without a known epoch length, steps
    assert {a.get_xlabel() for a in curves(HISTORY, steps_per_epoch=None).axes} == {"optimizer step"}


class Tiny(pl.LightningModule):
    """A small network that logs what alexnet_dist's Classifier logs in validation."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2))
        self.losses = []  # each optimizer step's training loss, as the module saw it

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])
        self.losses.append((self.global_step + 1, loss.item()))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch[0])
        top1 = (logits.argmax(1) == batch[1]).float().mean()
        self.log_dict({"val_loss": torch.nn.functional.cross_entropy(logits, batch[1]), "val_top1": top1})
        self.log("val_top5", 1.0)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def batches(n=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g)), 4)


def fit(tmp_path, pictures, epochs, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=[pictures],
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,  # the check before training adds no point
    )
    module = Tiny()
    trainer.fit(module, batches(), batches(8), ckpt_path=ckpt_path)
    return trainer, module


def test_every_step_and_validation_is_recorded_and_a_resumed_fit_continues_the_curves(tmp_path):
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8)
    pictures = Pictures(tmp_path / "pictures", lambda: (images, torch.tensor([1, 0, 5])), classes=["cat", "dog"])
    trainer, module = fit(tmp_path, pictures, epochs=2)
    series = pictures.series
    assert series["train_loss"] == module.losses  # 4 steps an epoch, each its own point
    assert [step for step, _ in series["lr"]] == list(range(1, 9))
    assert [s for s, _ in series["val_top1"]] == [4, 8] and all(0 <= v <= 1 for _, v in series["val_top1"])
    assert [s for s, _ in series["val_loss"]] == [4, 8] and series["val_top5"] == [(4, 1.0), (8, 1.0)]
    assert pictures.steps_per_epoch == 4 and pictures.augmented[1] == ["dog", "cat", "5"]
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == {"conv1.png", "curves.png", "augmented.png"}

    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = Pictures(tmp_path / "again")
    _, module = fit(tmp_path, resumed, epochs=3, ckpt_path=tmp_path / "two.ckpt")
    assert resumed.series["train_loss"] == series["train_loss"] + module.losses
    assert [s for s, _ in resumed.series["val_top1"]] == [4, 8, 12]


def test_curves_of_an_older_checkpoint_load_and_draw():
    pictures = Pictures("unused")
    pictures.load_state_dict({"series": {"train_loss": [(5, 2.0), (10, 1.5)], "val_top1": [(10, 0.5)]}})
    assert pictures.series == {"train_loss": [(5, 2.0), (10, 1.5)], "val_loss": [], "val_top1": [(10, 0.5)],
                               "val_top5": [], "lr": []}  # fmt: skip
    loss, accuracy, rate = curves(pictures.series, steps_per_epoch=10).axes
    assert len(loss.lines) == 1 and len(accuracy.lines) == 1 and not rate.lines


def test_training_inputs_are_captioned_with_their_class_names_at_28_pixels(tmp_path):
    tiles = np.zeros((10, 28, 28, 3), np.uint8)
    names = [f"class{i:03d}" for i in range(9)] + ["a very long class name"]
    figure = captioned_grid(tiles, names)
    assert [t.get_text() for t in figure.texts] == names[:9] + ["a very long"[:11] + "…"]
    figure.savefig(tmp_path / "augmented.png")
    # 8 tiles a row, each 28 px enlarged 3 times (84) with a gap of 4 and a 16-px caption under it
    assert Image.open(tmp_path / "augmented.png").size == (8 * 88 + 4, 2 * 104 + 4)
