"""Photo files classified by a trained network: from an export's folder (model.pt2 and
preprocess.json, run with plain torch) or straight from a checkpoint (the same program, built in
memory). Each photo is read as validation read its stored copy (data/photos.py), the ten views'
softmaxes averaged as in evaluation (paper section 4.1)."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.photos import Geometry, read_photo
from ..data.sources import IMAGE_SUFFIXES
from ..errors import ConfigError
from . import export
from .inputs import load


@dataclass
class Predictor:
    forward: Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, 3, crop, crop) -> logits (N, classes)
    classes: list[str]
    geometry: Geometry
    views: int  # the views the run validated with
    mean_image: bool  # the 2012 mean image, subtracted at the centre window only

    @classmethod
    def open(cls, path: str | Path) -> "Predictor":
        path = Path(path)
        if path.is_dir():
            return cls.of_export(path)
        if not path.exists():
            raise ConfigError(f"model={path}: no such file or folder; give an export's folder or a checkpoint")
        trained = load(path, key="model")
        prog = export.program(trained)
        return cls(
            prog,
            trained.inputs["classes"],
            trained.geometry(),
            trained.inputs["settings"]["test_views"],
            trained.inputs["mean_image"] is not None,
        )

    @classmethod
    def of_export(cls, folder: Path) -> "Predictor":
        files = {name: folder / name for name in ("model.pt2", "preprocess.json")}
        if missing := [name for name, f in files.items() if not f.is_file()]:
            raise ConfigError(f"model={folder}: no {missing[0]} in it; write the folder with alexnet-export")
        try:
            pre = json.loads(files["preprocess.json"].read_text())
            classes, views, mean_image = pre["classes"], pre["views"], pre["normalisation"]["mean_image"]
        except (ValueError, KeyError, TypeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise ConfigError(
                f"{files['preprocess.json']}: not as alexnet-export writes it ({why}); export again"
            ) from None
        program = torch.export.load(files["model.pt2"]).module()
        return cls(program, classes, export.geometry_of(pre, str(files["preprocess.json"])), views, mean_image)

    def predict(self, photo: Path, top_k: int, views: int | None = None) -> dict:
        """{"image": path, "top": [{"class", "prob"}, ...]}, the `top_k` most probable, best first."""
        views = views or self.views
        if views == 10 and self.mean_image:
            raise ConfigError(
                "views=10: this network subtracts the 2012 mean image, which its export holds for the centre "
                "view only; use views=1"
            )
        with torch.no_grad():
            probs = self.forward(read_photo(photo, self.geometry, views)).float().softmax(dim=1).mean(dim=0)
        best = probs.topk(min(top_k, len(probs)))
        top = [
            {"class": self.classes[i], "prob": round(p, 6)}
            for p, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ]
        return {"image": str(photo), "top": top}


def photo_files(items: list[str]) -> list[Path]:
    """The files named, a folder standing for the image files under it (sorted)."""
    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"images={item}: no image files under it ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        else:
            files.append(path)  # read_photo names a missing or unreadable one
    return files
