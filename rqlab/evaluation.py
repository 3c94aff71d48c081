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
      each batch sees M draws, shared by its examples. Batch i draws from the policy's
      generator restarted at (seed, i), so its draws do not depend on other batches.
    * distributed=True (under torchrun): rank r runs batches r, r + world, ... and the
      per-example outcomes are summed over the ranks; batch i keeps its attack seed
      (threat.seed + i) and its draws, so the record equals the single-process one.
    * 95% intervals are Wilson score intervals over the n examples; for the mean over
      passes, k is the (fractional) mean number of correct examples.
    * resume=PATH (one process): after each batch the outcomes so far are written to PATH
      atomically; a rerun with the same model weights, data and arguments skips the
      batches PATH holds (each batch depends only on its own seed and draws, so the
      record equals an uninterrupted run's, its times aside). PATH is removed once the
      record is complete; one of other weights or arguments is an error, never mixed in.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import attacks, checkpoint, distributed as dist, quant
from .attacks import ThreatModel
from .attacks.base import correct_passes, settings as attack_settings
from .models.state import eval_mode
from .record import PROTOCOLS, Record
from .stats import diff_half_width, wilson_interval
from .machine import device_name
from .validate import RqlabError, check_choice, check_images, check_int


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
    x = x.float() / 255 if x.dtype == torch.uint8 else check_images(x, field="data.x").float()  # float64 too
    if len(y) != len(x):
        raise RqlabError(f"data has {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise RqlabError("data has no examples: give at least one image and label")
    return x, y.long()


def evaluate(model: nn.Module, data, threat: ThreatModel | None = None, policy=None, n: int | None = None,
             batch_size: int = 256, seed: int = 0, passes: int = 1, sanity=False,
             model_id: str | None = None, progress: bool = True, protocol: str | None = None,
             options: dict | None = None, distributed: bool = False, resume=None) -> Record:
    """Clean and robust accuracy of `model` at precision `policy` under `threat`.

    model: an rqlab model (inputs in [0, 1]); left in its original mode and policy.
    data: a Dataset or (x, y) tensors; the first `n` examples are used (all if None).
    threat: the attack and its budget. policy: the defender's precision (default: the
        model's current one); a RandomPrecision is restarted from its own seed, so the
        record is reproducible. passes: stochastic forward passes per example (M).
    protocol: None (default) is "standard" when no threat is given, else "quick".
        "quick" runs the one attack `threat` names. "standard" runs the
        standard protocol of METHODS section 8 at the threat's norm, eps and seed (its
        steps, step size and restarts are PGD's, EOT-PGD's and the expectation attack's;
        default threat: PGD-20 linf eps 0.1): see `evaluate_standard`. options: the
        standard protocol's settings (`STANDARD_OPTIONS`; e.g. fewer AutoAttack
        iterations for a smoke run), recorded in `extra["protocol_options"]`.
    seed: seeds torch's RNG for the run (attack seeds come from the threat: batch i uses
        threat.seed + i). sanity: True or a `sanity.SanityConfig` runs the checks of
        METHODS section 6 on a subset and adds them to the record (with warnings).
    Returns a `rqlab.record.Record`: model, policy, threat, n, passes, seed, clean/robust
    accuracy, worst-case accuracy and their 95% intervals, per-example outcomes, the
    sanity checks, `unreliable` reasons, and in `extra` the versions, device and wall time.
    distributed: under torchrun, shard the batches over the ranks (module docstring);
        every rank returns the same record, with extra["world_size"].
    resume: a progress file: written after each batch, read back by a rerun with the same
        weights, data and arguments, removed when the record is complete (module docstring).
    """
    if protocol is None:
        protocol = "standard" if threat is None else "quick"
    check_choice(protocol, "protocol", PROTOCOLS)
    if protocol == "standard":
        return evaluate_standard(model, data, threat, policy=policy, n=n, batch_size=batch_size, seed=seed,
                                 passes=passes, sanity=sanity, model_id=model_id, progress=progress,
                                 options=options, distributed=distributed, resume=resume)
    if options is not None:
        raise RqlabError('options are the standard protocol\'s settings: give them with protocol="standard" '
                         "(a quick run's attack settings go in threat.options)")
    from . import __version__, sanity as sanity_mod

    t0 = time.perf_counter()
    if threat is None:
        raise RqlabError('protocol="quick" needs a threat (the attack to run), e.g. ThreatModel("pgd", eps=0.1)')
    if not isinstance(threat, ThreatModel):
        raise RqlabError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    batch_size, seed, passes = (check_int(batch_size, "batch_size", 1), check_int(seed, "seed", 0),
                                check_int(passes, "passes", 1))
    x, y = as_tensors(data, n)
    policy = fresh_policy(policy if policy is not None else quant.current(model))
    device = next(model.parameters()).device
    group = _group(distributed)
    progress = progress and (group is None or group.is_main)
    attack = attacks.get(threat.attack)
    clean_hits = torch.zeros(len(x), dtype=torch.long)
    robust_hits = torch.zeros(len(x), dtype=torch.long)
    saved = _progress_file(resume, group, model, x, y, dict(
        protocol="quick", threat=threat.to_dict(), policy=policy.to_dict(), batch_size=batch_size, seed=seed,
        passes=passes, model_id=model_id, settings=attack_settings(device, policy)))
    state = {"clean": clean_hits, "robust": robust_hits}
    if saved is not None:
        saved.restore(state)
    bar = _progress(len(x), f"{threat.attack} {policy}", progress)
    # frozen_weights: the weights stay fixed for the whole evaluation, so each precision's
    # quantized weights are computed once, not in every forward of every batch's attack.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quant.using(model, policy), \
            eval_mode(model), quant.frozen_weights(model):
        torch.manual_seed(seed)
        try:
            for i in dist.batch_indices(-(-len(x) // batch_size), group):
                start = i * batch_size
                xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
                if saved is not None and i in saved.done:
                    bar.update(len(xb))
                    continue
                _restart_draws(policy, i)
                x_adv = attack(model, xb, yb, threat.replace(seed=threat.seed + i))
                # robust in a pass = x and x_adv both correct in it (x lies in the ball too)
                for _ in range(passes):
                    ok = correct_passes(model, xb, yb).cpu()
                    clean_hits[start:start + len(xb)] += ok
                    robust_hits[start:start + len(xb)] += ok * correct_passes(model, x_adv, yb).cpu()
                bar.update(len(xb))
                if saved is not None:
                    saved.save(i, state, time.perf_counter() - t0)
            if group is not None:
                clean_hits, robust_hits = group.all_sum(clean_hits), group.all_sum(robust_hits)
            checks = None
            if sanity and (group is None or group.is_main):
                torch.manual_seed(seed)  # the checks' draws: those of no batch, on any rank
                _restart_draws(policy, "sanity")
                cfg = sanity if isinstance(sanity, sanity_mod.SanityConfig) else sanity_mod.SanityConfig()
                k = min(cfg.n, len(x))
                checks = sanity_mod.run_checks(model, x[:k].to(device), y[:k].to(device), threat, passes,
                                               robust_hits[:k].float().mean().item() / passes, cfg)
            if sanity and group is not None:
                checks = group.broadcast_object(checks)
        finally:
            bar.close()

    per_example = {"clean": (clean_hits == passes).int().tolist(), "robust": (robust_hits == passes).int().tolist()}
    if passes > 1:
        per_example.update(clean_hits=clean_hits.tolist(), robust_hits=robust_hits.tolist())
    return Record(
        model=model_id or _model_name(model), policy=policy.to_dict(), threat=threat.to_dict(), n=len(x),
        passes=passes, seed=seed, **_accuracies("clean", clean_hits, passes),
        **_accuracies("robust", robust_hits, passes), per_example=per_example, sanity=checks,
        unreliable=_quick_reasons(policy, threat), extra={"model_config": model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None,
               "batch_size": batch_size, "rqlab_version": __version__, "torch_version": torch.__version__,
               "attack_settings": attack_settings(device, policy),  # arithmetic (fp32/bf16), active set
               "device": str(device), "device_name": device_name(device),
               **_finish(saved, t0), **_world(group)})


def _group(distributed: bool):
    """The process group to shard over (None: this process alone)."""
    if not distributed:
        return None
    return dist.init() if dist.under_torchrun() else dist.current()


PROGRESS_FORMAT = "rqlab-evaluation-progress"


class _BatchProgress:
    """An evaluation's per-batch progress in a file (`evaluate(..., resume=PATH)`).

    `state` maps names to the evaluation's accumulators (tensors, dicts, numbers); `save(i)`
    writes them and the batches done so far atomically, `restore()` loads them back when the
    file's key (a hash of the weights, the data and the arguments) is this evaluation's.
    """

    def __init__(self, path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: dict):
        self.path = checkpoint.check_output_file(path, "resume")
        h = hashlib.sha256(json.dumps(_jsonable(args), sort_keys=True, default=str).encode())
        for name, t in list(model.state_dict().items()) + [("x", x), ("y", y)]:
            h.update(name.encode())
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        self.key = h.hexdigest()
        self.done: list[int] = []
        self.elapsed = 0.0  # the earlier runs' time
        self.resumed = 0

    def restore(self, state: dict) -> dict:
        """Load a matching earlier run's accumulators into `state` (in place for tensors and
        dicts); returns `state` with its numbers replaced. No file: `state` unchanged."""
        if not self.path.exists():
            return state
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            ok = isinstance(saved, dict) and saved.get("format") == PROGRESS_FORMAT
        except Exception as e:  # truncated or foreign: say so, never mix it in
            raise RqlabError(f"resume file {self.path} could not be read ({type(e).__name__}): "
                             "delete it to start the evaluation afresh") from None
        if not ok:
            raise RqlabError(f"{self.path} is not an rqlab evaluation progress file: give another resume path")
        if saved["key"] != self.key:
            raise RqlabError(f"resume file {self.path} holds another evaluation (other weights, data or "
                             "arguments): delete it, or give this evaluation another path")
        self.done, self.elapsed = list(saved["done"]), float(saved["elapsed"])
        self.resumed = len(self.done)
        for k, v in saved["state"].items():
            if isinstance(state[k], torch.Tensor):
                state[k].copy_(v)
            elif isinstance(state[k], dict):
                state[k].clear()
                state[k].update(v)
            else:
                state[k] = v
        return state

    def save(self, i: int, state: dict, elapsed: float) -> None:
        self.done.append(i)
        payload = {"format": PROGRESS_FORMAT, "key": self.key, "done": list(self.done),
                   "elapsed": self.elapsed + elapsed, "state": state}
        checkpoint.atomic_write(self.path, lambda f: torch.save(payload, f))

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def _finish(saved, t0: float) -> dict:
    """The record's extras for a resumable run (wall time over every run; batches resumed),
    after removing its progress file; {"wall_time_s"} otherwise."""
    wall = time.perf_counter() - t0
    if saved is None:
        return {"wall_time_s": round(wall, 3)}
    saved.finish()
    extra = {"wall_time_s": round(saved.elapsed + wall, 3)}
    if saved.resumed:
        extra["resumed_batches"] = saved.resumed
    return extra


def _progress_file(resume, group, model, x, y, args: dict):
    if resume is None:
        return None
    if group is not None:
        raise RqlabError("resume is for an evaluation in one process: leave it out under torchrun "
                         "(or run without --nproc)")
    return _BatchProgress(resume, model, x, y, args)


def _world(group) -> dict:
    return {"world_size": group.world} if group is not None else {}


def _restart_draws(policy, key) -> None:
    """Batch `key` (or the sanity checks) of a random policy draws from its generator
    restarted at (seed, key): the same precisions whichever rank runs it, whatever ran before."""
    if isinstance(policy, quant.RandomPrecision):
        policy.set_state(random.Random(f"{policy.seed}/{key}").getstate())


# ---- the standard protocol (METHODS section 8) ------------------------------------------

# None = the reference value (AutoAttack: 100 iterations, 9 target classes, Square 5,000
# queries); fewer only for tests and smoke runs, and the record says so.
STANDARD_OPTIONS = {"n_iter": None, "n_target_classes": None, "n_queries": None, "eot": 10, "aa_batch_size": 500}
REFERENCE_OPTIONS = {"n_iter": 100, "n_target_classes": 9, "n_queries": 5000}
# "zero input gradients common": more than half of the examples have an exactly zero
# input gradient of the cross-entropy, so gradient attacks cannot move most of them.
# (Isolated zeros occur on confident natural models from float underflow; half is common.)
ZERO_GRAD_SHARE = 0.5
ADAPTIVE = ("eot_pgd", "expectation")
AA_WHITE_STAGES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")  # AutoAttack's gradient-based attacks


def standard_attacks(policy, threat: ThreatModel, options: dict | None = None) -> list[dict]:
    """The attacks the standard protocol runs at `policy`, at the threat's norm, eps, steps,
    step size, restarts and seed: [{"name", "threat", "kind" ("white-box" | "black-box"),
    "target" ("model" | "support ensemble")}], METHODS section 8.

    Fixed / PerLayer: AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) and PGD.
    RandomPrecision over S: AutoAttack standard on `SupportEnsemble(model, S)`, EOT-PGD
        (`options["eot"]` samples) and the expectation attack, scored under the policy.
    Binary (1 bit in the support): also Square alone and BPDA (when "bpda" is a
        registered attack: `attacks.names()`).
    """
    o = _standard_options(options)
    base = dict(norm=threat.norm, eps=threat.eps, seed=threat.seed)
    grad = dict(base, steps=threat.steps, step_size=threat.step_size, restarts=threat.restarts)
    aa_opts = {"version": "standard", "batch_size": o["aa_batch_size"],
               **{k: o[k] for k in REFERENCE_OPTIONS if o[k] is not None}}
    aa = ThreatModel("autoattack", options=aa_opts, **base)
    random = isinstance(policy, quant.RandomPrecision)
    plan = [{"name": "autoattack", "threat": aa, "kind": "white-box",
             "target": "support ensemble" if random else "model"}]
    if random:
        plan += [{"name": "eot_pgd", "threat": ThreatModel("eot_pgd", eot=o["eot"], **grad), "kind": "white-box"},
                 {"name": "expectation", "threat": ThreatModel("expectation", **grad), "kind": "white-box"}]
    else:
        plan.append({"name": "pgd", "threat": ThreatModel("pgd", **grad), "kind": "white-box"})
    if 1 in policy.support():
        queries = o["n_queries"] if o["n_queries"] is not None else REFERENCE_OPTIONS["n_queries"]
        plan.append({"name": "square", "threat": ThreatModel("square", options={"n_queries": queries}, **base),
                     "kind": "black-box"})
        if "bpda" in attacks.names():  # the BPDA attack, once registered (branch bpda)
            plan.append({"name": "bpda", "threat": ThreatModel("bpda", **grad), "kind": "white-box"})
    for a in plan:
        a.setdefault("target", "model")
    return plan


def evaluate_standard(model: nn.Module, data, threat: ThreatModel | None = None, policy=None,
                      n: int | None = None, batch_size: int = 256, seed: int = 0, passes: int = 1, sanity=False,
                      model_id: str | None = None, progress: bool = True, options: dict | None = None,
                      distributed: bool = False, resume=None) -> Record:
    """The standard protocol (METHODS section 8): every attack of `standard_attacks` on
    every example, each crafted x_adv scored under the policy itself.

    An example is robust in a forward pass when x and every attack's x_adv are classified
    correctly in it; robust_accuracy is the mean over the `passes` passes and
    robust_worst_accuracy counts the examples robust in every pass (worst case over the
    passes and the attacks). `attacks` holds one dict per attack: name, kind, target,
    threat, robust_accuracy (+ worst, 95% intervals), per-example outcomes (1 = robust in
    every pass; "hits" = passes robust when passes > 1), time_s, batch_seeds (batch i runs
    with threat.seed + i); AutoAttack's also says how many examples each of its attacks
    fooled first. extra["strongest"]: the attack with the lowest robust accuracy.
    `unreliable` (after RobustBench and AutoAttack's own flags): a black-box attack beats
    the white-box ones beyond the noise (`stats.diff_half_width`), or more than
    ZERO_GRAD_SHARE of the examples have a zero input gradient.
    Arguments as `evaluate`; threat default: PGD-20, linf, eps 0.1.
    """
    from . import __version__, sanity as sanity_mod
    from .attacks.autoattack import autoattack_stages
    from .models import SupportEnsemble

    t0 = time.perf_counter()
    threat = ThreatModel("pgd") if threat is None else threat
    if not isinstance(threat, ThreatModel):
        raise RqlabError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    batch_size, seed, passes = (check_int(batch_size, "batch_size", 1), check_int(seed, "seed", 0),
                                check_int(passes, "passes", 1))
    opts = _standard_options(options)
    x, y = as_tensors(data, n)
    policy = fresh_policy(policy if policy is not None else quant.current(model))
    plan = standard_attacks(policy, threat, opts)
    base_threat = ThreatModel("pgd", norm=threat.norm, eps=threat.eps, steps=threat.steps,
                              step_size=threat.step_size, restarts=threat.restarts, seed=threat.seed)
    device = next(model.parameters()).device
    group = _group(distributed)
    progress = progress and (group is None or group.is_main)
    N = len(x)
    clean_hits = torch.zeros(N, dtype=torch.long)
    robust_hits = torch.zeros(N, dtype=torch.long)   # robust against every attack, per pass
    white_hits = torch.zeros(N, dtype=torch.long)    # ... against every white-box attack (AutoAttack's too)
    hits = {a["name"]: torch.zeros(N, dtype=torch.long) for a in plan}
    times = dict.fromkeys(hits, 0.0)
    fooled_first = {}  # AutoAttack: examples each of its attacks fooled first (on its target)
    zero_grads = 0.0
    zero_cfg = sanity_mod.SanityConfig(zero_grad_share=ZERO_GRAD_SHARE)
    ensemble = SupportEnsemble(model, policy.support()) if isinstance(policy, quant.RandomPrecision) else None
    saved = _progress_file(resume, group, model, x, y, dict(
        protocol="standard", threat=threat.to_dict(), policy=policy.to_dict(), batch_size=batch_size, seed=seed,
        passes=passes, model_id=model_id, options=opts, settings=attack_settings(device, policy)))
    state = {"clean": clean_hits, "robust": robust_hits, "white": white_hits, "hits": hits, "times": times,
             "fooled_first": fooled_first, "zero_grads": zero_grads}
    if saved is not None:
        zero_grads = saved.restore(state)["zero_grads"]
    bar = _progress(N, f"standard {policy}", progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quant.using(model, policy), \
            eval_mode(model), quant.frozen_weights(model):
        torch.manual_seed(seed)
        try:
            for i in dist.batch_indices(-(-N // batch_size), group):
                start = i * batch_size
                sl = slice(start, start + batch_size)
                xb, yb = x[sl].to(device), y[sl].to(device)
                if saved is not None and i in saved.done:
                    bar.update(len(xb))
                    continue
                _restart_draws(policy, i)
                advs, white_advs = {}, []
                for a in plan:
                    t = a["threat"].replace(seed=a["threat"].seed + i)
                    t1 = time.perf_counter()
                    if a["name"] == "autoattack":
                        target = ensemble if ensemble is not None else model
                        with (ensemble.active() if ensemble is not None else contextlib.nullcontext()):
                            x_adv, stages = autoattack_stages(target, xb, yb, t)
                        x_white = xb.clone()  # AutoAttack's examples from its white-box attacks only
                        for name, fooled, secs in stages:
                            fooled_first.setdefault(name, [0, 0.0])
                            fooled_first[name][0] += int(fooled.sum())
                            fooled_first[name][1] += secs
                            if name in AA_WHITE_STAGES:
                                x_white[fooled] = x_adv[fooled]
                        white_advs.append(x_white)
                    else:
                        x_adv = attacks.get(a["name"])(model, xb, yb, t)
                        if a["kind"] == "white-box":
                            white_advs.append(x_adv)
                    times[a["name"]] += time.perf_counter() - t1
                    advs[a["name"]] = x_adv
                # scored under the policy itself: robust in a pass = x and every x_adv correct in it
                for _ in range(passes):
                    ok = correct_passes(model, xb, yb).cpu()
                    clean_hits[sl] += ok
                    all_ok, white_ok = ok.clone(), ok.clone()
                    for name, x_adv in advs.items():
                        ok_k = ok * correct_passes(model, x_adv, yb).cpu()
                        hits[name][sl] += ok_k
                        all_ok *= ok_k
                    for x_adv in white_advs:
                        white_ok *= correct_passes(model, x_adv, yb).cpu()
                    robust_hits[sl] += all_ok
                    white_hits[sl] += white_ok
                zero_grads += round(sanity_mod.zero_gradient(model, xb, yb, zero_cfg)["share"] * len(xb))  # a count
                del advs, white_advs
                bar.update(len(xb))
                if saved is not None:
                    saved.save(i, dict(state, zero_grads=zero_grads), time.perf_counter() - t0)
            if group is not None:  # every example was run by one rank: the sums are the outcomes
                clean_hits, robust_hits, white_hits = (group.all_sum(t) for t in (clean_hits, robust_hits, white_hits))
                hits = {k: group.all_sum(v) for k, v in hits.items()}
                parts = group.gather_objects((times, fooled_first, zero_grads))
                times = {k: sum(p[0][k] for p in parts) for k in times}
                fooled_first = {}
                for p in parts:
                    for k, (count, secs) in p[1].items():
                        fooled_first.setdefault(k, [0, 0.0])
                        fooled_first[k] = [fooled_first[k][0] + count, fooled_first[k][1] + secs]
                zero_grads = sum(p[2] for p in parts)
            checks = None
            if sanity and (group is None or group.is_main):
                torch.manual_seed(seed)  # the checks' draws: those of no batch, on any rank
                _restart_draws(policy, "sanity")
                cfg = sanity if isinstance(sanity, sanity_mod.SanityConfig) else sanity_mod.SanityConfig()
                k = min(cfg.n, N)
                checks = sanity_mod.run_checks(model, x[:k].to(device), y[:k].to(device), base_threat, passes,
                                               robust_hits[:k].float().mean().item() / passes, cfg)
            if sanity and group is not None:
                checks = group.broadcast_object(checks)
        finally:
            bar.close()

    n_batches = -(-N // batch_size)
    entries = []
    for a in plan:
        h = hits[a["name"]]
        e = {"name": a["name"], "kind": a["kind"], "target": a["target"], "threat": a["threat"].to_dict(),
             **_accuracies("robust", h, passes), "per_example": (h == passes).int().tolist(),
             "time_s": round(times[a["name"]], 3),
             "batch_seeds": [a["threat"].seed + i for i in range(n_batches)]}
        if passes > 1:
            e["hits"] = h.tolist()
        if a["name"] == "autoattack":
            e["stages"] = [{"attack": k, "fooled_first": v[0], "time_s": round(v[1], 3)}
                           for k, v in fooled_first.items()]
        entries.append(_jsonable(e))
    white_acc = white_hits.sum().item() / (passes * max(N, 1))
    reasons = _standard_reasons(entries, white_acc, _accuracies("robust", robust_hits, passes)["robust_accuracy"],
                                zero_grads / max(N, 1), N)
    per_example = {"clean": (clean_hits == passes).int().tolist(), "robust": (robust_hits == passes).int().tolist()}
    if passes > 1:
        per_example.update(clean_hits=clean_hits.tolist(), robust_hits=robust_hits.tolist())
    strongest = min(entries, key=lambda e: (e["robust_accuracy"], e["robust_worst_accuracy"]))["name"]
    return Record(
        model=model_id or _model_name(model), policy=policy.to_dict(), threat=base_threat.to_dict(), n=N,
        passes=passes, seed=seed, **_accuracies("clean", clean_hits, passes),
        **_accuracies("robust", robust_hits, passes), per_example=per_example, protocol="standard",
        attacks=tuple(entries), unreliable=tuple(reasons), sanity=checks,
        extra={"model_config": model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None,
               "batch_size": batch_size, "strongest": strongest,
               "protocol_options": _jsonable({**opts, **{k: opts[k] if opts[k] is not None else v
                                                         for k, v in REFERENCE_OPTIONS.items()}}),
               "white_box_robust_accuracy": white_acc, "zero_gradient_share": zero_grads / max(N, 1),
               "rqlab_version": __version__, "torch_version": torch.__version__,
               "attack_settings": attack_settings(device, policy),  # arithmetic (fp32/bf16), active set
               "device": str(device), "device_name": device_name(device),
               **_finish(saved, t0), **_world(group)})


def _standard_options(options: dict | None) -> dict:
    if options is None:
        return dict(STANDARD_OPTIONS)
    if not isinstance(options, dict):
        raise RqlabError(f"options={options!r} must be a dict of standard-protocol settings")
    unknown = sorted(set(options) - set(STANDARD_OPTIONS))
    if unknown:
        raise RqlabError(f"options {unknown} are unknown for the standard protocol: known: {sorted(STANDARD_OPTIONS)}")
    o = {**STANDARD_OPTIONS, **options}
    for k, v in o.items():
        if v is not None:
            o[k] = check_int(v, f'options["{k}"]', 1)
    if o["eot"] is None:
        raise RqlabError('options["eot"] must be a positive integer (EOT-PGD samples per step)')
    return o


# The reasons a record gives not to trust its robust figure, each with its page in docs/flags/.
FLAGS = {"black-box": "a black-box attack beats the white-box ones beyond the noise (gradient masking)",
         "zero-gradients": "most examples have an exactly zero input gradient",
         "random-forward": "a random forward pass attacked without averaging over its randomness"}


def flag(code: str, text: str) -> str:
    """An `unreliable` reason: 'CODE: TEXT (see docs/flags/CODE.md)'."""
    if code not in FLAGS:
        raise RqlabError(f"flag {code!r} is unknown: known: {', '.join(FLAGS)}")
    return f"{code}: {text} (see docs/flags/{code}.md)"


def _standard_reasons(entries: list[dict], white_acc: float, robust_acc: float, zero_share: float,
                      n: int) -> list[str]:
    """Why not to trust a standard-protocol record (RobustBench / AutoAttack flags)."""
    reasons = []
    white = [e for e in entries if e["kind"] == "white-box"]
    best_white = min(white, key=lambda e: e["robust_accuracy"]) if white else None
    for e in entries:
        if e["kind"] != "black-box" or best_white is None:
            continue
        gap = best_white["robust_accuracy"] - e["robust_accuracy"]
        noise = diff_half_width(best_white["robust_accuracy"], e["robust_accuracy"], n)
        if gap > noise:
            reasons.append(flag("black-box", f"{e['name']} leaves {100 * e['robust_accuracy']:.1f}%, below the best "
                                f"white-box attack ({best_white['name']}, {100 * best_white['robust_accuracy']:.1f}%) "
                                f"by {100 * gap:.1f} points, more than the noise ({100 * noise:.1f}): gradient masking"))
    gap = white_acc - robust_acc
    noise = diff_half_width(white_acc, robust_acc, n)
    if gap > noise:
        reasons.append(flag("black-box", f"Square fools {100 * gap:.1f}% of the examples that every white-box "
                            f"attack failed on ({100 * white_acc:.1f}% -> {100 * robust_acc:.1f}%), more than the "
                            f"noise ({100 * noise:.1f}): the gradients mislead the white-box attacks"))
    if zero_share > ZERO_GRAD_SHARE:
        reasons.append(flag("zero-gradients", f"{100 * zero_share:.0f}% of the examples have an exactly zero "
                            f"input gradient (limit {100 * ZERO_GRAD_SHARE:.0f}%): gradient attacks cannot move them"))
    return reasons


def _quick_reasons(policy, threat: ThreatModel) -> tuple:
    """A quick record of a random policy attacked without averaging over the randomness."""
    adaptive = (threat.attack in ADAPTIVE or threat.eot_samples > 1
                or (threat.attack == "autoattack" and threat.option("version") == "rand"))
    if isinstance(policy, quant.RandomPrecision) and not adaptive:
        return (flag("random-forward", f"the policy {policy} draws a precision per forward pass but "
                     f"{threat.attack} averages over none (no adaptive attack ran): use eot_pgd, expectation or "
                     "protocol='standard'"),)
    return ()


def _jsonable(value):
    """The value as it reads back from JSON (tuples -> lists), so records round-trip equal."""
    return json.loads(json.dumps(value))


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
    lines = [f"model {rec['model']}  precision {quant.policy_from_dict(rec['policy'])}  n={rec['n']}  passes={rec['passes']}"
             f"  protocol {rec.get('protocol', 'quick')}",
             f"threat {t['attack']} {t['norm']} eps={t['eps']:.4g} steps={t['steps']} step={t['step_size']:.4g} "
             f"restarts={t['restarts']} eot={t['eot']}",
             f"{'':10}{'accuracy':>10}{'95% CI':>16}{'worst-case':>12}"]
    for kind in ("clean", "robust"):
        lines.append(f"{kind:<10}{pct(rec[kind + '_accuracy']):>10}{ci(rec[kind + '_ci95']):>16}"
                     f"{pct(rec[kind + '_worst_accuracy']):>12}")
    for a in rec.attacks:
        lines.append(f"attack {a['name']:<12}{pct(a['robust_accuracy']):>10}{ci(a['robust_ci95']):>16}"
                     f"{pct(a['robust_worst_accuracy']):>12}  {a['time_s']:.1f}s")
    for r in rec.unreliable:
        lines.append(f"UNRELIABLE: {r}")
    failed = [c for c in rec.sanity or () if not c["passed"]]
    if failed:
        lines.append(f"SANITY: {len(failed)} of {len(rec.sanity)} checks FAILED "
                     f"({', '.join(c['check'] for c in failed)}): the robust accuracy above is not to be trusted")
    for c in rec.sanity or ():
        lines.append(f"sanity {c['check']:<22} {'ok' if c['passed'] else 'FAILED'}: {c['detail']}")
    lines.append(f"{rec['wall_time_s']:.1f}s on {rec.get('device_name') or rec['device']}")
    return "\n".join(lines)
