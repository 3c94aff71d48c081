"""Sweeps: accuracy against precision and against eps, error amplification and
Lipschitz estimates of several models, and Defensive Quantization's beta (METHODS
sections 2 and 3). Accuracy, amplification and Lipschitz results are JSON-serialisable.

    >>> rows = accuracy_vs_bits(model, (x, y), ThreatModel("pgd", eps=0.1, steps=20),
    ...                         bits=[1, 2, 4, 8, 32], act_only=True)      # w32a{b}
    >>> rows = accuracy_vs_eps(model, (x, y), threat, eps=[0.0, 0.05, 0.1, 0.2])
    >>> adv = craft_all(models, x, y, threat, craft_on="each")   # {name: x_adv}
    >>> amp = amplification(models, x, adv)                       # D_l per layer
    >>> table = lipschitz_table(models, x, adv)
    >>> sweep = beta_sweep([0.0, 1e-3, 1e-2], train_set, (x, y), threat, epochs=1)

Accuracies follow `rqlab.evaluation.evaluate`: robust = x and x_adv both correct, so robust
<= clean example by example; the attack is white-box at the precision evaluated (the
threat's own `policy` aside), one attack run per setting.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import quant
from ..attacks import ThreatModel
from ..evaluation import as_tensors, evaluate
from ..models.lipschitz import local_lipschitz, network_bound
from ..validate import FP_BITS, RqlabError, check_bits_set, check_choice, check_float, check_int
from .amplification import error_amplification
from .transfer import transfer_matrix


def precision(bits: int, act_only: bool = False) -> quant.Fixed:
    """Fixed(b) (weights and inputs at b), or with act_only Fixed(32, act_bits=b) (the
    DQ paper's "activation bits", weights FP). b = 32 is FP either way."""
    return quant.Fixed(FP_BITS, act_bits=bits) if act_only else quant.Fixed(bits)


def _row(rec: dict, **extra) -> dict:
    keys = ("clean_accuracy", "clean_ci95", "robust_accuracy", "robust_ci95", "robust_worst_accuracy", "n", "passes")
    return {**extra, **{k: rec[k] for k in keys}}


def accuracy_vs_bits(model: nn.Module, data, threat: ThreatModel, bits, act_only: bool = False,
                     n: int | None = None, batch_size: int = 256, seed: int = 0, progress: bool = False) -> list[dict]:
    """Clean and robust accuracy at each precision of `bits` (32 = FP), attacked there.

    act_only: vary only the activation bits (Fixed(32, act_bits=b)); else weights and
    inputs (Fixed(b)). The model needs activation ranges for every b in 2..16 used.
    Returns one row per b: bits, policy, clean/robust accuracy and 95% intervals, n, and
    robust_per_example (`Record.robust_scores`: two models' rows on the same data pair
    example by example, `readings.dq_comparison`).
    """
    bits = check_bits_set(bits, "bits")
    rows = []
    for b in bits:
        p = precision(b, act_only)
        rec = evaluate(model, data, threat, policy=p, n=n, batch_size=batch_size, seed=seed, progress=progress)
        rows.append(_row(rec, bits=b, policy=str(p), robust_per_example=rec.robust_scores()))
    return rows


def accuracy_vs_eps(model: nn.Module, data, threat: ThreatModel, eps, policy=None, n: int | None = None,
                    batch_size: int = 256, seed: int = 0, passes: int = 1, progress: bool = False) -> list[dict]:
    """Clean and robust accuracy at each radius of `eps` (the threat's other settings
    kept; its step size follows the default rule per eps unless it was given).

    policy: the defender's precision (default: the model's current one). Robust
    accuracy falls (weakly) as eps grows for a sound attack; eps = 0 gives the clean
    accuracy. One row per eps: eps, clean/robust accuracy and intervals, n.
    """
    if not isinstance(eps, (list, tuple)) or not eps:
        raise RqlabError(f"eps={eps!r} must be a non-empty list of radii")
    rows = []
    for e in eps:
        e = check_float(e, "eps", 0.0)
        if e == 0.0:  # no ball: the clean accuracy (a zero-radius attack is the identity)
            rec = evaluate(model, data, threat.replace(attack="fgsm", eps=0.0, steps=1), policy=policy, n=n,
                           batch_size=batch_size, seed=seed, passes=passes, progress=progress)
        else:
            rec = evaluate(model, data, threat.replace(eps=e), policy=policy, n=n, batch_size=batch_size,
                           seed=seed, passes=passes, progress=progress)
        rows.append(_row(rec, eps=e))
    return rows


def transfer_in_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits, threat: ThreatModel,
                        eot_policy=None, passes: int = 5, eot_samples: int | None = None,
                        batch_size: int = 500) -> dict:
    """`transfer_matrix` with attack and inference precisions both `bits`, run on batches
    of `batch_size` examples (batch i seeded threat.seed + i) and merged: each cell is the
    mean over all examples, as one call on the whole set would give, without holding
    every adversarial set of the whole test set in memory at once. Adds "n"."""
    check_int(batch_size, "batch_size", 1)
    if len(x) == 0:
        raise RqlabError("x is empty: give at least one example")
    merged, total = None, 0
    for i, start in enumerate(range(0, len(x), batch_size)):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        tm = transfer_matrix(model, xb, yb, bits, bits, threat.replace(seed=threat.seed + i), eot_policy=eot_policy,
                             passes=passes, eot_samples=eot_samples)
        k = len(xb)
        if merged is None:
            merged = {**tm, "matrix": [[v * k for v in row] for row in tm["matrix"]],
                      "clean_accuracy": [v * k for v in tm["clean_accuracy"]]}
        else:
            merged["matrix"] = [[a + v * k for a, v in zip(ra, rv)] for ra, rv in zip(merged["matrix"], tm["matrix"])]
            merged["clean_accuracy"] = [a + v * k for a, v in zip(merged["clean_accuracy"], tm["clean_accuracy"])]
        total += k
    merged["matrix"] = [[v / total for v in row] for row in merged["matrix"]]
    merged["clean_accuracy"] = [v / total for v in merged["clean_accuracy"]]
    merged["threat"], merged["n"] = threat.to_dict(), total
    return merged


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, batch_size: int = 256,
          seed: int = 0) -> torch.Tensor:
    """Adversarial examples of `threat` on `model` as configured, in batches (seeded as
    `evaluate` seeds them: batch i uses threat.seed + i). (N, C, H, W) in [0, 1]."""
    from .. import attacks

    attack = attacks.get(threat.attack)
    out = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i, start in enumerate(range(0, len(x), batch_size)):
            out.append(attack(model, x[start:start + batch_size], y[start:start + batch_size],
                              threat.replace(seed=threat.seed + i)))
    return torch.cat(out)


def craft_all(models: dict, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, craft_on: str = "each",
              batch_size: int = 256) -> dict:
    """Adversarial examples for each model: crafted by `threat` on each model at its own
    precision (craft_on="each", white-box), or on models[craft_on] for all of them (the
    same inputs everywhere, so per-model differences come from the networks alone).
    models: {name: model}. Returns {name: x_adv (N, C, H, W)}."""
    if not isinstance(models, dict) or not models:
        raise RqlabError("models must be a non-empty dict {name: model}")
    check_choice(craft_on, "craft_on", ["each", *models])
    if craft_on != "each":
        shared = craft(models[craft_on], x, y, threat, batch_size)
        return {name: shared for name in models}
    return {name: craft(model, x, y, threat, batch_size) for name, model in models.items()}


def amplification(models: dict, x: torch.Tensor, x_adv: dict) -> dict:
    """Error amplification D_l per layer (`error_amplification`) of each model at its
    current (fixed) precision, with its own adversarial inputs x_adv[name] (`craft_all`).
    Returns {name: {"layers", "amplification"}}."""
    return {name: error_amplification({name: model}, x, x_adv[name])[name] for name, model in models.items()}


def lipschitz_table(models: dict, x: torch.Tensor, x_adv: dict, iters: int = 100) -> dict:
    """Per-layer Lipschitz estimates of each model: the operator spectral norm of every
    conv/linear layer, batch-norm and normalisation scales (`network_bound`, float
    weights), their product bound, and the empirical local ratio
    ||f(x_adv) - f(x)|| / ||x_adv - x|| at adversarial x_adv[name] (mean and max over
    the examples). Returns {name: {"layers": [...], "bound", "local_mean", "local_max"}}.
    """
    check_int(iters, "iters", 1)
    out = {}
    for name, model in models.items():
        nb = network_bound(model, iters=iters)
        ratios = local_lipschitz(model, x, x_adv[name])
        out[name] = {"layers": nb["layers"], "bound": nb["bound"], "local_mean": ratios.mean().item(),
                     "local_max": ratios.max().item()}
    return out


def beta_sweep(betas, train_set, test_data, threat: ThreatModel, policy=None, epochs: int = 1,
               n_train: int | None = None, batch_size: int = 128, lr: float = 0.1, seed: int = 0,
               device: str = "cpu", progress: bool = False, iters: int = 100) -> tuple[list[dict], dict]:
    """Train one SmallCNN per beta with Defensive Quantization's regulariser (natural
    cross-entropy + beta/2 sum ||W W^T - I||_F^2; beta = 0 is vanilla training) through
    `rqlab.train` (a RunSpec per beta, defense "dq"): the same subset, seed, initial weights
    and data order for every beta; then measure each.

    train_set: a `data.Dataset` (its first `n_train` examples are used). test_data:
    (x, y) or a Dataset of the same dataset, for clean and robust accuracy under `threat`
    (and the per-epoch clean accuracy). policy: the training and evaluation precision
    (default w32a4, the paper's vanilla quantized setting). Returns (rows, models): one row
    per beta with beta, orthogonality (the penalty sum after training), bound (network
    Lipschitz bound), clean and robust accuracy, train_loss, time_s (training only); models
    {beta: trained model} at `policy`, eval mode.
    """
    from .. import data as data_mod
    from ..experiment import RunSpec, TrainConfig, train

    if not isinstance(betas, (list, tuple)) or not betas:
        raise RqlabError(f"betas={betas!r} must be a non-empty list of numbers >= 0")
    betas = [check_float(b, "beta", 0.0) for b in betas]
    policy = policy if policy is not None else quant.Fixed(FP_BITS, act_bits=4)
    if n_train is not None:
        n_train = check_int(n_train, "n_train", 1, len(train_set))
        train_set = data_mod.Dataset(train_set.name, train_set.split, train_set.x[:n_train], train_set.y[:n_train],
                                     train_set.mean, train_set.std, train_set.classes)
    test_set = _as_dataset(test_data, train_set)
    x, y = as_tensors(test_set)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    rows, trained = [], {}
    for beta in betas:
        spec = RunSpec(model="smallcnn", data=train_set.name, policy=policy, defense="dq",
                       defense_config={"beta": beta}, train=cfg)
        model, history = train(spec, None, train_set=train_set, test_set=test_set, progress=progress, log=None)
        rows.append(beta_row(beta, model, (x, y), threat, policy, iters=iters, train_loss=history[-1]["train_loss"],
                             time_s=history[-1]["cumulative_time_s"]))
        trained[beta] = model
    return rows, trained


def beta_row(beta: float, model, test_data, threat: ThreatModel, policy, iters: int = 100,
             train_loss: float | None = None, time_s: float | None = None) -> dict:
    """One row of `beta_sweep` for a model trained with DQ's `beta` (0: vanilla): the
    orthogonality penalty, the network Lipschitz bound, clean and robust accuracy under
    `threat` at `policy` on test_data ((x, y) float in [0, 1]). train_loss and time_s:
    from its training, where known (None for a model trained elsewhere, e.g. the zoo's)."""
    from ..defenses import orthogonality_penalty

    x, y = test_data
    dev = next(model.parameters()).device
    rec = evaluate(model, (x.to(dev), y.to(dev)), threat, policy=policy, progress=False)
    return {"beta": beta, "orthogonality": float(orthogonality_penalty(model).detach()),
            "bound": network_bound(model, iters=iters)["bound"],
            "clean_accuracy": rec["clean_accuracy"], "robust_accuracy": rec["robust_accuracy"],
            "robust_ci95": rec["robust_ci95"], "n": rec["n"], "train_loss": train_loss, "time_s": time_s}


def _as_dataset(test_data, like):
    """A Dataset of `like`'s dataset from a Dataset or (x float in [0, 1], y)."""
    from .. import data as data_mod

    if isinstance(test_data, data_mod.Dataset):
        return test_data
    x, y = as_tensors(test_data)
    x8 = (x.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8)  # the loaded images are k / 255 exactly
    return data_mod.Dataset(like.name, "test", x8, y.detach().cpu(), like.mean, like.std, like.classes)


__all__ = ["precision", "accuracy_vs_bits", "accuracy_vs_eps", "transfer_in_batches", "craft", "craft_all",
           "amplification", "lipschitz_table", "beta_sweep", "beta_row"]
