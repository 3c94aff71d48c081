"""Transfer matrix and EOT: what crafting once per precision, and the weight cache, save.

    .venv/bin/python benchmarks/transfer_eot.py

1. rqlab.analysis.transfer_matrix for 6 x 6 precisions (attack and inference bits 3..8,
   PGD-20) against the naive loop of 36 attacks: for every pair (a, b), craft at a, then
   score at b (clean and robust accuracy), as a script without transfer_matrix would.
   Both give the same 36 accuracies (tests/test_fast_paths.py); target: >= 4x faster.
2. EOT-PGD's cost per gradient sample: eot_pgd time / (steps x K) against one
   forward+backward for the input gradient (parameters frozen, weights quantized once),
   under RandomPrecision(3..8); with the weight cache on (rqlab) and off.
SmallCNN 1x28x28, 4..8 and 3 bits calibrated, batch 128 (CPU-sized; the ratios do not
depend much on the batch).
"""
from __future__ import annotations

import sys

import torch

import _common as C
from rqlab import quant
from rqlab.analysis.transfer import transfer_matrix
from rqlab.attacks.base import paired_accuracy
from rqlab.attacks import ThreatModel, eot_pgd, pgd
from rqlab.attacks.base import input_grad
from rqlab.models.state import eval_mode, prepared

BITS = [3, 4, 5, 6, 7, 8]


def naive(model, x, y, threat):
    """36 attacks: craft at a, evaluate at b, for every pair."""
    out = []
    for a in BITS:
        row = []
        for b in BITS:
            x_adv = pgd(model, x, y, threat.replace(policy=quant.Fixed(a)))
            with quant.using(model, quant.Fixed(b)), eval_mode(model):
                row.append(paired_accuracy(model, x, y, x_adv))
        out.append(row)
    return out


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="PGD steps of the transfer matrix")
    p.add_argument("--eot-steps", type=int, default=10)
    p.add_argument("--eot-samples", type=int, default=10)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: transfer, eot")
    args = p.parse_args(argv)
    C.setup(args)
    info = C.machine()
    C.print_machine(info)
    skip = set(filter(None, args.skip.split(",")))
    x, y = C.images((1, 28, 28), args.batch)
    model = C.build("smallcnn", bits=BITS, calib=x)
    out = {"benchmark": "transfer_eot", "machine": info}

    if "transfer" not in skip:
        reps = args.reps or 3
        threat = ThreatModel("pgd", eps=0.1, steps=args.steps)
        print(f"\ntransfer matrix 6x6 (bits 3..8), smallcnn batch {args.batch}, PGD-{args.steps}, {reps} reps",
              flush=True)
        fns = {"transfer_matrix": lambda: transfer_matrix(model, x, y, BITS, BITS, threat),
               "naive-36": lambda: naive(model, x, y, threat)}
        t = C.interleaved(fns, reps, warmup=0, progress=not args.quiet)
        speedup = t["naive-36"]["median"] / t["transfer_matrix"]["median"]
        for k, v in t.items():
            print(f"{k:<16}{v['median']:>9.2f} s  spread {C.spread(v['times'])}")
        print(f"naive / transfer_matrix = {speedup:.2f}x   (target >= 4x: {C.verdict(speedup >= 4)})")
        out["transfer"] = {"batch": args.batch, "steps": args.steps, "reps": reps, "times": t, "speedup": speedup}

    if "eot" not in skip:
        reps = args.reps or 5
        steps, k = args.eot_steps, args.eot_samples
        quant.apply(model, quant.RandomPrecision(tuple(BITS), seed=0))
        threat = ThreatModel("eot_pgd", eps=0.1, steps=steps, eot=k)

        def one_pass():
            with prepared(model, quant.Fixed(4)):
                input_grad(model, x, y)

        def nocache():
            with C.caches_off():
                eot_pgd(model, x, y, threat)

        print(f"\nEOT-PGD, RandomPrecision(3..8), K={k}, {steps} steps, smallcnn batch {args.batch}, {reps} reps",
              flush=True)
        t = C.interleaved({"eot_pgd": lambda: eot_pgd(model, x, y, threat), "eot_pgd-nocache": nocache,
                           "one fwd+bwd": one_pass}, reps, progress=not args.quiet)
        per = {name: t[name]["median"] / (steps * k) for name in ("eot_pgd", "eot_pgd-nocache")}
        base = t["one fwd+bwd"]["median"]
        print(f"one fwd+bwd (Fixed(4), frozen)   {1000 * base:8.1f} ms")
        for name, v in per.items():
            print(f"{name:<16} per sample      {1000 * v:8.1f} ms = {v / base:.3f}x one fwd+bwd")
        out["eot"] = {"batch": args.batch, "steps": steps, "samples": k, "reps": reps, "times": t,
                      "per_sample_s": per, "fwd_bwd_s": base, "ratio": per["eot_pgd"] / base}
        quant.apply(model, quant.Fixed(32))
    C.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
