"""The model's state while something probes it (an attack, an evaluation, a bound):
eval mode, frozen parameters, precision, restored exactly afterwards.

    >>> with eval_mode(model):                 # every submodule gets its own mode back
    ...     logits = model(x)
    >>> with prepared(model, quant.Fixed(4)):  # as an attack sees the model
    ...     x_adv = attack_loop(model, x)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from .. import quant


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; afterwards every submodule gets back its own mode
    (`model.train(flag)` would overwrite submodules that differed from the parent)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, flag in modes:
            m.training = flag


@contextlib.contextmanager
def prepared(model: nn.Module, policy=None) -> Iterator[nn.Module]:
    """The model as an attack sees it: eval mode, parameters frozen (no parameter
    gradients), input checks off on the hot path, weights quantized once per precision
    (`quant.frozen_weights`), and the attacker's precision `policy` applied if given.
    Everything is restored on exit."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    norm = getattr(model, "normalize", None)
    check = getattr(norm, "check", None)
    try:
        for p, _ in params:
            p.requires_grad_(False)
        if check is not None:
            norm.check = False
        with eval_mode(model), quant.frozen_weights(model), \
                (quant.using(model, policy) if policy is not None else contextlib.nullcontext()):
            yield model
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
        if check is not None:
            norm.check = check
