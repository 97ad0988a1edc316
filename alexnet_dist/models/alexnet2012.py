"""The ILSVRC-2012 competition network: layers/layers-145.cfg of the original cuda-convnet code.

Two towers (one per GTX 580 in 2012) are expressed as grouped convolutions where the towers
are separate (conv2, conv4, conv5) and full connections where they cross (conv3, fc6-8).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SpatialNorm, TowerLRN


def _init(layer: nn.Module, std: float, bias: float) -> None:
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.constant_(layer.bias, bias)


class AlexNet2012(nn.Module):
    """Input: a 224x224 crop with the mean image subtracted. Output: class logits."""

    def __init__(self, num_classes: int = 1000, spatial_norm: bool = True, lrn: bool = True, dropout: float = 0.5):
        super().__init__()
        towers = 2
        norm = (lambda: TowerLRN(towers)) if lrn else nn.Identity
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.norm1 = norm()
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=towers)
        self.norm2 = norm()
        self.snorm2 = SpatialNorm() if spatial_norm else nn.Identity()
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=towers)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=towers)
        self.pool = nn.MaxPool2d(3, stride=2)  # overlapping pooling, paper section 3.4
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.drop = nn.Dropout(dropout)  # inverted dropout; equivalent to the original x0.5 at test
        # Initialisation from layers-145.cfg: std 0.01 except conv3-5 (0.03); biases 1 on
        # conv2, conv4, conv5, fc6, fc7 so their ReLUs start in the active region (paper 5).
        for layer, std, bias in [
            (self.conv1, 0.01, 0.0),
            (self.conv2, 0.01, 1.0),
            (self.conv3, 0.03, 0.0),
            (self.conv4, 0.03, 1.0),
            (self.conv5, 0.03, 1.0),
            (self.fc6, 0.01, 1.0),
            (self.fc7, 0.01, 1.0),
            (self.fc8, 0.01, 0.0),
        ]:
            _init(layer, std, bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # cuda-convnet sizes outputs with a ceiling and reads outside the image as zero: the last
        # conv1 window hangs 3 px over the right and bottom edges, so 224 px gives 55x55 maps.
        x = self.conv1(F.pad(x, (0, 3, 0, 3)))
        x = F.relu(self.pool(self.norm1(x)))  # LRN on the pre-ReLU conv1 output, as in the code
        x = F.relu(self.conv2(x))
        x = self.pool(self.snorm2(self.norm2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return F.relu(self.pool(self.conv5(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-2:] != (6, 6):
            raise ValueError(
                f"alexnet2012 takes 224x224 crops; got {tuple(x.shape)} conv5 maps "
                "from a different input size (use model=alexnet_small for small images)"
            )
        x = torch.flatten(x, 1)
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        return self.fc8(x)
