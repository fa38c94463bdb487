"""The layout MobileNetV2 and ShuffleNetV2 share: a 3x3 stem, a body of blocks, and a 1x1 convolution widening to
the classifier's features before global average pooling."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class StemBodyHead(nn.Module):
    """forward() of a net whose constructor sets conv1/bn1 (stem), body, conv2/bn2 (head) and linear."""

    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    body: nn.Sequential
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d
    linear: nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.body(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
