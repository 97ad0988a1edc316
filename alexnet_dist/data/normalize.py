"""Normalisation on the training device, the same for every loader: loaders hand over uint8 images
(a quarter of float32's bytes to copy) and this turns them into the network's input."""

import torch

from .transforms import TEN_VIEWS, place


class DeviceNormalize:
    """(x - mean + colour shift) / std, training inputs further divided by `train_scale` (the 2012
    code's 1.1, keeping them on the test scale). `mean` is per channel (0-255 scale), or, with
    `mean_image` (3, S, S), the 2012 code's per-pixel mean cut at each crop's own window."""

    def __init__(self, mean, std, crop: int, train_scale: float = 1.0, mean_image=None, dtype=torch.float32):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.crop, self.train_scale, self.mean_image, self.dtype = crop, train_scale, mean_image, dtype

    def __call__(self, images, labels, shifts=None, windows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader's batch: uint8 images (N, 3, H, W) or views (N, V, 3, H, W); in training also
        each image's colour shift (N, 3) and, with the mean image, its crop window (N, 3)."""
        device = images.device
        if self.mean_image is None:
            mean = self.mean.to(device)
        elif windows is not None:  # training: each crop's own window
            left, top, mirrored = windows.T
            mean = self.mean_windows(left, top, mirrored, device)
        else:
            mean = self.eval_windows(images.shape[1] if images.dim() == 5 else 1, device)
            mean = mean if images.dim() == 5 else mean[0]
        std = self.std.to(device)
        x = images.float() - mean
        if shifts is not None:  # training
            x += shifts.to(device, torch.float32)[:, :, None, None]  # colour shifts (zeros when off)
            std = std * self.train_scale
        return (x / std).to(self.dtype), labels

    def mean_windows(self, left: torch.Tensor, top: torch.Tensor, mirrored: torch.Tensor, device) -> torch.Tensor:
        """(N, 3, crop, crop): the mean image cut where each crop was cut, mirrored with it."""
        steps = torch.arange(self.crop, device=device)
        rows = top.to(device)[:, None] + steps
        cols = left.to(device)[:, None] + steps
        cols = torch.where(mirrored.to(device)[:, None].bool(), cols.flip(1), cols)
        if self.mean_image.device != torch.device(device):  # moved once, kept there
            self.mean_image = self.mean_image.to(device)
        return self.mean_image[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)

    def eval_windows(self, views: int, device) -> torch.Tensor:
        """The fixed windows of evaluation: the centre, or the ten views (corners, centre, mirrored)."""
        free = self.mean_image.shape[-1] - self.crop
        places = [(0.5, 0.5)] if views == 1 else TEN_VIEWS * 2
        left = torch.tensor([place(x, free) for x, _ in places])
        top = torch.tensor([place(y, free) for _, y in places])
        mirrored = torch.tensor([0] * len(places) if views == 1 else [0] * 5 + [1] * 5)
        return self.mean_windows(left, top, mirrored, device)
