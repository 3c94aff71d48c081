"""Robust accuracy of the binary ODG-Q zoo model under PGD-20, BPDA-20 and Square
(docs/methods.md, Attacks): first 200 Fashion-MNIST test images, linf eps 0.1.

    PYTHONPATH=$PWD python scripts/bpda_measure.py [--n 200] [--square-queries 1000]
"""
import argparse
import time

import torch

import rqlab
from rqlab import attacks
from rqlab.attacks import ThreatModel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fmnist-odgq-bin-small")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--square-queries", type=int, default=1000, help="0 skips Square (minutes on a CPU)")
    a = p.parse_args()
    torch.manual_seed(0)
    model = rqlab.load(a.model).eval()
    ds = rqlab.data.load("fashion-mnist", "test", n=1000, seed=0)
    x, y = ds.x[:a.n].float() / 255, ds.y[:a.n]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    print(f"{a.model}: clean {clean.float().mean():.3f} on {a.n}")
    runs = [("pgd", {})] + [("bpda", {"surrogate": "tanh", "k": k}) for k in (0.5, 1.0, 2.0, 5.0)] + \
        [("bpda", {"surrogate": "identity"}), ("bpda", {"surrogate": "tanh", "k": 1.0, "loss": "margin"})]
    if a.square_queries:
        runs.append(("square", {"n_queries": a.square_queries}))
    for name, opts in runs:
        threat = ThreatModel(name, eps=0.1, steps=20, options=opts)
        t0 = time.time()
        x_adv = attacks.run(model, x, y, threat)
        with torch.no_grad():
            rob = (clean & (model(x_adv).argmax(1) == y)).float().mean().item()
        print(f"{name:7s} {str(threat.to_dict()['options']):60s} robust {rob:.3f}  {time.time() - t0:6.1f}s", flush=True)


if __name__ == "__main__":
    main()
