"""Wall time of the standard protocol (METHODS section 8) against the reference AutoAttack
standard alone, on the 4-bit SmallCNN zoo model `fmnist-q4-pgd7-small` and N Fashion-MNIST test
images (same images, same iterations, same seed). Target: ratio <= 1.3 for deterministic
models (the protocol adds PGD and a few forward passes to AutoAttack's run; it runs
AutoAttack attack by attack, as pyautoattack itself does, to see what Square adds).

    python benchmarks/protocol_cost.py                 # N = 100, reference settings
    python benchmarks/protocol_cost.py 50 --aa-iters 20 --square-queries 1000
    python benchmarks/protocol_cost.py --active-set --bf16    # the protocol's PGD with issue 17's options

Prints, does not assert. One run each (AutoAttack at 100 iterations takes minutes).
"""
from __future__ import annotations

import argparse
import time

from _common import cpu_model

import torch

from rqlab import attacks, data, load
from rqlab.attacks import ThreatModel, autoattack
from rqlab.evaluation import as_tensors, evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int, nargs="?", default=100, help="test images (default 100)")
    p.add_argument("--aa-iters", type=int, default=None, help="AutoAttack iterations (default 100, the reference)")
    p.add_argument("--square-queries", type=int, default=None, help="Square queries (default 5000)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--active-set", action="store_true", help="the protocol's PGD inside attacks.active_set()")
    p.add_argument("--bf16", action="store_true", help="the protocol's PGD inside attacks.arithmetic('bf16')")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = load("fmnist-q4-pgd7-small")
    x, y = as_tensors(data.load("fashion-mnist", "test", n=args.n, seed=0))
    opts = {k: v for k, v in (("n_iter", args.aa_iters), ("n_queries", args.square_queries)) if v is not None}
    aa_threat = ThreatModel("autoattack", eps=args.eps, seed=0, options={"version": "standard", **opts})

    t0 = time.perf_counter()
    x_adv = autoattack(model, x, y, aa_threat)  # the reference AutoAttack standard, one call
    t_aa = time.perf_counter() - t0
    with torch.no_grad():
        aa_acc = (model(x_adv).argmax(1) == y).float().mean().item()
    t0 = time.perf_counter()
    with attacks.active_set(args.active_set), attacks.arithmetic("bf16" if args.bf16 else "fp32"):
        rec = evaluate(model, (x, y), ThreatModel("pgd", eps=args.eps, steps=20, seed=0), protocol="standard",
                       options=opts, batch_size=args.batch_size, progress=False)
    t_std = time.perf_counter() - t0

    print(f"cpu: {cpu_model()}  torch threads: {torch.get_num_threads()}")
    print(f"model fmnist-q4-pgd7-small (policy {rec.policy}), N={args.n}, linf eps={args.eps}, "
          f"AutoAttack settings {rec['protocol_options']}")
    print(f"reference AutoAttack standard alone: {t_aa:8.1f} s   robust accuracy {100 * aa_acc:.1f}%")
    parts = ", ".join(f"{a['name']} {100 * a['robust_accuracy']:.1f}% {a['time_s']:.1f}s" for a in rec.attacks)
    print(f"attack settings: {rec['attack_settings']}")
    print(f"standard protocol (AA + PGD-20):     {t_std:8.1f} s   robust accuracy {100 * rec.robust_accuracy:.1f}%"
          f"  ({parts})")
    print(f"ratio standard / AutoAttack: {t_std / t_aa:.2f}x (target <= 1.3x)")
    if rec.unreliable:
        print("unreliable:", *rec.unreliable, sep="\n  ")


if __name__ == "__main__":
    main()
