"""Pictures of a run, saved as PNG in the run directory and logged to W&B at the end of training:
the first layer's filters (the paper's Figure 3), a grid of augmented training inputs, and the
learning curves. Drawn with PIL alone."""

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, ImageDraw


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


def curves(series: dict[str, list[tuple[float, float]]], size=(640, 240)) -> Image.Image:
    """One panel per series, side by side: x = training step, y from its own min to max."""
    panels = []
    for name, points in series.items():
        panel = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(panel)
        left, top, right, bottom = 50, 20, size[0] - 10, size[1] - 25
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, 4), name, fill="black")
        if points:
            xs, ys = zip(*points, strict=True)
            x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
            y1 = y1 if y1 > y0 else y0 + 1
            draw.text((4, top), f"{y1:.3g}", fill="black")
            draw.text((4, bottom - 10), f"{y0:.3g}", fill="black")
            draw.text((right - 60, bottom + 5), f"step {x1:g}", fill="black")
            xy = [
                (left + (x - x0) / max(x1 - x0, 1) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
                for x, y in points
            ]
            draw.line(xy, fill="navy", width=2) if len(xy) > 1 else draw.ellipse(
                (xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill="navy"
            )
        panels.append(panel)
    out = Image.new("RGB", (size[0] * len(panels), size[1]), "white")
    for i, panel in enumerate(panels):
        out.paste(panel, (i * size[0], 0))
    return out


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


class Pictures(pl.Callback):
    """Saves conv1.png, augmented.png and curves.png in `folder` when training ends. `augmented()`
    gives uint8 training crops (N, 3, H, W) once training has started, or None."""

    def __init__(self, folder: Path, augmented=lambda: None, samples: int = 32):
        self.folder, self.samples, self.augmented_images = Path(folder), samples, augmented
        self.augmented = None
        self.series = {"train_loss": [], "val_top1": []}

    def state_dict(self) -> dict:  # the curves survive a resume
        return {"series": self.series}

    def load_state_dict(self, state: dict) -> None:
        self.series = {k: [tuple(p) for p in v] for k, v in state.get("series", self.series).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raw = self.augmented_images() if self.augmented is None else None
        if self.augmented is None and raw is not None:  # the crops and flips (colour noise not shown)
            self.augmented = raw[: self.samples].detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None and (
            trainer.global_step % max(1, trainer.log_every_n_steps) == 0 or trainer.global_step == 1
        ):
            self.series["train_loss"].append((trainer.global_step, float(loss)))

    def on_train_epoch_end(self, trainer, pl_module):
        # The epoch's validation has run by now (a callback's own validation-end hook would come
        # before the module has logged it).
        top1 = trainer.callback_metrics.get("val_top1")
        if top1 is not None:
            self.series["val_top1"].append((trainer.global_step, float(top1)))

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        pictures = {"conv1": filter_grid(first_conv(pl_module.model).weight), "curves": curves(self.series)}
        if self.augmented is not None:
            pictures["augmented"] = grid(self.augmented, columns=8, scale=max(1, 96 // self.augmented.shape[1]))
        for name, image in pictures.items():
            image.save(self.folder / f"{name}.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                for name in pictures:
                    logger.log_image(key=f"pictures/{name}", images=[str(self.folder / f"{name}.png")])
