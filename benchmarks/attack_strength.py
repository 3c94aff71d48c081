"""Are the cheaper attacks as strong? On every zoo model, PGD-20 (linf eps 0.1) as rqlab
runs it by default (the full attack, fp32) against
  bf16     the same attack inside attacks.arithmetic("bf16") (forward and backward under
           bf16 autocast; grids and scores fp32);
  active   the active set (attacks.active_set()): its outcome is, per example, "fooled
           at x or at some iterate of the full attack" (tests/test_active_set.py), read
           here from the full run's own forward passes at no extra cost.
Printed per model: robust accuracy of each with the full attack's 95% interval, and the
share of examples with the same outcome as the full attack.

    .venv/bin/python benchmarks/attack_strength.py                    # all zoo models, 1,000 images
    .venv/bin/python benchmarks/attack_strength.py --n 500 --models fmnist-q4-pgd7-small --threads 1

Criterion (issue 17): robust accuracy within the full attack's interval and the same
outcome on >= 98% of the examples.
"""
from __future__ import annotations

import sys
import time

import torch

import _common as C
from rqlab import attacks, evaluate, quant, zoo
from rqlab.attacks import ThreatModel, base
from rqlab.stats import wilson_interval


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=250)
    args = p.parse_args(argv)
    C.setup(args)
    info = C.machine()
    C.print_machine(info)
    names = args.models.split(",") if args.models else [
        n for n in zoo.names(trained_only=True) if n.startswith("fmnist-")]  # the images are Fashion-MNIST
    x, y = C.images((1, 28, 28), args.n)
    threat = ThreatModel("pgd", eps=0.1, steps=20, seed=0)
    bf16 = base.bf16_supported("cpu")
    print(f"PGD-20 linf eps 0.1, {args.n} images, batch {args.batch}; bf16 hardware: {bf16}")
    print(f"{'model':<20}{'policy':<14}{'full':>8}{'95% CI':>15}{'bf16':>8}{'same':>8}{'active':>8}{'same':>8}"
          f"{'t bf16/full':>13}{'ok':>5}")
    rows = []
    for name in names:
        model = zoo.load(name)
        policy = quant.current(model)
        ever = torch.zeros(args.n, dtype=torch.bool)
        pos = {"start": 0}

        def hook(module, inputs, out):  # the full attack's forwards: each iterate of each batch
            if torch.is_grad_enabled() and out.requires_grad:
                b = len(out)
                s = pos["start"]
                ever[s:s + b] |= (out.detach().argmax(1) != y[s:s + b])

        h = model.register_forward_hook(hook)
        real_attack = attacks.get("pgd")
        seen = []

        def tracked(m, xb, yb, t):
            pos["start"] = sum(seen)
            seen.append(len(xb))
            return real_attack(m, xb, yb, t)

        try:
            from rqlab import evaluation
            orig = evaluation.attacks.get
            evaluation.attacks.get = lambda n_: tracked if n_ == "pgd" else orig(n_)
            t0 = time.perf_counter()
            full = evaluate(model, (x, y), threat, batch_size=args.batch, progress=False)
            t_full = time.perf_counter() - t0
        finally:
            evaluation.attacks.get = orig
            h.remove()
        r_full = torch.tensor(full["per_example"]["robust"], dtype=torch.bool)
        clean = torch.tensor(full["per_example"]["clean"], dtype=torch.bool)
        random = isinstance(policy, quant.RandomPrecision)
        r_active = clean & ~ever & r_full if not random else None
        row = {"model": name, "policy": str(policy), "full": r_full.float().mean().item(), "t_full": t_full}
        lo, hi = wilson_interval(r_full.sum().item(), args.n)
        if bf16:
            t0 = time.perf_counter()
            with attacks.arithmetic("bf16"):
                rec = evaluate(model, (x, y), threat, batch_size=args.batch, progress=False)
            row["t_bf16"] = time.perf_counter() - t0
            r_bf = torch.tensor(rec["per_example"]["robust"], dtype=torch.bool)
            row.update(bf16=r_bf.float().mean().item(), bf16_same=(r_bf == r_full).float().mean().item())
            row["bf16_ok"] = lo <= row["bf16"] <= hi and row["bf16_same"] >= 0.98
        if r_active is not None:
            row.update(active=r_active.float().mean().item(), active_same=(r_active == r_full).float().mean().item())
        rows.append(row)
        f = lambda k: f"{100 * row[k]:.1f}" if k in row else "-"  # noqa: E731
        print(f"{name:<20}{str(policy):<14}{f('full'):>8}{f'[{100 * lo:.1f}, {100 * hi:.1f}]':>15}{f('bf16'):>8}"
              f"{f('bf16_same'):>8}{f('active'):>8}{f('active_same'):>8}"
              f"{row.get('t_bf16', float('nan')) / t_full:>13.2f}{('yes' if row.get('bf16_ok') else 'NO'):>5}",
              flush=True)
    print("(random policies: PGD draws precisions; bf16 and fp32 runs see the same draws. 'active': "
          "not applicable to them)")
    C.write_json(args.json, {"benchmark": "attack_strength", "machine": info, "n": args.n, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
