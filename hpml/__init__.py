"""hpml core: configuration, data, the training loop, distributed set-up and results."""

__version__ = "0.1.0"
