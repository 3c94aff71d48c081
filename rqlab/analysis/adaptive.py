"""A random-precision defense under the paper's protocol and under adaptive attacks
(Double-Win Quant, Fu et al., ICML 2021; METHODS sections 2 and 6).

    >>> scores = evaluate_protocols(model, quant.RandomPrecision((4, 5, 6, 7, 8)), (x, y), eps=0.1, steps=20)
    >>> scores["paper"]["robust_accuracy"], scores["eot_pgd"]["robust_worst_accuracy"]

Protocols (every one scored with `passes` stochastic forward passes for a random
policy: robust_accuracy = mean over the passes, robust_worst_accuracy = correct in all of them):

    paper        plain `attack` (PGD) against the randomly switching model, as the paper
                 evaluates it: the model draws a precision at every forward pass (per batch,
                 so per attack step too), the attacker averages nothing (no EOT).
    eot_pgd      PGD whose every step averages `eot` gradients, each at a precision drawn
                 from the defender's set (the attacker controls the draws).
    expectation  PGD on the loss averaged over *all* precisions of the set (exact expectation).
    autoattack   AutoAttack's "rand" version (APGD-CE and APGD-DLR, 20 EOT samples each),
                 with `aa_n_iter` iterations (the reference is 100; fewer is a quick check).

A deterministic policy (e.g. Fixed(32)) has nothing to average over: eot_pgd and
expectation reduce to the paper's PGD (the same attack; its record is reused and marked),
and AutoAttack runs APGD-CE and APGD-DLR without EOT (pyautoattack's "custom" version,
5 restarts each), since averaging identical gradients would only cost time.
"""
from __future__ import annotations

from .. import quant
from ..attacks import ThreatModel
from ..evaluation import evaluate
from ..validate import RqlabError, check_choice, check_int

PROTOCOLS = ("paper", "eot_pgd", "expectation", "autoattack")
ADAPTIVE = PROTOCOLS[1:]
AA_REFERENCE_ITERS = 100


def protocol_threats(policy, eps: float, steps: int = 20, attack: str = "pgd", adaptive=ADAPTIVE, eot: int = 10,
                     aa_n_iter: int = AA_REFERENCE_ITERS, seed: int = 0) -> dict:
    """{protocol: ThreatModel, or the name of the protocol whose record it reuses}."""
    check_int(eot, "eot", 1)
    check_int(aa_n_iter, "aa_n_iter", 1)
    for a in adaptive:
        check_choice(a, "adaptive", ADAPTIVE)
    random = isinstance(policy, quant.RandomPrecision)
    threats = {"paper": ThreatModel(attack, eps=eps, steps=steps, seed=seed)}
    for a in adaptive:
        if a in ("eot_pgd", "expectation") and not random:
            threats[a] = "paper"  # one precision: EOT and the expectation are plain PGD
        elif a == "eot_pgd":
            threats[a] = ThreatModel("eot_pgd", eps=eps, steps=steps, eot=eot, seed=seed)
        elif a == "expectation":
            threats[a] = ThreatModel("expectation", eps=eps, steps=steps, seed=seed)
        else:
            options = ({"version": "rand"} if random else
                       {"version": "custom", "attacks": ["apgd-ce", "apgd-dlr"]})
            threats[a] = ThreatModel("autoattack", eps=eps, seed=seed, options={**options, "n_iter": aa_n_iter})
    return threats


def evaluate_protocols(model, policy, data, eps: float, steps: int = 20, attack: str = "pgd", adaptive=ADAPTIVE,
                       eot: int = 10, passes: int = 5, aa_n_iter: int = AA_REFERENCE_ITERS, n: int | None = None,
                       seed: int = 0, batch_size: int = 256, progress: bool = False) -> dict:
    """Score `model` at `policy` under the paper's protocol and each adaptive attack.

    data: Dataset or (x, y); the first `n` examples. passes: stochastic passes for a
    random policy (a fixed one uses 1). Returns {protocol: {"robust_accuracy",
    "robust_worst_accuracy", "robust_ci95", "robust_worst_ci95", "clean_accuracy", "n",
    "passes", "threat", "same_as"}} (the record's names), JSON-serialisable;
    "same_as" names the protocol whose record is reused (deterministic policies), else None.
    """
    if not isinstance(policy, (quant.Fixed, quant.PerLayer, quant.RandomPrecision)):
        raise RqlabError(f"policy={policy!r} must be a precision policy")
    k = check_int(passes, "passes", 1) if isinstance(policy, quant.RandomPrecision) else 1
    out = {}
    for proto, threat in protocol_threats(policy, eps, steps, attack, adaptive, eot, aa_n_iter, seed).items():
        if isinstance(threat, str):
            out[proto] = {**out[threat], "same_as": threat}
            continue
        rec = evaluate(model, data, threat, policy=policy, n=n, batch_size=batch_size, seed=seed, passes=k,
                       progress=progress)
        out[proto] = {key: rec[key] for key in ("robust_accuracy", "robust_worst_accuracy", "robust_ci95",
                                                "robust_worst_ci95", "clean_accuracy", "n", "threat")}
        out[proto].update(passes=k, same_as=None)
    return out


__all__ = ["PROTOCOLS", "ADAPTIVE", "AA_REFERENCE_ITERS", "protocol_threats", "evaluate_protocols"]
