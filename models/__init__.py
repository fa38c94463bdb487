"""CIFAR-10 (32x32) model zoo: one file per architecture, one registry.

Names and aliases need no torch (the laptop client checks them); a model's module is imported when it is built.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_CONSTRUCTORS = {  # canonical name -> (module, constructor), in the study's order
    "vgg16": ("vgg", "vgg16"),
    "resnet18": ("resnet", "resnet18"),
    "mobilenetv2": ("mobilenetv2", "mobilenetv2"),
    "shufflenetv2": ("shufflenetv2", "shufflenetv2"),
    "densenet121": ("densenet", "densenet121"),
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
        module, constructor = _CONSTRUCTORS[canonical_name(name)]
    except KeyError:
        choices = f"{', '.join(names())} (aliases: {', '.join(ALIASES)})"
        raise ValueError(f"unknown model {name!r}; choose from {choices}") from None
    return getattr(import_module(f".{module}", __name__), constructor)(num_classes)
