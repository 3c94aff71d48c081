"""Input validation shared by every rqlab module.

Bad input fails early with a message that names the field, the value received and
what is allowed, e.g.::

    >>> check_bits(33)
    Traceback (most recent call last):
    ...
    rqlab.validate.RqlabError: bits=33 is not allowed: use an integer in 1..16, or 32 for full precision
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

FP_BITS = 32
ALLOWED_BITS = tuple(range(1, 17)) + (FP_BITS,)
BITS_HELP = "an integer in 1..16, or 32 for full precision"


class RqlabError(ValueError):
    """A user-facing error: bad input, missing data, a corrupt file.

    The command-line interface prints these without a traceback.
    """


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bits(value, field: str = "bits") -> int:
    """Return `value` as an int if it is a valid bit-width (1..16 or 32), else raise."""
    if not _is_int(value) or int(value) not in ALLOWED_BITS:
        raise RqlabError(f"{field}={value!r} is not allowed: use {BITS_HELP}")
    return int(value)


def check_bits_set(values: Iterable, field: str = "bits") -> tuple[int, ...]:
    """A non-empty, duplicate-free tuple of valid bit-widths, sorted."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise RqlabError(f"{field}={values!r} must be a collection of bit-widths such as (4, 6, 8) or range(4, 9), "
                         f"each {BITS_HELP}; for a single precision use quant.Fixed")
    values = tuple(values)
    if not values:
        raise RqlabError(f"{field} is empty: give at least one bit-width ({BITS_HELP})")
    out = tuple(check_bits(v, field) for v in values)
    if len(set(out)) != len(out):
        raise RqlabError(f"{field}={list(values)} repeats a bit-width: give each once")
    return tuple(sorted(out))


def check_choice(value, field: str, allowed: Sequence[str]) -> str:
    """`value` must be one of `allowed` (strings)."""
    if value not in allowed:
        raise RqlabError(f"{field}={value!r} is unknown: choose one of {', '.join(map(str, allowed))}")
    return value


def check_int(value, field: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer in [lo, hi] (either bound may be None)."""
    if not _is_int(value):
        raise RqlabError(f"{field}={value!r} must be an integer{_range_text(lo, hi)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RqlabError(f"{field}={value} is out of range: use an integer{_range_text(lo, hi)}")
    return value


def check_float(value, field: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] ((lo, hi] when lo_open)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise RqlabError(f"{field}={value!r} must be a finite number{_range_text(lo, hi, lo_open)}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise RqlabError(f"{field}={value} is out of range: use a number{_range_text(lo, hi, lo_open)}")
    if hi is not None and value > hi:
        raise RqlabError(f"{field}={value} is out of range: use a number{_range_text(lo, hi, lo_open)}")
    return value


def _range_text(lo, hi, lo_open: bool = False) -> str:
    left = "(" if lo_open else "["
    if lo is not None and hi is not None:
        return f" in {left}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def check_images(x, input_shape: Sequence[int] | None = None, field: str = "x"):
    """Images for a model: a float tensor (B, C, H, W) with values in [0, 1] and no NaN.

    rqlab works in pixel space (METHODS section 0): normalisation is the model's first
    operation, so every input must be in [0, 1].
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise RqlabError(f"{field} must be a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise RqlabError(f"{field} has dtype {x.dtype}: use a float tensor with values in [0, 1]")
    if input_shape is not None and (x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_shape)):
        raise RqlabError(
            f"{field} has shape {tuple(x.shape)}: this model takes (B, {', '.join(map(str, input_shape))})")
    if x.dim() != 4:
        raise RqlabError(f"{field} has shape {tuple(x.shape)}: use (B, C, H, W)")
    if x.numel() == 0:  # an empty batch is valid: there is nothing to check
        return x
    if torch.isnan(x).any():
        raise RqlabError(f"{field} contains NaN: inputs must be finite values in [0, 1]")
    lo, hi = torch.aminmax(x.detach())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise RqlabError(
            f"{field} has values in [{lo.item():.4g}, {hi.item():.4g}]: rqlab inputs live in [0, 1] "
            "(the model normalises internally); do not pass mean/std-normalised images")
    return x
