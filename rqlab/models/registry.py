"""Models by name.

    >>> model = create("smallcnn", input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))
    >>> model = from_config(model.config.to_dict())   # rebuild (e.g. from a checkpoint)
"""
from __future__ import annotations

from ..validate import RqlabError

_CLASSES = {}  # name -> class, filled lazily to avoid an import cycle with base.py
_ALIASES = {"small-cnn": "smallcnn", "preact-resnet18": "preactresnet18", "preactresnet-18": "preactresnet18",
            "wrn-34-10": "wrn34-10", "wideresnet34-10": "wrn34-10"}


def _classes() -> dict:
    if not _CLASSES:
        from .resnets import PreActResNet18, WideResNet34_10
        from .smallcnn import SmallCNN

        _CLASSES.update({"smallcnn": SmallCNN, "preactresnet18": PreActResNet18, "wrn34-10": WideResNet34_10})
    return _CLASSES


def names() -> list[str]:
    return list(_classes())


def canonical_name(name: str) -> str:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _classes():
        raise RqlabError(f"model={name!r} is unknown: choose one of {', '.join(names())}")
    return key


def create(name: str, **config):
    """Build a model by name; `config` holds ModelConfig fields (input_shape, mean, std, ...)."""
    from .base import ModelConfig

    cfg = ModelConfig(name=name, **config)
    return _classes()[cfg.name](cfg)


def from_config(config: dict):
    """Rebuild a model from `ModelConfig.to_dict()`."""
    from .base import ModelConfig

    cfg = ModelConfig.from_dict(dict(config))
    return _classes()[cfg.name](cfg)
