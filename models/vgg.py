"""VGG16 with batch norm, adapted to 32x32 inputs (kuangliu/pytorch-cifar layout)."""

from __future__ import annotations

from torch import Tensor, nn

VGG16_LAYERS: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


class VGG(nn.Module):
    def __init__(self, layers: list[int | str], num_classes: int = 10) -> None:
        super().__init__()
        self.features = _make_features(layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _make_features(layers: list[int | str]) -> nn.Sequential:
    modules: list[nn.Module] = []
    in_channels = 3
    for layer in layers:
        if layer == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_channels = int(layer)
            modules += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
    return nn.Sequential(*modules)


def vgg16(num_classes: int = 10) -> VGG:
    return VGG(VGG16_LAYERS, num_classes)
