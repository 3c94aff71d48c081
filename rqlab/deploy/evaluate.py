"""Robustness of the engine itself, as one evaluation record (METHODS section 9).

    >>> rec = evaluate_engine(model, engine, test_set, ThreatModel("pgd", eps=0.1, steps=20),
    ...                       square_queries=1000)
    >>> rec.protocol, rec.robust_accuracy      # "engine"; worst case over the attacks below
    >>> rec["fake_quant"]["robust_accuracy"]   # the fake-quant twin's own white-box figure, beside it
    >>> print(format_engine_record(rec))

The engine has no gradient, so no white-box attack on it exists. What runs, on every example:
    transfer_fake_quant   the threat's attack (PGD) crafted white-box on the fake-quant twin
                          (the same model at Fixed(8)), scored on the engine
    transfer_fp           the same attack crafted on the model at FP, scored on the engine
    square                Square (black box, pyautoattack) on the engine's own outputs
An example is robust when the engine classifies it and every attack's example correctly;
`robust_accuracy` is therefore an upper bound on the engine's true robust accuracy (a
stronger attack may exist), and the record says so in `extra["bound"]`. Beside it:
the agreement of the engine with the twin and with FP on the clean images (prediction
flip rate, max and mean absolute logit difference), and the twin's and FP's own
white-box figures under the same attack.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from .. import attacks, quant
from ..attacks import ThreatModel
from ..evaluation import _accuracies, _jsonable, _progress, as_tensors
from ..models.state import eval_mode
from ..quant.layers import SwitchableBatchNorm2d
from ..record import Record
from ..validate import RqlabError, check_int
from .engine import Engine

TWIN_BITS = 8  # the engine is int8: its fake-quant twin is the model at Fixed(8)
BOUND = ("upper: the engine has no gradient, so no white-box attack on it exists; robust_accuracy is the worst "
         "case over transfer attacks (crafted white-box on the fake-quant twin and on FP) and Square on the "
         "engine's outputs, and a stronger attack may lower it")


def calibration_set(dataset: str, n: int, seed: int = 0, root=None) -> tuple[torch.Tensor, dict]:
    """(x float (n, C, H, W) in [0, 1], source) of the seeded training subset that
    calibrates the engine; source ({"dataset", "split", "n", "seed"}) goes into the record."""
    from .. import data

    ds = data.load(dataset, "train", n=check_int(n, "calib_n", 1), seed=check_int(seed, "calib_seed", 0), root=root)
    return ds.x.float().div(255), {"dataset": dataset, "split": "train", "n": n, "seed": seed}


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far `logits` are from `reference` ((N, K) both): {"flip_rate" (share of
    examples whose predicted class differs), "max_logit_diff", "mean_logit_diff"
    (absolute, over every logit), "n"}."""
    if logits.shape != reference.shape:
        raise RqlabError(f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} differ in shape")
    d = (logits.float() - reference.float()).abs()
    return {"flip_rate": (logits.argmax(1) != reference.argmax(1)).float().mean().item(),
            "max_logit_diff": d.max().item(), "mean_logit_diff": d.mean().item(), "n": len(logits)}


def has_fp(model: nn.Module) -> bool:
    """The model runs at FP (a switchable-BN model has branches for its trained set only)."""
    return all(32 in m.bits_set for m in model.modules() if isinstance(m, SwitchableBatchNorm2d))


def evaluate_engine(model: nn.Module, engine: Engine, data, threat: ThreatModel | None = None,
                    square_queries: int = 1000, n: int | None = None, batch_size: int = 256, seed: int = 0,
                    model_id: str | None = None, progress: bool = True) -> Record:
    """Clean and robust accuracy of `engine` (the int8 deployment of `model`), beside the
    fake-quant twin (`model` at Fixed(8)) and FP; see the module docstring.

    model: the rqlab model the engine was built from (the transfer sources; left in its
        mode and policy). engine: an `Engine` (`int8_engine(model, ...)`).
    data: a Dataset or (x, y); the first `n` examples. threat: the white-box attack
        crafted on the sources (default PGD-20, linf, eps 0.1); batch i runs with seed
        threat.seed + i, Square too. square_queries: Square's query budget per example.
    Returns a Record with protocol "engine": policy Fixed(8) (the engine's precision, the
    first and last layer as the engine keeps them), clean/robust accuracy of the engine,
    `attacks` (one entry per attack, scored on the engine), and in `extra`: "engine"
    (settings and versions), "agreement" ({"fake_quant", "fp"}: flip rate and logit
    differences on the clean images), "fake_quant" and "fp" (their clean and white-box
    robust accuracy under the threat), "bound" (why the figure is an upper bound),
    "strongest" (the attack with the lowest accuracy on the engine).
    """
    from .. import __version__

    t0 = time.perf_counter()
    threat = threat if threat is not None else ThreatModel("pgd")
    if not isinstance(threat, ThreatModel):
        raise RqlabError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if not isinstance(engine, Engine):
        raise RqlabError(f"engine must be an rqlab.deploy.Engine, got {type(engine).__name__}")
    if threat.attack in ("transfer", "square", "autoattack"):
        raise RqlabError(f"threat.attack={threat.attack!r}: give the white-box attack to craft on the twin and "
                         "on FP (pgd, fgsm, cw, ...); transfer and Square are run by evaluate_engine itself")
    square_queries = check_int(square_queries, "square_queries", 1)
    batch_size, seed = check_int(batch_size, "batch_size", 1), check_int(seed, "seed", 0)
    x, y = as_tensors(data, n)
    device = next(model.parameters()).device
    sources = {"fake_quant": quant.Fixed(TWIN_BITS)}
    if has_fp(model):
        sources["fp"] = quant.Fixed(32)
    names = [f"transfer_{s}" for s in sources] + ["square"]
    N = len(x)
    engine_clean = torch.zeros(N, dtype=torch.long)
    hits = {k: torch.zeros(N, dtype=torch.long) for k in names}
    src_clean = {s: torch.zeros(N, dtype=torch.long) for s in sources}
    src_robust = {s: torch.zeros(N, dtype=torch.long) for s in sources}
    logits = {"engine": [], **{s: [] for s in sources}}
    times = dict.fromkeys(names, 0.0)
    queries0 = engine.queries
    bar = _progress(N, f"engine {engine.name}", progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model), \
            quant.frozen_weights(model):
        torch.manual_seed(seed)
        try:
            for i, start in enumerate(range(0, N, batch_size)):
                sl = slice(start, start + batch_size)
                xb, yb = x[sl].to(device), y[sl].to(device)
                with torch.no_grad():
                    le = engine(xb)
                logits["engine"].append(le.cpu())
                ok = (le.argmax(1) == yb).long().cpu()
                engine_clean[sl] = ok
                for s, policy in sources.items():
                    t = ThreatModel("transfer", norm=threat.norm, eps=threat.eps, steps=threat.steps,
                                    step_size=threat.step_size, restarts=threat.restarts, eot=threat.eot,
                                    seed=threat.seed + i, policy=policy, surrogate=model,
                                    options={"base": threat.attack})
                    t1 = time.perf_counter()
                    x_adv = attacks.transfer(engine, xb, yb, t)
                    times[f"transfer_{s}"] += time.perf_counter() - t1
                    with torch.no_grad(), quant.using(model, policy):
                        ls = model(xb)
                        src_ok = (ls.argmax(1) == yb).long().cpu()
                        src_clean[s][sl] = src_ok
                        src_robust[s][sl] = src_ok * (model(x_adv).argmax(1) == yb).long().cpu()
                    logits[s].append(ls.cpu())
                    with torch.no_grad():
                        hits[f"transfer_{s}"][sl] = ok * (engine(x_adv).argmax(1) == yb).long().cpu()
                t1 = time.perf_counter()
                sq = ThreatModel("square", norm=threat.norm, eps=threat.eps, seed=threat.seed + i,
                                 options={"n_queries": square_queries})
                x_sq = attacks.square(engine, xb, yb, sq)
                times["square"] += time.perf_counter() - t1
                with torch.no_grad():
                    hits["square"][sl] = ok * (engine(x_sq).argmax(1) == yb).long().cpu()
                bar.update(len(xb))
        finally:
            bar.close()

    robust = engine_clean.clone()
    for h in hits.values():
        robust *= h
    n_batches = -(-N // batch_size)
    entries = []
    for k in names:
        e = {"name": k, "kind": "black-box" if k == "square" else "transfer", "target": "engine",
             **_accuracies("robust", hits[k], 1), "per_example": hits[k].int().tolist(),
             "time_s": round(times[k], 3), "batch_seeds": [threat.seed + i for i in range(n_batches)]}
        if k == "square":
            e["threat"] = ThreatModel("square", norm=threat.norm, eps=threat.eps, seed=threat.seed,
                                      options={"n_queries": square_queries}).to_dict()
        else:
            s = k[len("transfer_"):]
            e["source"] = {"policy": sources[s].to_dict(), "attack": threat.attack}
            e["threat"] = threat.replace(policy=sources[s]).to_dict()
        entries.append(e)
    engine_logits = torch.cat(logits["engine"])
    extra = {"engine": engine.describe(), "bound": BOUND,
             "strongest": min(entries, key=lambda e: e["robust_accuracy"])["name"],
             "agreement": {s: agreement(engine_logits, torch.cat(logits[s])) for s in sources},
             # rqlab's own fake quantization against FP, for scale: how much the twin itself changes
             "twin_vs_fp": agreement(torch.cat(logits["fake_quant"]), torch.cat(logits["fp"])) if "fp" in sources
             else None,
             "engine_queries": engine.queries - queries0}
    for s, policy in sources.items():
        extra[s] = {"policy": policy.to_dict(), "attack": f"{threat.attack}-{threat.steps} white-box",
                    **_accuracies("clean", src_clean[s], 1), **_accuracies("robust", src_robust[s], 1)}
    if "fp" not in sources:
        extra["fp"] = None
        extra["agreement"]["fp"] = None
        extra["fp_missing"] = "the model has switchable batch norm without an FP branch: no FP transfer source"
    extra.update({"model_config": model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict")
                  else None, "batch_size": batch_size, "rqlab_version": __version__,
                  "torch_version": torch.__version__, "device": str(device),
                  "wall_time_s": round(time.perf_counter() - t0, 3)})
    return Record(
        model=model_id or getattr(getattr(model, "config", None), "name", None) or type(model).__name__,
        policy=quant.Fixed(TWIN_BITS).to_dict(), threat=threat.to_dict(), n=N, passes=1, seed=seed,
        **_accuracies("clean", engine_clean, 1), **_accuracies("robust", robust, 1),
        per_example={"clean": engine_clean.int().tolist(), "robust": robust.int().tolist()}, protocol="engine",
        attacks=tuple(_jsonable(e) for e in entries), unreliable=(), extra=_jsonable(extra))


def format_engine_record(rec) -> str:
    """A short text table: the engine beside the fake-quant twin and FP."""
    pct = lambda v: f"{100 * v:6.2f}%"  # noqa: E731
    ci = lambda c: f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"  # noqa: E731
    t, eng = rec.threat, rec["engine"]
    lines = [f"model {rec.model}  engine {eng['engine']} {eng['onnxruntime_version']} {eng['kind']} "
             f"({eng.get('format')}, activations {eng.get('activations')})  n={rec.n}  protocol {rec.protocol}",
             f"threat {t['attack']}-{t['steps']} {t['norm']} eps={t['eps']:.4g} crafted on the sources; "
             f"Square {rec.attacks[-1]['threat']['options']['n_queries']} queries on the engine",
             f"{'':28}{'clean':>9}{'robust':>9}{'95% CI':>16}"]
    for s, label in (("fake_quant", "fake-quant 8 bit, white-box"), ("fp", "FP, white-box")):
        src = rec.get(s)
        if src:
            lines.append(f"{label:<28}{pct(src['clean_accuracy']):>9}{pct(src['robust_accuracy']):>9}"
                         f"{ci(src['robust_ci95']):>16}")
    for a in rec.attacks:
        lines.append(f"{'engine, ' + a['name']:<28}{'':>9}{pct(a['robust_accuracy']):>9}{ci(a['robust_ci95']):>16}"
                     f"  {a['time_s']:.1f}s")
    lines.append(f"{'engine, worst case':<28}{pct(rec.clean_accuracy):>9}{pct(rec.robust_accuracy):>9}"
                 f"{ci(rec.robust_ci95):>16}  (an upper bound: no gradient)")
    for s, ag in rec["agreement"].items():
        if ag:
            lines.append(f"agreement with {s:<11} flip rate {100 * ag['flip_rate']:.1f}%, max |logit diff| "
                         f"{ag['max_logit_diff']:.3g}, mean {ag['mean_logit_diff']:.3g}")
    lines.append(f"{rec['wall_time_s']:.1f}s on {rec['device']}")
    return "\n".join(lines)


__all__ = ["evaluate_engine", "agreement", "calibration_set", "format_engine_record", "has_fp", "TWIN_BITS", "BOUND"]
