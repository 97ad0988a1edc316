"""The yardstick for `alexnet-bench baseline`: what a user would write without this project.

A plain PyTorch loop over a plain webdataset pipeline (PIL decode, random crop + flip in the
DataLoader workers), the same model, optimiser, batch and precision as `alexnet-bench train`. No
Lightning, no checkpoints, no metrics beyond the loss: the framework's cost is the gap between
the two.
"""

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from ..data.manifest import Manifest
from ..models import create


def _sample(crop: int):
    def transform(sample):
        image, label = sample
        image = image.convert("RGB")
        w, h = image.size
        left, top = random.randint(0, w - crop), random.randint(0, h - crop)
        image = image.crop((left, top, left + crop, top + crop))
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), int(label)

    return transform


def run_baseline(
    root: str,
    *,
    model: str,
    batch_size: int,
    crop: int,
    workers: int,
    steps: int,
    warmup: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    lr: float = 0.01,
) -> dict:
    manifest = Manifest.read(root)
    urls = [s.tar for s in manifest.shards("train")]
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.single_node_only, empty_check=False)
        .repeat()
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map(_sample(crop))
        .batched(batch_size, partial=False)
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda"
    )
    net = create(model, manifest.num_classes).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    mean = torch.tensor(manifest.stat("mean"), device=device).view(1, 3, 1, 1)
    std = torch.tensor(manifest.stat("std"), device=device).view(1, 3, 1, 1)

    waited = images = 0
    start = last = None
    batches = iter(loader)
    for step in range(warmup + steps):
        fetch = time.perf_counter()
        x, y = next(batches)
        if step == warmup:  # the clock starts after the warm-up steps
            start, waited, images = fetch, 0.0, 0
        elif last is not None:
            waited += time.perf_counter() - fetch
        x = ((x.to(device, non_blocking=True).float() - mean) / std).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        images += len(y)
        last = time.perf_counter()
    seconds = last - start
    return {
        "images_per_sec": round(images / seconds, 1),
        "data_wait": round(waited / seconds, 3),
        "step_ms": round(1000 * seconds / steps, 2),
        "final_loss": round(loss.item(), 4),
    }
