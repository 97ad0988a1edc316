"""AlexNet-BN: AlexNet with batch normalisation in place of LRN, the network of the LARS
authors' large-batch runs (You, Gitman and Ginsburg 2017).

Layer order from nvcaffe (github.com/borisgin/nvcaffe, branch caffe-0.16),
models/alexnet_bn/train_val2_fp16.prototxt, the net that solver_8K, solver_16k and solver_32k
name (the same layers as train_val2.prototxt; train_val.prototxt, named by the small-batch
solver.prototxt, is a different variant with BN after every conv):

    conv1 96 11x11/4 -> ReLU -> max-pool 3/2 -> BN
    conv2 256 5x5 pad 2, 2 groups -> ReLU -> max-pool 3/2 -> BN
    conv3 384 3x3 pad 1 -> ReLU -> BN
    conv4 384 3x3 pad 1, 2 groups -> ReLU -> BN
    conv5 256 3x3 pad 1, 2 groups -> ReLU -> max-pool 3/2
    fc6 4096 -> ReLU -> dropout 0.5 -> fc7 4096 -> ReLU -> dropout 0.5 -> fc8

Four BN layers, each after a ReLU (after the pooling where there is one), i.e. on the input of
conv2..conv5; LRN is dropped; dropout stays. The BN layers have no learnable scale or shift
(`scale_bias: false`), so there is no BN parameter to decay or not; eps 1e-4 as there. Caffe's
running averages (moving_average_fraction 0.9) are torch's momentum 0.1. Initial weights as
there: Gaussian std 0.01 (conv, fc8) and 0.005 (fc6, fc7); biases 0.01, 0.1 for fc6 and fc7.
The two-tower grouping of the 2012 network is kept (group: 2 in conv2, conv4, conv5).

nvcaffe's input is a 227-pixel crop (conv1 maps 55x55, pool5 6x6); an average pool to 6x6
before fc6 (an identity at 227) lets the network take 224 as well.
"""

import torch
from torch import nn

from .layers import AvgPoolTo


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-4, momentum=0.1, affine=False)


class AlexNetBN(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, stride=4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            _bn(96),
            nn.Conv2d(96, 256, 5, padding=2, groups=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            _bn(256),
            nn.Conv2d(256, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            _bn(384),
            nn.Conv2d(384, 384, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            _bn(384),
            nn.Conv2d(384, 256, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = AvgPoolTo(6)
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for m in layers:
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.constant_(m.bias, 0.01)
        for fc in (self.classifier[0], self.classifier[3]):  # fc6, fc7
            nn.init.normal_(fc.weight, 0.0, 0.005)
            nn.init.constant_(fc.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)
