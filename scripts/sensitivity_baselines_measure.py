"""Cost and allocations of the bit-selection baselines (issue 14, docs/methods.md):
the Lipschitz, Hessian-trace (HAWQ-v2) and margin tables of a zoo model, their time,
and the bits each chooses at a few average-bit budgets. No attack on the allocations
(compare_allocations does that; notebook 03 with methods += ["hessian", "margin"]).

    PYTHONPATH=$PWD python scripts/sensitivity_baselines_measure.py [MODEL] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from rqlab import bitselect as BS
from rqlab import data, quant, zoo
from rqlab.attacks import ThreatModel
from rqlab.machine import cpu_model

BITS = (2, 3, 4, 5, 6, 8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="fmnist-fp-pgd7-small")
    ap.add_argument("--n", type=int, default=256, help="training images of the hessian and margin tables")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = zoo.load(args.model)
    ds = data.load("fashion-mnist", "train", n=args.n, seed=0)
    train = (ds.x.float() / 255, ds.y)
    quant.calibrate(model, [train[0][:256]], bits=BITS)
    print(f"{args.model}, {cpu_model()}, {args.threads} thread(s), n={args.n}, bits {BITS}")
    t = time.perf_counter()
    lip = BS.sensitivities(model, BITS, iters=300)
    print(f"lipschitz: {time.perf_counter() - t:.1f} s (iters 300)")
    t = time.perf_counter()
    hes = BS.hessian_sensitivities(model, train, BITS, n_probes=args.probes, seed=0)
    print(f"hessian:   {time.perf_counter() - t:.1f} s ({args.probes} probes)")
    for name, d in hes.details.items():
        print(f"  {name:<8} Tr(H) {d['trace']:.4g} +- {d['trace_se']:.2g} (SE), Tr/n {d['trace_per_weight']:.3g}, "
              f"n {d['weights']}")
    t = time.perf_counter()
    mar = BS.margin_sensitivities(model, train, ThreatModel("pgd", eps=0.1, steps=20), BITS)
    print(f"margin:    {time.perf_counter() - t:.1f} s (PGD-20, eps 0.1, against FP)")
    fp = next(iter(mar.details.values()))["fp"]
    print(f"  FP accuracy at x_adv {fp['accuracy']:.3f}, mean margin {fp['mean_margin']:.3f}")
    for name in mar.table:
        print(f"  {name:<8} M(b) " + " ".join(f"{b}:{v:.3g}" for b, v in mar.table[name].items()))
        print(f"  {'':<8} signed " + " ".join(f"{b}:{v:.3g}" for b, v in mar.details[name]["mean_drop"].items()))
    negative = sum(v < 0 for d in mar.details.values() for v in d["mean_drop"].values())
    print(f"  signed mean drop negative in {negative} of {len(mar.table) * len(BITS)} (layer, b) cells")
    for budget in (3.0, 4.0, 5.0):
        line = []
        for method, sens in (("lipschitz", lip), ("hessian", hes), ("margin", mar)):
            a = BS.select_bits(model, budget, BITS, method=method, sensitivity=sens)
            line.append(f"{method} {','.join(str(b) for b in a.bits.values())}")
        print(f"budget {budget:g}: " + " | ".join(line) + f"   (layers {', '.join(lip.layers)})")


if __name__ == "__main__":
    main()
