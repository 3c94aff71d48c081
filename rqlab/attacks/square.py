"""Square Attack (score-based black box), from AutoAttack's reference implementation
(PyPI `pyautoattack`), behind rqlab's attack signature. Not re-written.

Paper: Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .autoattack import run_pyautoattack
from .base import check_batch
from .threat import ThreatModel

OPTIONS = {"n_queries": 5000, "batch_size": 500}


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Random search over square-shaped perturbations on the margin loss; uses only the
    model's outputs (no gradients), so gradient masking does not stop it.

    Distance: linf or l2. Arguments: `threat.eps`, `threat.seed`, `threat.policy`, and
    `threat.options`: n_queries (default 5000, AutoAttack's), batch_size (default 500).
    Runs pyautoattack's AutoAttack with version="custom", attacks=["square"] (p_init 0.8,
    one restart); only correctly classified examples are attacked.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1].

    Example:
        >>> x_adv = square(model, x, y, ThreatModel("square", eps=0.1, options={"n_queries": 1000}))
    """
    x, y = check_batch(model, x, y, threat)
    threat = threat.replace(options={"n_queries": threat.option("n_queries"), "batch_size": threat.option("batch_size")})
    return run_pyautoattack(model, x, y, threat, "custom", ["square"])
