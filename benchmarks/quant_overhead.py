"""Cost of quantization in training: one forward+backward (with parameter gradients, train
mode) of the model at 4 bits over the same model at FP (the same layers, quantization off).

    .venv/bin/python benchmarks/quant_overhead.py

At 4 bits every quantized layer, every step, (1) takes each output channel's min/max of
its weight and fake-quantizes it (the weights change every step, so nothing can be
cached), (2) tracks its input range (a min/max over the activation) and fake-quantizes
the input, and (3) masks both gradients in the backward pass (clipped STE). The first
conv and last linear stay FP. Models and batches as attack_throughput.py: SmallCNN
1x28x28 batch 256 and PreActResNet-18 3x32x32 (batch 128 on a GPU, 32 on a CPU).
Contender "4-bit-fused": the same 4-bit step inside quant.fused() (the fake
quantization compiled by torch.compile into one kernel; compiled in the warm-up round;
`--no-fused` leaves it out). Target (issue 17): 4 bits <= 1.10x FP.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import _common as C
from rqlab import quant

BATCH = {"smallcnn": 256, "preactresnet18": 32}


def step_fn(model, x, y, bits, fused=False):
    def step():
        with quant.fused(fused):
            quant.apply(model, quant.Fixed(bits))
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    return step


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smallcnn,preactresnet18")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--no-fused", action="store_true", help="leave out the quant.fused() contender")
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
        fns = {"fp": step_fn(model, x, y, 32), "4-bit": step_fn(model, x, y, 4)}
        if not args.no_fused:
            fns["4-bit-fused"] = step_fn(model, x, y, 4, fused=True)
        t = C.interleaved(fns, reps, progress=not args.quiet)
        ratio = t["4-bit"]["median"] / t["fp"]["median"]
        for k, v in t.items():
            print(f"{k:<12}{1000 * v['median']:>10.1f} ms  spread {C.spread(v['times'])}")
        print(f"4-bit / FP       = {ratio:.3f}   (target <= 1.10: {C.verdict(ratio <= 1.10)})")
        row = {"model": name, "batch": batch, "reps": reps, "times": t, "ratio": ratio}
        if "4-bit-fused" in t:
            row["fused_ratio"] = t["4-bit-fused"]["median"] / t["fp"]["median"]
            print(f"4-bit-fused / FP = {row['fused_ratio']:.3f}   (target <= 1.10: "
                  f"{C.verdict(row['fused_ratio'] <= 1.10)})")
        results.append(row)
    C.write_json(args.json, {"benchmark": "quant_overhead", "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
