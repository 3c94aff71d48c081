"""Prediction flips of the int8 ONNX Runtime engine against its fake-quant twin (Fixed(8))
and FP, with the first and last layer kept FP (the twin's default) and quantized
(docs/methods.md, Deployed int8 inference): clean accuracies and flip rates on the first
1,000 Fashion-MNIST test images of the seed-0 subset, engine calibrated on 1,024 training
images (seed 0), one thread.

    PYTHONPATH=$PWD python scripts/deploy_measure.py [--n 1000] [--models fmnist-fp-pgd7-small ...]
"""
import argparse
import time

import torch

import rqlab
from rqlab import data, deploy, quant

MODELS = ["fmnist-fp-natural-small", "fmnist-fp-pgd7-small", "fmnist-q8-pgd7-small", "fmnist-q4-pgd7-small"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--models", nargs="+", default=MODELS)
    args = p.parse_args()
    torch.set_num_threads(1)
    test = data.load("fashion-mnist", "test", n=args.n, seed=0)
    x, y = test.x.float() / 255, test.y
    calib, _ = deploy.calibration_set("fashion-mnist", 1024, 0)
    acc = lambda logits: 100 * (logits.argmax(1) == y).float().mean().item()  # noqa: E731
    print("| model | first/last layer | clean FP / fake-quant 8 / engine | flips engine vs fake-quant | "
          "max logit diff | flips engine vs FP | flips fake-quant vs FP |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = rqlab.load(name, device="cpu")
        with torch.no_grad(), quant.using(model, quant.Fixed(8)):
            twin = model(x)
        with torch.no_grad(), quant.using(model, quant.Fixed(32)):
            fp = model(x)
        for edges in (False, True):
            t0 = time.perf_counter()
            engine = deploy.int8_engine(model, calib, deploy.Int8Config(quantize_edges=edges), threads=1)
            with torch.no_grad():
                out = engine(x)
            a, b, c = deploy.agreement(out, twin), deploy.agreement(out, fp), deploy.agreement(twin, fp)
            print(f"| {name} | {'int8' if edges else 'FP'} | {acc(fp):.1f} / {acc(twin):.1f} / {acc(out):.1f} | "
                  f"{100 * a['flip_rate']:.1f}% | {a['max_logit_diff']:.2f} | {100 * b['flip_rate']:.1f}% | "
                  f"{100 * c['flip_rate']:.1f}% |  <!-- {time.perf_counter() - t0:.1f}s -->", flush=True)


if __name__ == "__main__":
    main()
