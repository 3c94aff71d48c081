"""Training cost per epoch of each defense, over natural training at the same precision.

    .venv/bin/python benchmarks/training_cost.py

Every defense trains a 4-bit SmallCNN (quant.Fixed(4); RPT: random 4..8 with switchable
BN) through rqlab.training.fit with rqlab.defenses.build, on the same fixed subset of
Fashion-MNIST training images (1,024 examples, batch 128, eps 0.1; noise images if the
data is missing). Each repetition trains every defense, in turn (an order shuffled for
each repetition), for 2 epochs from the same initial weights; the figure is the second
epoch's `epoch_time_s` (fit's own training-only timer: no evaluation, no checkpoint),
median over repetitions.
Defenses: natural, fgsm-rs, pgd-at (PGD-7), rpt-pgd-at (bits 4..8), odgq.
Target: ODG-Q <= 1.3x natural training (PGD-7 AT about 8x, for comparison).
"""
from __future__ import annotations

import random
import statistics
import sys

import torch

import _common as C
from rqlab import data, defenses, models, quant
from rqlab.training import TrainConfig, fit

DEFENSES = ("natural", "fgsm-rs", "pgd-at", "rpt-pgd-at", "odgq")
RPT_BITS = (4, 5, 6, 7, 8)


def loader(n: int, batch: int):
    try:
        ds = data.load("fashion-mnist", "train", n=n, seed=0)
        return data.Loader(ds, batch, shuffle=True, seed=0), "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - no data: noise images cost the same to train on
        g = torch.Generator().manual_seed(0)
        ds = data.Dataset(name="noise", split="train", x=torch.randint(0, 256, (n, 1, 28, 28), generator=g,
                                                                       dtype=torch.uint8),
                          y=torch.randint(0, 10, (n,), generator=g), mean=C.FMNIST["mean"],
                          std=C.FMNIST["std"], classes=tuple(str(i) for i in range(10)))
        return data.Loader(ds, batch, shuffle=True, seed=0), "noise"


def run(name: str, train, batch: int, epochs: int) -> float:
    rpt = defenses.needs_bits_set(name)
    torch.manual_seed(0)
    model = models.create("smallcnn", **C.FMNIST, sbn_bits=RPT_BITS if rpt else None)
    quant.apply(model, quant.RandomPrecision(RPT_BITS) if rpt else quant.Fixed(4))
    hooks = defenses.build(name, eps=0.1, steps=7, step_size=0.025, bits=RPT_BITS if rpt else None)
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=0.05, device="cpu")
    history = fit(model, train, cfg, hooks=hooks, progress=False, log=None)
    return history[-1]["epoch_time_s"]


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024, help="training examples")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    p.add_argument("--defenses", default=",".join(DEFENSES))
    args = p.parse_args(argv)
    C.setup(args)
    info = C.machine()
    C.print_machine(info)
    reps = args.reps or 3
    train, source = loader(args.n, args.batch)
    names = args.defenses.split(",")
    print(f"\nsmallcnn, 4 bits (rpt: random 4..8), {args.n} {source} examples, batch {args.batch}, "
          f"epoch {args.epochs} of {args.epochs} timed, {reps} reps", flush=True)
    times: dict[str, list[float]] = {k: [] for k in names}
    order, rng = list(names), random.Random(0)
    for r in range(reps):
        rng.shuffle(order)  # as _common.interleaved: no defense always in the same position
        for name in order:
            times[name].append(run(name, train, args.batch, args.epochs))
        if not args.quiet:
            print(f"  rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get("natural")
    print(f"{'defense':<12}{'epoch s':>9}{'x natural':>11}   spread")
    for k in names:
        print(f"{k:<12}{med[k]:>9.2f}{med[k] / base if base else float('nan'):>11.2f}   {C.spread(times[k])}")
    if base and "odgq" in med:
        r = med["odgq"] / base
        print(f"odgq / natural = {r:.2f}   (target <= 1.3: {C.verdict(r <= 1.3)})")
    C.write_json(args.json, {"benchmark": "training_cost", "machine": info, "n": args.n, "batch": args.batch,
                             "epochs": args.epochs, "reps": reps, "data": source,
                             "times": times, "median_s": med,
                             "x_natural": {k: v / base for k, v in med.items()} if base else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
