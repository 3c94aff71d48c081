"""Cost of quantization in training: one forward+backward (with parameter gradients, train
mode) of the model at 4 bits over the same model at FP (the same layers, quantization off).

    .venv/bin/python benchmarks/quant_overhead.py

At 4 bits every quantized layer, every step, (1) takes each output channel's min/max of
its weight and fake-quantizes it (the weights change every step, so nothing can be
cached), (2) tracks its input range (a min/max over the activation) and fake-quantizes
the input, and (3) masks both gradients in the backward pass (clipped STE). The first
conv and last linear stay FP. Models and batches as attack_throughput.py: SmallCNN
1x28x28 batch 256 and PreActResNet-18 3x32x32 (batch 128 on a GPU, 32 on a CPU).
Target: 4 bits <= 1.15x FP.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import _common as C
from rqlab import quant

BATCH = {"smallcnn": 256, "preactresnet18": 32}


def step_fn(model, x, y, bits):
    def step():
        quant.apply(model, quant.Fixed(bits))
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return step


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smallcnn,preactresnet18")
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)
    C.setup(args)
    info = C.machine()
    C.print_machine(info)
    results = []
    for name in args.models.split(","):
        batch = args.batch or BATCH[name]
        reps = args.reps or (15 if name == "smallcnn" else 10)
        x, y = C.images(C.shape_of(name), batch)
        model = C.build(name, bits=(4,), calib=x).train()
        print(f"\n{name}: batch {batch}, train mode, forward+backward with parameter gradients, {reps} reps",
              flush=True)
        t = C.interleaved({"fp": step_fn(model, x, y, 32), "4-bit": step_fn(model, x, y, 4)}, reps,
                          progress=not args.quiet)
        ratio = t["4-bit"]["median"] / t["fp"]["median"]
        for k, v in t.items():
            print(f"{k:<8}{1000 * v['median']:>10.1f} ms  spread {C.spread(v['times'])}")
        print(f"4-bit / FP = {ratio:.3f}   (target <= 1.15: {C.verdict(ratio <= 1.15)})")
        results.append({"model": name, "batch": batch, "reps": reps, "times": t, "ratio": ratio})
    C.write_json(args.json, {"benchmark": "quant_overhead", "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
