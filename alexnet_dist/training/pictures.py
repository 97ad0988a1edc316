"""Pictures of a run, saved as PNG in the run directory and logged to W&B at the end of training:
the first layer's filters (the paper's Figure 3), a grid of augmented training inputs captioned
with their classes, and the learning curves (matplotlib figures, figures.py)."""

import math
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from .figures import new_figure

# The series a run records, each a list of (global step, value).
SERIES = ("train_loss", "val_loss", "val_top1", "val_top5", "lr")
# At most this many training-loss points per epoch: every optimizer step for short epochs, the
# mean of a window of steps for long ones (an ImageNet epoch has thousands), so that the curve is
# readable and the checkpoint that carries it stays small.
POINTS_PER_EPOCH = 100


def grid(tiles: np.ndarray, columns: int, scale: int = 1, gap: int = 1) -> Image.Image:
    """(N, H, W, 3) uint8 tiles on a grey background, `columns` per row, each enlarged `scale` times."""
    n, h, w, _ = tiles.shape
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 128, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = tile
    image = Image.fromarray(out)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def filter_grid(weight: torch.Tensor) -> Image.Image:
    """conv1's filters, each stretched to the full 0-255 range (as Figure 3 shows them)."""
    w = weight.detach().float().cpu().permute(0, 2, 3, 1).numpy()  # (N, k, k, 3)
    low = w.min(axis=(1, 2, 3), keepdims=True)
    high = w.max(axis=(1, 2, 3), keepdims=True)
    tiles = ((w - low) / np.maximum(high - low, 1e-12) * 255).astype(np.uint8)
    return grid(tiles, columns=16 if len(tiles) >= 64 else 8, scale=max(1, 48 // weight.shape[-1]))


def curves(series: Mapping[str, list], steps_per_epoch: int | None) -> Figure:
    """Three panels over the same x range: the training and validation loss, the validation top-1
    and top-5 (on 0..1), and the learning rate. x is in epochs (global step / steps per epoch),
    or in optimizer steps when the epoch's length is unknown."""
    per, unit = (steps_per_epoch, "epoch") if steps_per_epoch else (1, "optimizer step")

    def line(axes, name, label, **style):
        points = series.get(name) or []
        if points:
            axes.plot([step / per for step, _ in points], [value for _, value in points], label=label, **style)

    figure = new_figure(1500, 420)
    # fixed margins: a layout engine would draw the figure twice over, for the same picture
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.93, wspace=0.22)
    loss, accuracy, rate = figure.subplots(1, 3, sharex=True)
    line(loss, "train_loss", "training", color="tab:blue", linewidth=1)
    # validation points not clipped: the last lies on the right edge, a top-5 of 1.0 on the top one
    line(loss, "val_loss", "validation", color="tab:orange", marker="o", markersize=4, clip_on=False)
    loss.set(title="loss", ylabel="cross-entropy")
    line(accuracy, "val_top1", "top-1", color="tab:green", marker="o", markersize=4, clip_on=False)
    line(accuracy, "val_top5", "top-5", color="tab:purple", marker="o", markersize=4, linestyle="--", clip_on=False)
    accuracy.set(title="validation accuracy", ylabel="share correct", ylim=(0, 1))
    line(rate, "lr", "learning rate", color="tab:red", linewidth=1)
    rate.set(title="learning rate", ylabel="learning rate")
    rate.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    end = max((step / per for name in SERIES for step, _ in series.get(name) or []), default=1.0)
    for axes in (loss, accuracy, rate):
        axes.set_xlabel(unit)
        axes.set_xlim(0, end or 1.0)
        axes.grid(alpha=0.3)
        if not axes.lines:
            axes.text(0.5, 0.5, "no points yet", ha="center", va="center", transform=axes.transAxes)
    for axes in (loss, accuracy):
        if axes.lines:
            axes.legend(loc="best", fontsize="small")
    return figure


def captioned_grid(tiles: np.ndarray, captions: list[str], columns: int = 8) -> Figure:
    """(N, H, W, 3) uint8 tiles, `columns` per row, each enlarged to at least 96 pixels (pixel for
    pixel, no smoothing) with its caption under it, cut to what fits the tile's width."""
    n, h, w, _ = tiles.shape
    scale = max(1, 96 // h)
    tile_w, tile_h, caption, gap = w * scale, h * scale, 16, 4
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    width, height = columns * (tile_w + gap) + gap, rows * (tile_h + caption + gap) + gap
    sheet = np.full((height, width, 3), 255, np.uint8)  # the tiles laid out in one image: one draw
    fits = max(3, tile_w // 7)  # characters of an 8-point caption that fit under the tile
    figure = new_figure(width, height)
    for i, (tile, text) in enumerate(zip(tiles, captions, strict=True)):
        r, c = divmod(i, columns)
        left, top = gap + c * (tile_w + gap), gap + r * (tile_h + caption + gap)
        sheet[top : top + tile_h, left : left + tile_w] = tile.repeat(scale, axis=0).repeat(scale, axis=1)
        text = text if len(text) <= fits else text[: fits - 1] + "…"
        figure.text((left + tile_w / 2) / width, 1 - (top + tile_h + 2) / height, text, ha="center", va="top", size=8)
    figure.figimage(sheet, origin="upper")  # at the figure's own pixels, not resampled
    return figure


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps per training epoch as the Trainer counts them (limits and gradient
    accumulation applied, a step at each epoch's end); None for a loader of unknown length."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        return None
    return -(-int(batches) // trainer.accumulate_grad_batches)


def step_loss(outputs, module: pl.LightningModule, accumulate: int) -> torch.Tensor | None:
    """The training loss of the batch just trained on (None for a skipped step), from what the
    module's training_step returned: any LightningModule, whether it logs its loss or not."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, torch.Tensor):
        return None
    # Lightning hands callbacks the loss divided by the batches accumulated into one step
    return loss.detach().float() * (accumulate if module.automatic_optimization else 1)


class Pictures(pl.Callback):
    """Saves conv1.png, augmented.png and curves.png in `folder` when training ends.

    `augmented()` gives the first training batch as uint8 crops (N, 3, H, W) and their labels (N,)
    once training has started, or None; `classes` names the labels (None: their numbers). The
    curves record the training loss of every optimizer step, averaged over windows of steps when an
    epoch has more than POINTS_PER_EPOCH of them, the learning rate at each point, and every
    validation of the fit; they are kept in checkpoints, so a resumed run draws its whole history."""

    def __init__(self, folder: Path, augmented=lambda: None, classes: list[str] | None = None, samples: int = 32):
        self.folder, self.augmented_batch, self.classes, self.samples = Path(folder), augmented, classes, samples
        self.augmented = None  # (tiles (N, H, W, 3), captions)
        self.series = {name: [] for name in SERIES}
        self.steps_per_epoch, self.window = None, 1
        self.loss_sum, self.losses, self.closed_at = None, 0, None

    def state_dict(self) -> dict:  # the curves survive a resume
        return {"series": self.series}

    def load_state_dict(self, state: dict) -> None:
        # Older checkpoints hold train_loss and val_top1 alone: the other series start empty.
        series = {name: [] for name in SERIES}
        for name, points in state.get("series", {}).items():
            series[name] = [(int(step), float(value)) for step, value in points]
        self.series = series

    def on_train_start(self, trainer, pl_module):
        self.steps_per_epoch = steps_per_epoch(trainer)
        per_epoch = self.steps_per_epoch or trainer.log_every_n_steps * POINTS_PER_EPOCH
        self.window = max(1, math.ceil(per_epoch / POINTS_PER_EPOCH))
        self.closed_at = trainer.global_step  # a resumed run's first window starts where it resumed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.augmented is None and (first := self.augmented_batch()) is not None:
            self._keep_augmented(*first)
        loss = step_loss(outputs, pl_module, trainer.accumulate_grad_batches)
        if loss is not None:  # summed on the device: no wait for the GPU until a window closes
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.losses += 1
        step = trainer.global_step
        if step != self.closed_at and step % self.window == 0:
            self._close_window(trainer)

    def _close_window(self, trainer) -> None:
        step = trainer.global_step
        if self.losses:
            self.series["train_loss"].append((step, float(self.loss_sum) / self.losses))
            if trainer.optimizers:
                self.series["lr"].append((step, float(trainer.optimizers[0].param_groups[0]["lr"])))
        self.loss_sum, self.losses, self.closed_at = None, 0, step

    def _keep_augmented(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The crops and flips as the network gets them (the colour noise is added later, on the
        device), each captioned with its class."""
        images, labels = images[: self.samples], labels[: self.samples].tolist()
        names = self.classes or []
        captions = [names[label] if 0 <= label < len(names) else str(label) for label in labels]
        self.augmented = (images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy(), captions)

    def on_validation_end(self, trainer, pl_module):
        # After the module has logged its metrics; the fit's validations only, not the check
        # before training (sanity) or the final validation of `trainer.validate`.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for name in ("val_loss", "val_top1", "val_top5"):
            value = trainer.callback_metrics.get(name)
            if value is not None:
                self.series[name].append((trainer.global_step, float(value)))

    def on_train_end(self, trainer, pl_module):
        if self.losses:  # the last steps, fewer than a window
            self._close_window(trainer)
        if not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        pictures = {"curves": curves(self.series, self.steps_per_epoch)}
        if (conv := first_conv(pl_module)) is not None:  # a user's own module may have no convolution
            pictures["conv1"] = filter_grid(conv.weight)
        if self.augmented is not None:
            pictures["augmented"] = captioned_grid(*self.augmented)
        for name, picture in pictures.items():
            if isinstance(picture, Figure):
                picture.savefig(self.folder / f"{name}.png")
            else:
                picture.save(self.folder / f"{name}.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                for name in pictures:
                    logger.log_image(key=f"pictures/{name}", images=[str(self.folder / f"{name}.png")])
