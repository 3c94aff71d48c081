"""Training cost under control: each method's epoch time over a reference method's,
measured in one run, on the same images, from the same initial weights, interleaved.

    >>> specs = {m: RunSpec(policy="4", defense=m, eps=0.1) for m in ("natural", "odgq")}
    >>> cost = training_cost(specs, data.load("fashion-mnist", "train", n=512))
    >>> cost["ratio"]["odgq"], cost["ratio_range"]["odgq"]      # median, [min, max] over reps

Why not the epoch times of the runs themselves (a zoo card's history, notebook 04's
curves): runs trained at different times share the machine with different loads (two
training workers on two cores, a measuring loop), so their ratio measures the load as
much as the method. Here each repetition trains every method for `epochs` epochs (the
last one timed by `training.fit`'s training-only timer: no evaluation, no checkpoint), in
an order shuffled per repetition, so that a change of load during the run falls on every
method alike; a ratio is taken within each repetition, and the figure is their median,
with their range beside it. benchmarks/training_cost.py prints the same measurement.
"""
from __future__ import annotations

import random
import statistics

from ..validate import RqlabError, check_int


def training_cost(specs: dict, train_set, reps: int = 3, epochs: int = 1, reference: str | None = "natural",
                  seed: int = 0, log=None) -> dict:
    """Time each `specs[label]` (an `experiment.RunSpec`: model, precision, defense and its
    settings, TrainConfig's batch size, device and memory format; its epochs are replaced
    by `epochs`) on `train_set` (a `data.Dataset` of the specs' data), `reps` times.

    Returns {"times": {label: [s per rep]}, "median_s", "ratio" ({label: median over reps of
    its time / the reference's in the same rep}; None without a reference), "ratio_range"
    ({label: [min, max]}), "reference", "n", "batch_size", "epochs", "reps", "threads"}.
    One untimed training step comes first, so that the first method timed does not pay the
    process's one-time costs.
    """
    import torch
    import torch.nn.functional as F

    from .. import data
    from ..experiment import RunSpec, build_hooks, build_model
    from ..training import fit, resolve_device

    if not isinstance(specs, dict) or not specs:
        raise RqlabError(f"specs must be a non-empty {{label: RunSpec}} dict, got {specs!r}")
    for label, spec in specs.items():
        if not isinstance(spec, RunSpec):
            raise RqlabError(f"specs[{label!r}] must be a RunSpec, got {type(spec).__name__}")
        if spec.data != train_set.name:
            raise RqlabError(f"specs[{label!r}] trains on {spec.data!r} but train_set is {train_set.name!r}")
    if reference is not None and reference not in specs:
        raise RqlabError(f"reference={reference!r} is not among the specs: {', '.join(specs)}")
    check_int(reps, "reps", 1)
    check_int(epochs, "epochs", 1)
    specs = {k: s.replace(train={"epochs": epochs}) for k, s in specs.items()}
    batch = {s.train.batch_size for s in specs.values()}

    def loader(spec):
        return data.Loader(train_set, spec.train.batch_size, shuffle=True, seed=seed,
                           device=resolve_device(spec.train.device))

    warm_up(next(iter(specs.values())), train_set)
    times: dict[str, list[float]] = {k: [] for k in specs}
    order, rng = list(specs), random.Random(seed)
    for r in range(reps):
        rng.shuffle(order)  # no method always first, or always after the same one
        for label in order:
            spec = specs[label]
            model = build_model(spec, train_set)
            history = fit(model, loader(spec), spec.train, hooks=build_hooks(spec), progress=False, log=None)
            times[label].append(history[-1]["epoch_time_s"])
        if log:
            log(f"  cost rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    out = {"times": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
           "ratio": None, "ratio_range": None, "reference": reference, "n": len(train_set),
           "batch_size": batch.pop() if len(batch) == 1 else sorted(batch), "epochs": epochs, "reps": reps,
           "threads": torch.get_num_threads()}
    if reference is not None:
        per_rep = {k: [t / b for t, b in zip(v, times[reference])] for k, v in times.items()}
        out["ratio"] = {k: statistics.median(v) for k, v in per_rep.items()}
        out["ratio_range"] = {k: [min(v), max(v)] for k, v in per_rep.items()}
    return out


def warm_up(spec, train_set) -> None:
    """One untimed training step of `spec` (an `experiment.RunSpec`) on a batch of
    `train_set`, so that the first method timed after it does not pay the process's one-time
    costs (allocator warm-up, kernel selection)."""
    import torch.nn.functional as F

    from .. import data
    from ..experiment import build_model
    from ..training import resolve_device

    dev = resolve_device(spec.train.device)
    x, y = next(iter(data.Loader(train_set, spec.train.batch_size, device=dev)))
    F.cross_entropy(build_model(spec, train_set).to(dev).train()(x), y).backward()


def describe(cost: dict) -> str:
    """'measured in one run: 512 training images, batch 128, epoch 2 of 2 timed, median of 3
    interleaved repetitions, 1 thread'."""
    threads = cost["threads"]
    return (f"measured in one run: {cost['n']} training images, batch {cost['batch_size']}, epoch {cost['epochs']} "
            f"of {cost['epochs']} timed, median of {cost['reps']} interleaved repetition"
            f"{'s' if cost['reps'] != 1 else ''}, {threads} thread{'s' if threads != 1 else ''}")


__all__ = ["training_cost", "warm_up", "describe"]
