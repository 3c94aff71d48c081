"""Margin-aware sensitivity, a bit-selection baseline: how much quantizing one layer
lowers the logit margin at adversarial inputs (rqlab's construction for issue 14).

Adversarial inputs x_adv are crafted once, against the model at full precision, with
the given threat (e.g. PGD-20). The logit margin of an example is

    m(x) = z_y(x) - max_{k != y} z_k(x)        (> 0: correct, < 0: misclassified)

For each quantizable layer l and bit option b, only layer l is quantized (weights and
input at b bits, `quant.PerLayer({l: b})`, every other layer FP) and

    M_l(b) = (1 / N) sum_i max(0, m_FP(x_adv,i) - m_{l,b}(x_adv,i))

the mean margin *drop* against the FP model on the same x_adv, counting a rise as no
drop. The positive part is the choice: quantization error moves margins both ways, and
the signed mean lets examples the error happens to help cancel those it hurts, whereas
an attacker needs only the hurt ones. Higher = more sensitive; M_l(32) = 0 and M_l(b) = 0
where layer l's quantization is exact on these inputs. Details keep the signed mean
drop and the share of examples whose margin changes sign (`flip_share`).

The x_adv are not re-crafted per layer (that would be one attack per (layer, b)): M
measures the error of the quantized layer at the FP model's adversarial points, the
points an attacker reaches without knowing the allocation. Use training (or held-out)
images, not the test images the allocation is evaluated on.

    >>> threat = ThreatModel("pgd", eps=0.1, steps=20)
    >>> sens = margin_sensitivities(model, train_set, threat, (2, 3, 4, 8), n=256)
    >>> alloc = bitselect.select_bits(model, 4.0, (2, 3, 4, 8), method="margin", sensitivity=sens)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import attacks, quant
from ..attacks import ThreatModel
from ..evaluation import as_tensors
from ..models.state import prepared
from ..validate import FP_BITS, RqlabError, check_int
from .sensitivity import DEFAULT_BITS, Sensitivity, _check_model, check_bits_options, ensure_calibrated

CONSTRUCTION = ("rqlab (issue 14): M_l(b) = mean_i max(0, m_FP(x_adv,i) - m_{l,b}(x_adv,i)), logit margin "
                "m = z_y - max_{k!=y} z_k, only layer l at b bits, x_adv crafted once against the FP model")


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) true-class logit minus the largest other logit, from (B, K) logits."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


@torch.no_grad()
def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, policy, batch_size: int) -> torch.Tensor:
    with prepared(model, policy):
        return torch.cat([logit_margin(model(x[i:i + batch_size]), y[i:i + batch_size]).double()
                          for i in range(0, len(x), batch_size)])


def margin_drops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits_options=DEFAULT_BITS,
                 batch_size: int = 256) -> tuple[dict, dict]:
    """(table {layer: {b: M_l(b)}}, details) measured at the given inputs x (N, C, H, W)
    in [0, 1] with labels y (N,). Every option needs an activation range."""
    options = check_bits_options(bits_options)
    check_int(batch_size, "batch_size", 1)
    layers = _check_model(model)
    ensure_calibrated(model, options)
    base = _margins(model, x, y, quant.Fixed(FP_BITS), batch_size)
    table, details = {}, {}
    for name, layer in layers:
        row, signed, flips = {}, {}, {}
        for b in options:
            m = base if b >= FP_BITS else _margins(model, x, y, quant.PerLayer({name: b}), batch_size)
            drop = base - m
            row[b] = float(drop.clamp(min=0).mean())
            signed[b] = float(drop.mean())
            flips[b] = float(((base > 0) != (m > 0)).double().mean())
        table[name] = row
        details[name] = {"kind": type(layer).__name__, "weights": layer.weight.numel(), "mean_drop": signed,
                         "flip_share": flips}
    fp = {"mean_margin": float(base.mean()), "accuracy": float((base > 0).double().mean())}
    for d in details.values():
        d["fp"] = fp
    return table, details


def margin_sensitivities(model: nn.Module, data, threat: ThreatModel, bits_options=DEFAULT_BITS,
                         n: int | None = None, batch_size: int = 256, batches=None) -> Sensitivity:
    """M_l(b) for every quantizable layer and bit option (module docstring).

    model: an rqlab model with plain batch norms; its precision, policy and mode are left
        as they were (activation ranges may be calibrated from `batches`).
    data: a Dataset or (x, y) pair (training or held-out images); the first `n` are used
        (None: all). threat: the ThreatModel of the attack crafted against the FP model.
    batches: calibration images for options without an activation range (else a missing
        range raises). Returns a `Sensitivity` with method "margin"; details[l] =
        {"mean_drop" {b}, "flip_share" {b}, "fp" {"mean_margin", "accuracy"} at x_adv,
        "weights", "kind"}.
    """
    options = check_bits_options(bits_options)
    if not isinstance(threat, ThreatModel):
        raise RqlabError(f"threat must be an rqlab.attacks.ThreatModel (e.g. ThreatModel('pgd', eps=0.1, "
                         f"steps=20)), got {type(threat).__name__}")
    check_int(batch_size, "batch_size", 1)
    _check_model(model)
    ensure_calibrated(model, options, batches)
    x, y = as_tensors(data, n)
    p = next(model.parameters())
    x, y = x.to(device=p.device, dtype=p.dtype), y.to(p.device)
    with quant.using(model, quant.Fixed(FP_BITS)):
        x_adv = torch.cat([attacks.run(model, x[i:i + batch_size], y[i:i + batch_size], threat)
                           for i in range(0, len(x), batch_size)])
    table, details = margin_drops(model, x_adv, y, options, batch_size)
    settings = {"n": len(x), "batch_size": batch_size, "threat": threat.to_dict()}
    return Sensitivity(table, details, options, settings, method="margin", construction=CONSTRUCTION)


__all__ = ["CONSTRUCTION", "logit_margin", "margin_drops", "margin_sensitivities"]
