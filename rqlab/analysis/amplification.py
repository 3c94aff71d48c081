"""Error amplification through the layers (Defensive Quantization, Lin, Gan, Han, ICLR
2019; METHODS section 3).

    >>> amp = error_amplification({"fp": fp_model, "4-bit": q_model}, x, x_adv)
    >>> amp["4-bit"]["layers"], amp["4-bit"]["amplification"]

For each conv/linear layer l (its output a_l, before BN and ReLU) and the logits:
    D_l = mean over images of ||a_l(x_adv) - a_l(x)||_2 / ||a_l(x)||_2.
The DQ finding: D_l grows with depth, and faster for quantized models.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.state import eval_mode
from ..validate import RqlabError


def _hooked_layers(model: nn.Module, layers) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layers is None:
        return names
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise RqlabError(f"layers {unknown} are not conv/linear layers of the model; known: {names}")
    return list(layers)


@torch.no_grad()
def _activations(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    acts, hooks = {}, []
    modules = dict(model.named_modules())

    def record(output, name):  # a forward hook must return None
        acts[name] = output.flatten(1)

    for n in names:
        hooks.append(modules[n].register_forward_hook(lambda m, i, o, n=n: record(o, n)))
    try:
        acts["logits"] = model(x).flatten(1)
    finally:
        for h in hooks:
            h.remove()
    return acts


def error_amplification(models: dict, x: torch.Tensor, x_adv: torch.Tensor, layers=None,
                        eps: float = 1e-12) -> dict:
    """Relative activation error D_l per layer, per model.

    models: {name: model}, each run in eval mode at its current precision (use a fixed
        precision: a random one would compare two different networks).
    x, x_adv: (B, C, H, W) in [0, 1], same shape. layers: conv/linear layer names to
        report (default: all, in module order); "logits" is always added last.
    Returns {name: {"layers": [...], "amplification": [D_l, ...]}}, JSON-serialisable;
    all zeros when x_adv == x.
    """
    if not isinstance(models, dict) or not models:
        raise RqlabError("models must be a non-empty dict {name: model}")
    if x.shape != x_adv.shape:
        raise RqlabError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} must have the same shape")
    out = {}
    for name, model in models.items():
        names = _hooked_layers(model, layers)
        with eval_mode(model):
            clean, adv = _activations(model, x, names), _activations(model, x_adv, names)
        keys = names + ["logits"]
        amp = [((adv[k] - clean[k]).norm(dim=1) / clean[k].norm(dim=1).clamp_min(eps)).mean().item() for k in keys]
        out[str(name)] = {"layers": keys, "amplification": amp}
    return out
