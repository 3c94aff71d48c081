"""Robust-accuracy evaluation throughput: rqlab's PGD-20 (full, active set, bf16, both)
against torchattacks' PGD-20 on trained zoo models, each contender's robust accuracy
printed beside its time.

    .venv/bin/python benchmarks/eval_throughput.py                       # both models, 1,000 images
    .venv/bin/python benchmarks/eval_throughput.py --models fmnist-q4-pgd7-small --n 500 --reps 3 --threads 1

Contenders (same model, images, batches; one evaluation of robust accuracy each):
  torchattacks       torchattacks.PGD(model, 0.1, 0.01, steps=20, random_start=True), then
                     x and x_adv scored (robust = both classified correctly)
  rqlab              rqlab.evaluate(model, data, ThreatModel("pgd", eps=0.1, steps=20))
  rqlab-active       the same inside attacks.active_set()
  rqlab-bf16         the same inside attacks.arithmetic("bf16") (skipped without bf16 hardware)
  rqlab-active-bf16  both
  rqlab-cl           rqlab with the model in channels_last (NHWC) memory format
Models: fmnist-q4-pgd7-small (4-bit SmallCNN, PGD-7 trained) and fmnist-fp-pgd7-small (FP). Target:
rqlab (its fastest setting) >= 2x torchattacks with robust accuracy within the interval.
"""
from __future__ import annotations

import contextlib
import copy
import sys

import torch

import _common as C
from rqlab import attacks, evaluate, zoo
from rqlab.attacks import ThreatModel, base
from rqlab.stats import wilson_interval


def contenders(model, x, y, batch, steps, out: dict):
    import torchattacks

    threat = ThreatModel("pgd", norm="linf", eps=0.1, steps=steps, seed=0)
    peer = torchattacks.PGD(model, eps=0.1, alpha=threat.alpha, steps=steps, random_start=True)

    def theirs():
        hits = 0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            xa = peer(xb, yb)
            with torch.no_grad():
                hits += ((model(xb).argmax(1) == yb) & (model(xa).argmax(1) == yb)).sum().item()
        out["torchattacks"] = hits / len(x)

    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def ours(name, active, bf16, net=model):
        def run():
            with attacks.active_set(active), (attacks.arithmetic("bf16") if bf16 else contextlib.nullcontext()):
                rec = evaluate(net, (x, y), threat, batch_size=batch, progress=False)
            out[name] = rec["robust_accuracy"]
        return run

    fns = {"torchattacks": theirs, "rqlab": ours("rqlab", False, False), "rqlab-active": ours("rqlab-active", True, False),
           "rqlab-cl": ours("rqlab-cl", False, False, nhwc)}
    if base.bf16_supported(x.device):
        fns["rqlab-bf16"] = ours("rqlab-bf16", False, True)
        fns["rqlab-active-bf16"] = ours("rqlab-active-bf16", True, True)
    return fns


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fmnist-q4-pgd7-small,fmnist-fp-pgd7-small", help="comma-separated zoo names")
    p.add_argument("--n", type=int, default=1000, help="test images")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    args = p.parse_args(argv)
    C.setup(args)
    info = C.machine()
    C.print_machine(info)
    x, y = C.images((1, 28, 28), args.n)
    results = []
    for name in args.models.split(","):
        model = zoo.load(name)
        reps = args.reps or 3
        acc: dict = {}
        print(f"\n{name}: {args.n} images, batch {args.batch}, PGD-{args.steps} linf eps 0.1, {reps} reps", flush=True)
        t = C.interleaved(contenders(model, x, y, args.batch, args.steps, acc), reps, warmup=args.warmup, progress=not args.quiet)
        med = {k: v["median"] for k, v in t.items()}
        print(f"{'contender':<19}{'median s':>10}{'images/s':>10}{'spread':>14}{'x torchattacks':>16}"
              f"{'robust acc':>12}{'95% CI':>16}")
        for k, v in t.items():
            lo, hi = wilson_interval(acc[k] * args.n, args.n)
            print(f"{k:<19}{v['median']:>10.2f}{args.n / v['median']:>10.1f}{C.spread(v['times']):>14}"
                  f"{med['torchattacks'] / v['median']:>15.2f}x{100 * acc[k]:>11.1f}%"
                  f"{f'[{100 * lo:.1f}, {100 * hi:.1f}]':>16}")
        best = min((k for k in med if k != "torchattacks"), key=med.get)
        ratio = med["torchattacks"] / med[best]
        lo, hi = wilson_interval(acc["torchattacks"] * args.n, args.n)
        same = lo <= acc[best] <= hi
        print(f"fastest rqlab ({best}) / torchattacks = {ratio:.2f}x, robust accuracy "
              f"{100 * acc[best]:.1f}% vs {100 * acc['torchattacks']:.1f}% "
              f"(target >= 2x with equal robust accuracy: {C.verdict(ratio >= 2 and same)})")
        results.append({"model": name, "n": args.n, "batch": args.batch, "steps": args.steps, "reps": reps,
                        "times": t, "robust_accuracy": acc, "fastest": best, "fastest_over_torchattacks": ratio})
    C.write_json(args.json, {"benchmark": "eval_throughput", "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
