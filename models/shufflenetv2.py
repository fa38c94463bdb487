"""ShuffleNetV2 (1x) for CIFAR: 3x3 stride-1 stem, no max-pool (kuangliu/pytorch-cifar layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stem_body_head import StemBodyHead

# Width multiplier 1x: channels of the three stages and the final 1x1 conv.
SHUFFLENETV2_1X_CHANNELS = (116, 232, 464, 1024)
SHUFFLENETV2_BLOCKS = (3, 7, 3)


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicBlock(nn.Module):
    """Stride-1 unit: half the channels pass through, half go through the branch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        branch = channels // 2
        self.conv1 = nn.Conv2d(branch, branch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(branch)
        self.conv2 = nn.Conv2d(branch, branch, 3, padding=1, groups=branch, bias=False)
        self.bn2 = nn.BatchNorm2d(branch)
        self.conv3 = nn.Conv2d(branch, branch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x: Tensor) -> Tensor:
        passthrough, x = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([passthrough, out], dim=1))


class DownBlock(nn.Module):
    """Stride-2 unit: both branches downsample, and the channel count grows."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], dim=1))


class ShuffleNetV2(StemBodyHead):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        *stage_channels, final_channels = SHUFFLENETV2_1X_CHANNELS
        self.conv1 = nn.Conv2d(3, 24, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages: list[nn.Module] = []
        in_channels = 24
        for out_channels, blocks in zip(stage_channels, SHUFFLENETV2_BLOCKS, strict=True):
            stages.append(DownBlock(in_channels, out_channels))
            stages += [BasicBlock(out_channels) for _ in range(blocks)]
            in_channels = out_channels
        self.body = nn.Sequential(*stages)
        self.conv2 = nn.Conv2d(in_channels, final_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(final_channels)
        self.linear = nn.Linear(final_channels, num_classes)


def shufflenetv2(num_classes: int = 10) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes)
