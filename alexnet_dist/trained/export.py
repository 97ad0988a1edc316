"""A trained network as files other programs load without alexnet_dist:

    model.pt2        torch.export program: uint8 NCHW RGB images of the trained size -> logits,
                     the input normalisation inside (torch.export.load, plain torch)
    model.onnx       the same program for ONNX runtimes
    preprocess.json  how a photo becomes that input, the class names in label order, the network's
                     config, the checkpoint it came from and its validation top-1
    weights.pt       the network's plain state_dict

A network that one format cannot take is named in one line on stderr, and the other files are
still written.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data.photos import Geometry
from ..errors import ConfigError
from .inputs import Trained

# torch.export's own pytree code, on a deprecation of its own
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")

# The batch dimension of the exported programs is free within these bounds.
MAX_BATCH = 4096


class Program(nn.Module):
    """The network with its input normalisation: (images - mean) / std on the 0-255 scale, the
    same arithmetic as training's (data/normalize.py), so the logits are the checkpoint's own.
    `mean` is per channel (3,), or the 2012 code's mean image cut at the centre crop (3, S, S)."""

    def __init__(self, network: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.network = network
        self.register_buffer(
            "mean", mean.float().view(1, 3, *mean.shape[1:]) if mean.dim() == 3 else mean.view(1, 3, 1, 1)
        )
        self.register_buffer("std", std.float().view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images.float() - self.mean) / self.std)


def centre_window(mean_image: torch.Tensor, crop: int) -> torch.Tensor:
    """The mean image's centre crop x crop window (the single view's window in evaluation)."""
    top = (mean_image.shape[-2] - crop) // 2
    left = (mean_image.shape[-1] - crop) // 2
    return mean_image[:, top : top + crop, left : left + crop]


def program(trained: Trained) -> Program:
    inputs = trained.inputs
    crop = inputs["settings"]["crop"]
    mean = inputs["mean_image"]
    mean = centre_window(mean, crop) if mean is not None else torch.tensor(inputs["mean"])
    return Program(trained.network(), mean, torch.tensor(inputs["std"])).eval()


def example(crop: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def export_program(prog: Program, crop: int) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(prog, (example(crop),), dynamic_shapes={"images": {0: batch}})


def preprocess(trained: Trained) -> dict:
    """preprocess.json: what a program that feeds the exported network does to a photo. `stored`
    is how alexnet-prepare stored the training images (short side, centre crop, JPEG quality;
    nulls where not recorded), which alexnet-predict repeats to read a photo as validation did."""
    inputs, geometry = trained.inputs, trained.geometry()
    return {
        "input": {"dtype": "uint8", "layout": "NCHW", "colour": "RGB", "height": geometry.crop, "width": geometry.crop},
        "stored": {"resize": geometry.resize, "center_crop": geometry.center_crop, "quality": geometry.quality},
        "resize_short_side": geometry.val_resize,  # null: the stored image as it is (bilinear otherwise)
        "centre_crop": geometry.crop,
        "views": inputs["settings"]["test_views"],  # 10: four corners, centre and their mirrors, softmax averaged
        "normalisation": {
            "scale": "0-255",
            "mean": inputs["mean"],
            "std": inputs["std"],
            "mean_image": inputs["mean_image"] is not None,  # then the centre window's per-pixel mean
            "inside_program": True,
        },
        "classes": inputs["classes"],
        "model": trained.model,
        "checkpoint": str(trained.path.resolve()),
        "val_top1": trained.validation.get("val_top1"),
    }


def geometry_of(preprocess: dict, where: str) -> Geometry:
    """The geometry a preprocess.json describes (the inverse of `preprocess`)."""
    try:
        values = {
            **preprocess["stored"],
            "crop": preprocess["centre_crop"],
            "val_resize": preprocess["resize_short_side"],
        }
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: no {exc} in it; export the checkpoint again with alexnet-export") from None
    return Geometry.from_dict(values, where)


def write(trained: Trained, out: Path) -> dict:
    """Every file of the export into `out`; {file: None or why it could not be written}."""
    out.mkdir(parents=True, exist_ok=True)
    crop = trained.inputs["settings"]["crop"]
    prog = program(trained)
    torch.save(trained.weights(), out / "weights.pt")
    (out / "preprocess.json").write_text(json.dumps(preprocess(trained), indent=1) + "\n")
    problems = {"weights.pt": None, "preprocess.json": None, "model.pt2": None, "model.onnx": None}
    target = trained.model["_target_"]
    try:
        exported = export_program(prog, crop)
        torch.export.save(exported, out / "model.pt2")
    except Exception as exc:  # a network torch.export cannot trace
        problems["model.pt2"] = problems["model.onnx"] = f"{target} does not export ({one_line(exc)})"
        return problems
    try:
        onnx = torch.onnx.export(exported, dynamo=True, external_data=False, verbose=False)
        onnx.save(str(out / "model.onnx"))
    except ImportError as exc:
        problems["model.onnx"] = (
            f"the ONNX exporter needs onnx and onnxscript ({one_line(exc)}); pip install onnxscript"
        )
    except Exception as exc:
        problems["model.onnx"] = f"{target} does not export to ONNX ({one_line(exc)})"
    return problems


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def report(problems: dict, out: Path) -> None:
    for name, problem in problems.items():
        if problem:
            print(f"warning: {out / name} not written: {problem}", file=sys.stderr)
    if all(problems.values()):
        raise ConfigError(f"{out}: nothing could be exported")
