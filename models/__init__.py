"""CIFAR-10 (32x32) model zoo: one file per architecture, one registry."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .densenet import densenet121
from .mobilenetv2 import mobilenetv2
from .resnet import resnet18
from .shufflenetv2 import shufflenetv2
from .vgg import vgg16

_CONSTRUCTORS: dict[str, Callable[[int], nn.Module]] = {
    "vgg16": vgg16,
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
    "shufflenetv2": shufflenetv2,
    "densenet121": densenet121,
}
ALIASES = {
    "vgg": "vgg16",
    "resnet": "resnet18",
    "mobilenet": "mobilenetv2",
    "shufflenet": "shufflenetv2",
    "densenet": "densenet121",
}


def names() -> list[str]:
    """Canonical model names, in the study's order."""
    return list(_CONSTRUCTORS)


def canonical_name(name: str) -> str:
    """The canonical name for a name or alias (case-insensitive); KeyError if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in _CONSTRUCTORS:
        raise KeyError(name)
    return key


def build(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model by canonical name or alias."""
    try:
        constructor = _CONSTRUCTORS[canonical_name(name)]
    except KeyError:
        choices = f"{', '.join(names())} (aliases: {', '.join(ALIASES)})"
        raise ValueError(f"unknown model {name!r}; choose from {choices}") from None
    return constructor(num_classes)
