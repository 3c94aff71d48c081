"""Models by name.

    >>> model = create("smallcnn", input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))
    >>> model = from_config(model.config.to_dict())   # rebuild (e.g. from a checkpoint)

A new model: its module, its name in `base.NAMES` (which `ModelConfig` validates
against) and its class here.
"""
from __future__ import annotations

from .base import NAMES, ModelConfig
from .resnets import PreActResNet18, WideResNet34_10
from .smallcnn import SmallCNN

CLASSES = {"smallcnn": SmallCNN, "preactresnet18": PreActResNet18, "wrn34-10": WideResNet34_10}


def names() -> list[str]:
    return list(NAMES)


def create(name: str, **config):
    """Build a model by name; `config` holds ModelConfig fields (input_shape, mean, std, ...)."""
    cfg = ModelConfig(name=name, **config)
    return CLASSES[cfg.name](cfg)


def from_config(config: dict):
    """Rebuild a model from `ModelConfig.to_dict()`."""
    cfg = ModelConfig.from_dict(dict(config))
    return CLASSES[cfg.name](cfg)
