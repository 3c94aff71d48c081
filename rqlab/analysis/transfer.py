"""Transferability of attacks across precisions (Double-Win Quant, Fu et al., ICML 2021;
METHODS section 2): craft at precision a, evaluate at precision b.

    >>> tm = transfer_matrix(model, x, y, attack_bits=[3, 4, 6, 8], infer_bits=[3, 4, 6, 8],
    ...                      threat=ThreatModel("pgd", eps=8/255, steps=20),
    ...                      eot_policy=quant.RandomPrecision((3, 4, 5, 6, 7, 8)))
    >>> tm["matrix"][i][j]      # robust accuracy, row = attack precision, column = inference

Rows are attacks, columns inference precisions (the paper's table prints the transpose).
The model must have activation ranges for every precision used (`quant.calibrate`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import attacks, quant
from ..attacks import ThreatModel
from ..attacks.base import paired_accuracy
from ..models.state import eval_mode
from ..validate import RqlabError, check_bits_set, check_int


@torch.no_grad()
def _fixed_column(model: nn.Module, x, y, crafted) -> tuple[float, list[float]]:
    """Clean and robust accuracies at one fixed precision, the clean predictions made once
    (a fixed policy in eval mode is deterministic): the values of `paired_accuracy`, with one
    forward for x plus one per crafted batch instead of two per cell."""
    ok = model(x).argmax(1) == y  # (B,)
    return ok.float().mean().item(), [(ok & (model(xa).argmax(1) == y)).float().mean().item() for xa in crafted]


def transfer_matrix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_bits, infer_bits,
                    threat: ThreatModel, eot_policy=None, passes: int = 5, eot_samples: int | None = None) -> dict:
    """Robust accuracy of examples crafted at each attack precision, evaluated at each
    inference precision: exactly len(attack_bits) attack runs (+1 with eot_policy).

    attack_bits, infer_bits: bit-widths (32 = FP). threat: the attack (its `policy` is
        replaced by Fixed(a) for row a). x (B, C, H, W) in [0, 1], y (B,).
    eot_policy: a RandomPrecision; adds a row "eot" (crafted with eot_pgd over its set,
        with the threat's eps/steps/step size and eot samples) and a column "rpi"
        (evaluated under the random policy itself, mean over `passes` forward passes).
    eot_samples: gradient samples per step of the "eot" row (default: the threat's eot,
        else eot_pgd's default 10); the fixed-precision rows keep the threat's own.
    Returns {"row_labels", "col_labels", "matrix" (rows x cols), "clean" (per column),
    "threat", "eot_policy", "eot_samples"}, JSON-serialisable; accuracies are fractions.
    """
    attack_bits = list(check_bits_set(attack_bits, "attack_bits"))
    infer_bits = list(check_bits_set(infer_bits, "infer_bits"))
    passes = check_int(passes, "passes", 1)
    if eot_policy is not None and not isinstance(eot_policy, quant.RandomPrecision):
        raise RqlabError(f"eot_policy={eot_policy!r} must be a quant.RandomPrecision")
    settings = [quant.Fixed(b) for b in infer_bits]
    col_labels = [str(p) for p in settings]
    if eot_policy is not None:
        settings.append(eot_policy)
        col_labels.append("rpi")

    with quant.frozen_weights(model):  # each precision's weights quantized once, for every run
        return _transfer_matrix(model, x, y, attack_bits, settings, col_labels, threat, eot_policy, passes,
                                eot_samples)


def _transfer_matrix(model, x, y, attack_bits, settings, col_labels, threat, eot_policy, passes,
                     eot_samples) -> dict:
    crafted, row_labels, eot = [], [], None
    for a in attack_bits:
        crafted.append(attacks.get(threat.attack)(model, x, y, threat.replace(policy=quant.Fixed(a))))
        row_labels.append(str(quant.Fixed(a)))
    if eot_policy is not None:
        eot = threat.replace(attack="eot_pgd", policy=eot_policy, options={},
                             eot=threat.eot if eot_samples is None else check_int(eot_samples, "eot_samples", 1))
        crafted.append(attacks.get("eot_pgd")(model, x, y, eot))
        row_labels.append("eot")

    matrix, clean = [[None] * len(settings) for _ in crafted], []
    with eval_mode(model):
        for j, p in enumerate(settings):
            if not isinstance(p, quant.RandomPrecision):
                with quant.using(model, p):
                    clean_j, column = _fixed_column(model, x, y, crafted)
                clean.append(clean_j)
                for i, value in enumerate(column):
                    matrix[i][j] = value
                continue
            # the random column keeps its order of draws: x and x_adv draw in turn
            with quant.using(model, quant.RandomPrecision(p.choices, p.seed) if passes > 1 else p):
                clean.append(paired_accuracy(model, x, y, x, passes))
                for i, x_adv in enumerate(crafted):
                    matrix[i][j] = paired_accuracy(model, x, y, x_adv, passes)
    return {"row_labels": row_labels, "col_labels": col_labels, "matrix": matrix, "clean_accuracy": clean,
            "threat": threat.to_dict(), "eot_policy": eot_policy.to_dict() if eot_policy is not None else None,
            "eot_samples": eot.eot_samples if eot is not None else None}
