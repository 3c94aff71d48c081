"""Models built from rqlab's quantized layers, normalisation first (inputs in [0, 1]).

    >>> from rqlab import models
    >>> net = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))
"""
from .base import ModelConfig, Normalize, RqlabModel, canonical_name
from .ensemble import SupportEnsemble
from .registry import create, from_config, names
from .resnets import PreActResNet18, WideResNet34_10
from .smallcnn import SmallCNN
from .state import eval_mode, prepared
