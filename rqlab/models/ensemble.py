"""The deterministic ensemble of a random-precision model's support: what a white-box
attacker of random precision inference attacks (METHODS section 8).

    >>> ens = SupportEnsemble(model, (4, 8))       # log of the mean softmax over 4 and 8 bits
    >>> with ens.active():                         # hold the precision switch open (cheaper)
    ...     log_probs = ens(x)                     # (B, K)

Paper: the ensemble/expectation view of randomised defenses, Athalye, Carlini, Wagner,
"Obfuscated Gradients Give a False Sense of Security", ICML 2018; the defense is Random
Precision Inference (Fu et al., "Double-Win Quant", ICML 2021).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn

from .. import quant
from ..validate import RqlabError


class SupportEnsemble(nn.Module):
    """forward(x) = log( mean_{b in choices} softmax(f_b(x)) ), (B, C, H, W) -> (B, K).

    Deterministic: the model's own random policy is off while the ensemble runs; every
    precision b is set with `quant.switching` (no tree walk per switch). The argmax is
    the ensemble's vote by mean probability, and cross-entropy on these log-probabilities
    is the loss of the averaged prediction, so gradient attacks (APGD, FAB) and Square
    see one smooth deterministic model. `choices` default: the support of the model's
    current policy. The wrapped model keeps its parameters (registered as `model`).
    """

    def __init__(self, model: nn.Module, choices=None):
        super().__init__()
        if choices is None:
            choices = quant.current(model).support()
        choices = tuple(int(b) for b in choices)
        if not choices:
            raise RqlabError("SupportEnsemble needs at least one precision in choices")
        self.model = model
        self.choices = choices
        self._policies = [quant.Fixed(b) for b in choices]
        self._switch = None
        self.input_shape = getattr(model, "input_shape", None)
        self.num_classes = getattr(model, "num_classes", None)
        self.config = getattr(model, "config", None)

    @contextlib.contextmanager
    def active(self) -> Iterator["SupportEnsemble"]:
        """Hold the precision switch open across many forward passes (an attack's run);
        the model's exact previous precision state comes back on exit."""
        if self._switch is not None:  # nested: already open
            yield self
            return
        with quant.switching(self.model, self._policies) as switch:
            self._switch = switch
            try:
                yield self
            finally:
                self._switch = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._switch is None:
            with self.active():
                return self.forward(x)
        log_probs = []
        for p in self._policies:
            self._switch(p)
            log_probs.append(torch.log_softmax(self.model(x), dim=1))  # (B, K)
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))

    def extra_repr(self) -> str:
        return f"choices={self.choices}"


__all__ = ["SupportEnsemble"]
