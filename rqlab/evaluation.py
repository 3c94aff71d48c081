"""Evaluation: clean and robust accuracy of a model at a precision policy under a
threat model, as one JSON-serialisable record (METHODS section 6).

    >>> rec = evaluate(model, test_set, ThreatModel("pgd", eps=0.1, steps=20), policy=quant.Fixed(4), n=1000)
    >>> rec["robust_accuracy"], rec["robust_ci95"]

Definitions
    * An example is *robust* in a forward pass when both x and x_adv are classified
      correctly there (x itself lies in the eps-ball), so robust <= clean per example.
    * Random defenses (e.g. RandomPrecision) are scored over M = `passes` stochastic
      forward passes: "accuracy" is the mean over passes, "worst_accuracy" counts an
      example only if it is correct in all M passes. The attack runs once per batch;
      its adversarial examples are then scored M times. For M = 1 both coincide.
      A RandomPrecision model draws one precision per forward call, i.e. per batch:
      each batch sees M draws, shared by its examples.
    * 95% intervals are Wilson score intervals over the n examples; for the mean over
      passes, k is the (fractional) mean number of correct examples.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from . import attacks, quant
from .attacks import ThreatModel
from .attacks.base import correct_passes
from .models.state import eval_mode
from .record import Record
from .stats import wilson_interval
from .validate import RqlabError, check_images, check_int


def as_tensors(data, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float in [0, 1] (N, C, H, W), y int64 (N,)) from a Dataset (`.x` uint8 or float,
    `.y`) or an (x, y) pair; the first `n` examples if n is given."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    else:
        raise RqlabError(f"data must be a Dataset (with .x and .y) or an (x, y) pair, got {type(data).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise RqlabError("data: x and y must be torch tensors")
    if n is not None:
        n = check_int(n, "n", 1)
        if n > len(x):
            raise RqlabError(f"n={n} is more than the {len(x)} examples available")
        x, y = x[:n], y[:n]
    x = x.float() / 255 if x.dtype == torch.uint8 else check_images(x, field="data.x")
    if len(y) != len(x):
        raise RqlabError(f"data has {len(x)} images but {len(y)} labels")
    return x, y.long()


def evaluate(model: nn.Module, data, threat: ThreatModel, policy=None, n: int | None = None,
             batch_size: int = 256, seed: int = 0, passes: int = 1, sanity=False,
             model_id: str | None = None, progress: bool = True) -> dict:
    """Clean and robust accuracy of `model` at precision `policy` under `threat`.

    model: an rqlab model (inputs in [0, 1]); left in its original mode and policy.
    data: a Dataset or (x, y) tensors; the first `n` examples are used (all if None).
    threat: the attack and its budget. policy: the defender's precision (default: the
        model's current one); a RandomPrecision is restarted from its own seed, so the
        record is reproducible. passes: stochastic forward passes per example (M).
    seed: seeds torch's RNG for the run (attack seeds come from the threat: batch i uses
        threat.seed + i). sanity: True or a `sanity.SanityConfig` runs the checks of
        METHODS section 6 on a subset and adds them to the record (with warnings).
    Returns a `rqlab.record.Record`: model, policy, threat, n, passes, seed, clean/robust
    accuracy, worst-case accuracy and their 95% intervals, per-example outcomes, the
    sanity checks, and in `extra` the versions, device and wall time.
    """
    from . import __version__, sanity as sanity_mod

    t0 = time.perf_counter()
    if not isinstance(threat, ThreatModel):
        raise RqlabError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    batch_size, seed, passes = (check_int(batch_size, "batch_size", 1), check_int(seed, "seed", 0),
                                check_int(passes, "passes", 1))
    x, y = as_tensors(data, n)
    policy = fresh_policy(policy if policy is not None else quant.current(model))
    device = next(model.parameters()).device
    attack = attacks.get(threat.attack)
    clean_hits = torch.zeros(len(x), dtype=torch.long)
    robust_hits = torch.zeros(len(x), dtype=torch.long)
    bar = _progress(len(x), f"{threat.attack} {policy}", progress)
    # frozen_weights: the weights stay fixed for the whole evaluation, so each precision's
    # quantized weights are computed once, not in every forward of every batch's attack.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quant.using(model, policy), \
            eval_mode(model), quant.frozen_weights(model):
        torch.manual_seed(seed)
        try:
            for i, start in enumerate(range(0, len(x), batch_size)):
                xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
                x_adv = attack(model, xb, yb, threat.replace(seed=threat.seed + i))
                # robust in a pass = x and x_adv both correct in it (x lies in the ball too)
                for _ in range(passes):
                    ok = correct_passes(model, xb, yb).cpu()
                    clean_hits[start:start + len(xb)] += ok
                    robust_hits[start:start + len(xb)] += ok * correct_passes(model, x_adv, yb).cpu()
                bar.update(len(xb))
            checks = None
            if sanity:
                cfg = sanity if isinstance(sanity, sanity_mod.SanityConfig) else sanity_mod.SanityConfig()
                k = min(cfg.n, len(x))
                checks = sanity_mod.run_checks(model, x[:k].to(device), y[:k].to(device), threat, passes,
                                               robust_hits[:k].float().mean().item() / passes, cfg)
        finally:
            bar.close()

    per_example = {"clean": (clean_hits == passes).int().tolist(), "robust": (robust_hits == passes).int().tolist()}
    if passes > 1:
        per_example.update(clean_hits=clean_hits.tolist(), robust_hits=robust_hits.tolist())
    return Record(
        model=model_id or _model_name(model), policy=policy.to_dict(), threat=threat.to_dict(), n=len(x),
        passes=passes, seed=seed, **_accuracies("clean", clean_hits, passes),
        **_accuracies("robust", robust_hits, passes), per_example=per_example, sanity=checks,
        extra={"model_config": model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None,
               "batch_size": batch_size, "rqlab_version": __version__, "torch_version": torch.__version__,
               "device": str(device), "wall_time_s": round(time.perf_counter() - t0, 3)})


def clean_accuracy(model: nn.Module, data, policy=None, passes: int = 1, batch_size: int = 500) -> float:
    """Clean accuracy of `model` at `policy` (default: its current one) on a Dataset or
    (x, y): the mean over `passes` forward passes (a random policy restarted from its seed)."""
    x, y = as_tensors(data)
    passes = check_int(passes, "passes", 1)
    device = next(model.parameters()).device
    hits = 0
    with quant.using(model, fresh_policy(policy if policy is not None else quant.current(model))), \
            eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            hits += correct_passes(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device),
                                   passes).sum().item()
    return hits / (passes * len(x))


def _accuracies(kind: str, hits: torch.Tensor, passes: int) -> dict:
    n = len(hits)
    mean_k = hits.sum().item() / passes
    worst_k = int((hits == passes).sum())
    return {f"{kind}_accuracy": mean_k / max(n, 1), f"{kind}_ci95": wilson_interval(mean_k, n),
            f"{kind}_worst_accuracy": worst_k / max(n, 1), f"{kind}_worst_ci95": wilson_interval(worst_k, n)}


def fresh_policy(policy):
    """The policy to evaluate at, restarted: a RandomPrecision becomes a new one at its seed
    (so a record's random draws do not depend on earlier use of the policy); Fixed and
    PerLayer come back as they are; a string is read by `quant.parse_policy`."""
    if isinstance(policy, str):
        policy = quant.parse_policy(policy)
    if isinstance(policy, quant.RandomPrecision):
        return quant.RandomPrecision(policy.choices, seed=policy.seed)
    if not isinstance(policy, (quant.Fixed, quant.PerLayer)):
        raise RqlabError(f"policy={policy!r} must be a precision policy (Fixed, PerLayer, RandomPrecision)")
    return policy


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name", None) or type(model).__name__


class _NoBar:
    def update(self, k):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="ex", leave=False)


def format_record(rec: dict) -> str:
    """A short text table of a record's accuracies."""
    pct = lambda v: f"{100 * v:6.2f}%"  # noqa: E731
    ci = lambda c: f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"  # noqa: E731
    t = rec["threat"]
    lines = [f"model {rec['model']}  precision {quant.policy_from_dict(rec['policy'])}  n={rec['n']}  passes={rec['passes']}",
             f"threat {t['attack']} {t['norm']} eps={t['eps']:.4g} steps={t['steps']} step={t['step_size']:.4g} "
             f"restarts={t['restarts']} eot={t['eot']}",
             f"{'':10}{'accuracy':>10}{'95% CI':>16}{'worst-case':>12}"]
    for kind in ("clean", "robust"):
        lines.append(f"{kind:<10}{pct(rec[kind + '_accuracy']):>10}{ci(rec[kind + '_ci95']):>16}"
                     f"{pct(rec[kind + '_worst_accuracy']):>12}")
    for c in rec.sanity or ():
        lines.append(f"sanity {c['check']:<22} {'ok' if c['passed'] else 'FAILED'}: {c['detail']}")
    lines.append(f"{rec['wall_time_s']:.1f}s on {rec['device']}")
    return "\n".join(lines)
