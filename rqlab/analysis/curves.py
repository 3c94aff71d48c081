"""Training curves: clean accuracy, robust accuracy and wall time per epoch, from zoo
histories or from short live runs (ODG-Q against natural training, FGSM-RS and PGD-7 AT
at one precision; METHODS section 5).

    >>> curves = zoo_curves(4)                                  # the zoo's four 4-bit recipes
    >>> curves, models = train_curves(METHODS, 4, train_set, (x, y), threat, epochs=2)
    >>> epoch_time_ratio(curves)                                # {"pgd-at": ~8, "odgq": ~1, ...}

A curve is {"epoch": [1, 2, ...], "clean_acc": [...], "robust_acc": [...],
"epoch_time_s": [...], "cumulative_time_s": [...], "source": str, "attack": str}, one
point per epoch, accuracies as fractions. Epoch times count training only (evaluation
and saving excluded, as `train.fit` measures them).
"""
from __future__ import annotations

from ..validate import FP_BITS, RqlabError, check_bits, check_int

METHOD_LABELS = {"natural": "natural", "fgsm-rs": "FGSM-RS", "pgd-at": "PGD-7 AT", "odgq": "ODG-Q"}
METHODS = tuple(METHOD_LABELS)
# The zoo's recipes with a per-epoch PGD-20 history, by training precision and method.
ZOO_CURVES = {4: {"natural": "fmnist-q4-natural", "fgsm-rs": "fmnist-q4-fgsm-rs", "pgd-at": "fmnist-q4-pgd7",
                  "odgq": "fmnist-odgq-q4"}}
KEYS = ("epoch", "clean_acc", "robust_acc", "epoch_time_s", "cumulative_time_s")


def check_methods(methods, field: str = "methods") -> list[str]:
    """A non-empty, duplicate-free list out of METHODS."""
    from ..studies.params import check_choices

    return check_choices(methods, field, METHODS)


def curve_from_history(history: list[dict], robust_key: str = "robust_accuracy", clean_key: str = "clean_accuracy",
                       source: str = "", attack: str = "PGD-20") -> dict:
    """A curve from `train.fit` history rows (the zoo's cards hold them)."""
    if not isinstance(history, list) or not history:
        raise RqlabError(f"history of {source or 'the run'} is empty: no epoch was recorded")
    missing = [k for k in (clean_key, robust_key, "epoch_time_s", "cumulative_time_s") if k not in history[0]]
    if missing:
        raise RqlabError(f"history of {source or 'the run'} has no {missing} (train with --eval-pgd N for "
                         f"per-epoch robust accuracy)")
    return {"epoch": [int(r["epoch"]) for r in history], "clean_acc": [r[clean_key] for r in history],
            "robust_acc": [r[robust_key] for r in history], "epoch_time_s": [r["epoch_time_s"] for r in history],
            "cumulative_time_s": [r["cumulative_time_s"] for r in history], "source": source, "attack": attack}


def history_of(spec: str) -> list[dict]:
    """The per-epoch history of a zoo model (its card) or of a checkpoint file."""
    from .. import checkpoint, zoo
    from ..studies.params import check_model_spec, is_checkpoint_path

    spec = check_model_spec(spec)
    if is_checkpoint_path(spec):
        return list(checkpoint.load(spec).get("history") or [])
    return list(zoo.card(spec)["history"])


def zoo_curves(bits: int, methods=METHODS) -> dict[str, dict]:
    """{method: curve} from the zoo's histories at `bits` (ZOO_CURVES). The zoo measures
    PGD-20 accuracy on 200 test examples per epoch and clean accuracy on the test set."""
    bits = check_bits(bits)
    methods = check_methods(methods)
    if bits not in ZOO_CURVES:
        raise RqlabError(f"the zoo has training curves of all four methods at {sorted(ZOO_CURVES)} bits only, "
                         f"not at bits={bits}: train them live (live=True, train_curves)")
    out = {}
    for m in methods:
        name = ZOO_CURVES[bits][m]
        out[m] = curve_from_history(history_of(name), source=f"zoo {name}", attack="PGD-20 (zoo card)")
    return out


def train_curves(methods, bits: int, train_set, test_data, threat, epochs: int = 2, batch_size: int = 128,
                 lr: float = 0.1, seed: int = 0, device: str = "cpu", progress: bool = False,
                 calibrate_bits=tuple(range(2, 9)), log=None) -> tuple[dict, dict]:
    """Train a SmallCNN per method at Fixed(bits) on `train_set` (same seed, initial
    weights and data order) and record its curve: clean accuracy and robust accuracy
    under `threat` on `test_data` (the same examples, so robust <= clean) after every epoch.

    methods: out of METHODS (defenses "natural", "fgsm-rs", "pgd-at" (PGD-7, step eps / 4,
    `defenses.pgd_train_step`), "odgq"), with the threat's eps. calibrate_bits: precisions
    whose activation ranges are set after training (post-training quantization, for
    evaluating the models elsewhere), besides the trained one.
    Returns (curves {method: curve}, models {method: model in eval mode at Fixed(bits)}).
    """
    import torch.nn.functional as F

    from .. import data as data_mod
    from .. import defenses, models as models_mod, quant
    from ..evaluation import as_tensors, evaluate
    from ..training import TrainConfig, fit, resolve_device, seed_everything

    methods = check_methods(methods)
    bits = check_bits(bits)
    check_int(epochs, "epochs", 1)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    dev = resolve_device(cfg.device)
    x, y = (t.to(dev) for t in as_tensors(test_data))
    test_loader = [(x[i:i + 500], y[i:i + 500]) for i in range(0, len(x), 500)]
    policy = quant.Fixed(bits)
    metric = {"robust_acc": lambda m: evaluate(m, (x, y), threat, progress=False)["robust_accuracy"]}

    def fresh():
        seed_everything(seed)  # the same initial weights for every method
        model = models_mod.create("smallcnn", input_shape=tuple(train_set.input_shape), mean=train_set.mean,
                                  std=train_set.std, num_classes=train_set.num_classes).to(dev)
        return quant.apply(model, policy)

    # One untimed training step first, so that the first method timed does not pay the
    # process's one-time costs (allocator warm-up, kernel selection).
    xw, yw = next(iter(data_mod.Loader(train_set, batch_size, device=dev)))
    F.cross_entropy(fresh().train()(xw), yw).backward()
    curves, trained = {}, {}
    for method in methods:
        model = fresh()
        hooks = defenses.build(method, seed=seed, **({"eps": threat.eps} if "eps" in defenses.get(method).params else {}))
        loader = data_mod.Loader(train_set, batch_size, shuffle=True, seed=seed, device=dev)
        history = fit(model, loader, cfg, hooks=hooks, test_loader=test_loader, progress=progress,
                      log=log, epoch_metrics=metric)
        model.eval()
        extra = sorted(set(calibrate_bits or ()) - {bits, 1, FP_BITS})
        if extra:
            n_cal = min(len(train_set), 1024)
            batches = [train_set.x[i:i + 256].float().div(255).to(dev) for i in range(0, n_cal, 256)]
            quant.calibrate(model, batches, extra)
        curves[method] = curve_from_history(history, robust_key="robust_acc", source=f"live, {len(train_set)} "
                                            f"training examples", attack=f"{threat.attack.upper()}-{threat.steps}")
        trained[method] = model
    return curves, trained


def epoch_time_ratio(curves: dict, reference: str = "natural") -> dict[str, float]:
    """Mean epoch time of each method over that of `reference` (1.0 for itself)."""
    if reference not in curves:
        raise RqlabError(f"reference={reference!r} has no curve: curves are {list(curves)}")
    mean = {m: sum(c["epoch_time_s"]) / len(c["epoch_time_s"]) for m, c in curves.items()}
    if mean[reference] <= 0:
        raise RqlabError(f"reference {reference!r} has zero epoch time")
    return {m: t / mean[reference] for m, t in mean.items()}


__all__ = ["METHODS", "METHOD_LABELS", "ZOO_CURVES", "KEYS", "check_methods", "curve_from_history", "history_of",
           "zoo_curves", "train_curves", "epoch_time_ratio"]
