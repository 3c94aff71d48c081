"""What every rqlab model shares: a validated config, input checks and normalisation
as the first operation (so attacks work in pixel space, METHODS section 0), and
factories for the quantized layers it is built from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from ..quant import QuantConv2d, QuantLinear, batch_norm
from ..quant.functional import STE_MODES, WEIGHT_SCHEMES
from ..validate import RqlabError, check_bits_set, check_choice, check_float, check_images, check_int

# The model names a config accepts; `registry.CLASSES` maps each to its class (one entry each).
NAMES = ("smallcnn", "preactresnet18", "wrn34-10")
ALIASES = {"small-cnn": "smallcnn", "preact-resnet18": "preactresnet18", "preactresnet-18": "preactresnet18",
           "wrn-34-10": "wrn34-10", "wideresnet34-10": "wrn34-10"}


def canonical_name(name: str) -> str:
    """The registry name of `name` (case-insensitive, aliases such as "wrn-34-10" accepted)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in NAMES:
        raise RqlabError(f"model={name!r} is unknown: choose one of {', '.join(NAMES)}")
    return key


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (stored in checkpoints).

    name: registry name ("smallcnn", "preactresnet18", "wrn34-10").
    input_shape: (C, H, W) of the images, values in [0, 1].
    mean, std: per-channel normalisation applied inside the model.
    sbn_bits: precisions with a switchable batch-norm branch (None: plain BN).
    quantize_first_last: False keeps the first conv and last linear at FP.
    ste: "clipped" | "plain"; weight_scheme: "per_channel" | "per_tensor_symmetric".
    """

    name: str
    num_classes: int = 10
    input_shape: tuple = (1, 28, 28)
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    sbn_bits: tuple | None = None
    quantize_first_last: bool = False
    ste: str = "clipped"
    weight_scheme: str = "per_channel"
    act_momentum: float = 0.1

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("name", canonical_name(self.name))
        check_int(self.num_classes, "num_classes", 2)
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise RqlabError(f"input_shape={self.input_shape!r} must be (C, H, W) with positive integers")
        set_("input_shape", shape)
        for key in ("mean", "std"):
            vals = tuple(float(v) for v in getattr(self, key))
            if len(vals) != shape[0]:
                raise RqlabError(f"{key}={list(vals)} must have one value per input channel ({shape[0]})")
            set_(key, vals)
        for i, s in enumerate(self.std):
            check_float(s, f"std[{i}]", 0.0, lo_open=True)
        if self.sbn_bits:
            set_("sbn_bits", check_bits_set(self.sbn_bits, "sbn_bits"))
        else:
            set_("sbn_bits", None)
        check_choice(self.ste, "ste", STE_MODES)
        check_choice(self.weight_scheme, "weight_scheme", WEIGHT_SCHEMES)
        check_float(self.act_momentum, "act_momentum", 0.0, 1.0, lo_open=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["sbn_bits"] = list(self.sbn_bits) if self.sbn_bits else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RqlabError(f"model config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


class Normalize(nn.Module):
    """Checks inputs (shape, [0, 1], NaN) and maps x -> (x - mean) / std per channel.

    (B, C, H, W) -> (B, C, H, W). Set `check = False` to skip the checks on a hot path.
    """

    def __init__(self, mean, std, input_shape):
        super().__init__()
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
        self.input_shape = tuple(input_shape)
        self.check = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check:
            check_images(x, self.input_shape)
        return (x - self.mean) / self.std


class RqlabModel(nn.Module):
    """Base of the zoo's models: `config`, `input_shape`, `num_classes`, and layer factories."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.input_shape = config.input_shape
        self.num_classes = config.num_classes
        self.normalize = Normalize(config.mean, config.std, config.input_shape)

    def conv(self, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0,
             edge: bool = False) -> QuantConv2d:
        """A quantized conv (no bias: BN follows). `edge` marks a first/last layer."""
        c = self.config
        return QuantConv2d(c_in, c_out, k, stride, padding, bias=False,
                           keep_fp=edge and not c.quantize_first_last, ste=c.ste,
                           weight_scheme=c.weight_scheme, act_momentum=c.act_momentum)

    def linear(self, n_in: int, n_out: int, edge: bool = False) -> QuantLinear:
        c = self.config
        return QuantLinear(n_in, n_out, keep_fp=edge and not c.quantize_first_last, ste=c.ste,
                           weight_scheme=c.weight_scheme, act_momentum=c.act_momentum)

    def bn(self, n: int) -> nn.Module:
        return batch_norm(n, self.config.sbn_bits)
