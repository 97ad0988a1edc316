"""AlexNet's shape scaled down for 28-64 px images: for the demo and for fast tests.

Same sequence as the 2012 network (five convs, two towers as groups in conv2/4/5, LRN per
tower, overlapping 3/2 max-pooling, three fully connected layers with dropout), with a 5x5
stride-1 first layer and narrow widths so it trains in minutes on a CPU.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AvgPoolTo, TowerLRN


class AlexNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32, fc: int = 256, dropout: float = 0.5, lrn: bool = True):
        super().__init__()
        w = width
        norm = (lambda: TowerLRN(2)) if lrn else nn.Identity
        self.conv1 = nn.Conv2d(3, w, 5, padding=2)
        self.norm1 = norm()
        self.conv2 = nn.Conv2d(w, 2 * w, 5, padding=2, groups=2)
        self.norm2 = norm()
        self.conv3 = nn.Conv2d(2 * w, 3 * w, 3, padding=1)
        self.conv4 = nn.Conv2d(3 * w, 3 * w, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(3 * w, 2 * w, 3, padding=1, groups=2)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.avgpool = AvgPoolTo(3)  # any input from 28 to 64 px gives 3x3 maps
        self.fc6 = nn.Linear(2 * w * 9, fc)
        self.fc7 = nn.Linear(fc, fc)
        self.fc8 = nn.Linear(fc, num_classes)
        self.drop = nn.Dropout(dropout)
        # He initialisation instead of 2012's fixed std 0.01/0.03: without batch norm, a narrow
        # net starts with vanishing activations otherwise and needs many epochs to get going.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pool(self.norm1(self.conv1(x))))
        x = self.pool(self.norm2(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.relu(self.pool(self.conv5(x)))
        x = torch.flatten(self.avgpool(x), 1)
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        return self.fc8(x)
