"""MACs, BitOPs and a per-layer summary of a model's precision configuration.

BitOPs = sum over conv/linear layers of MACs x b_weight x b_activation (FP counts as 32),
as in Double-Win Quant. Check: PreActResNet-18 at 32x32 has ~0.557 GMAC, so ~569.9 G
BitOPs at FP. For a random policy the expected BitOPs (mean over its choices) is given.

Note: Double-Win Quant's published BitOPs (21.2 G for RPI over 4..8) count every layer
at b; rqlab counts the configuration as it is, with first/last layers at FP by default.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..validate import FP_BITS
from .layers import QUANT_LAYERS
from .policy import Fixed, PerLayer, Policy, RandomPrecision, current


@torch.no_grad()
def layer_macs(model: nn.Module, input_shape=None) -> dict[str, int]:
    """Multiply-accumulates of one example through each conv/linear layer, by name.

    input_shape: (C, H, W); defaults to the model's `input_shape` attribute.
    """
    shape = tuple(input_shape or model.input_shape)
    macs: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, inp, out, name=name):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                macs[name] = out[0].numel() * k
        elif isinstance(m, nn.Linear):
            def hook(mod, inp, out, name=name):
                macs[name] = mod.in_features * mod.out_features
        else:
            continue
        hooks.append(m.register_forward_hook(hook))
    # Run at FP without touching the policy (switchable BNs may have no FP branch).
    saved = [(m, m.w_bits, m.a_bits) for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    was_training = model.training
    try:
        model.eval()
        for m, _, _ in saved:
            m.w_bits = m.a_bits = FP_BITS
        p = next(model.parameters())
        model.forward(torch.zeros((1,) + shape, device=p.device, dtype=p.dtype))  # no random draw
    finally:
        for h in hooks:
            h.remove()
        for m, w, a in saved:
            m.w_bits, m.a_bits = w, a
        model.train(was_training)
    return macs


def summary(model: nn.Module, policy: Policy | None = None, input_shape=None) -> list[dict]:
    """One row per conv/linear layer: name, kind, params, MACs, w_bits, a_bits, BitOPs.

    Rows follow `policy` (default: the model's current one); for RandomPrecision the
    bits shown are the mean over its choices and BitOPs the expectation.
    """
    policy = policy or current(model)
    macs = layer_macs(model, input_shape)
    modules = dict(model.named_modules())
    settings = [policy] if not isinstance(policy, RandomPrecision) else [Fixed(b) for b in policy.choices]
    rows = []
    for name, n_mac in macs.items():
        m = modules[name]
        bits = [_layer_bits(m, name, s) for s in settings]
        rows.append({
            "name": name,
            "kind": type(m).__name__,
            "params": sum(p.numel() for p in m.parameters(recurse=False)),
            "macs": n_mac,
            "w_bits": sum(w for w, _ in bits) / len(bits),
            "a_bits": sum(a for _, a in bits) / len(bits),
            "bitops": sum(n_mac * w * a for w, a in bits) / len(bits),
            "keep_fp": bool(getattr(m, "keep_fp", False)),
        })
    return rows


def _layer_bits(m: nn.Module, name: str, policy: Policy) -> tuple[int, int]:
    if not isinstance(m, QUANT_LAYERS) or m.keep_fp:
        return FP_BITS, FP_BITS
    if isinstance(policy, PerLayer):
        return policy.layer_bits(name)
    return policy.bits, policy.a_bits


def bitops(model: nn.Module, policy: Policy | None = None, input_shape=None) -> float:
    """Total BitOPs of one example under `policy` (expected value for a random policy)."""
    return float(sum(r["bitops"] for r in summary(model, policy, input_shape)))


def macs(model: nn.Module, input_shape=None) -> int:
    """Total MACs of one example."""
    return int(sum(layer_macs(model, input_shape).values()))


def format_summary(rows: list[dict]) -> str:
    """A fixed-width text table of `summary` rows, with a total line."""
    head = f"{'layer':<28}{'kind':<13}{'params':>10}{'MACs':>14}{'w':>6}{'a':>6}{'GBitOPs':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<28}{r['kind']:<13}{r['params']:>10,}{r['macs']:>14,}"
                     f"{r['w_bits']:>6.3g}{r['a_bits']:>6.3g}{r['bitops'] / 1e9:>10.3f}")
    total = sum(r["bitops"] for r in rows)
    lines.append(f"{'total':<28}{'':<13}{sum(r['params'] for r in rows):>10,}"
                 f"{sum(r['macs'] for r in rows):>14,}{'':>12}{total / 1e9:>10.3f}")
    return "\n".join(lines)
