"""PGD-20 throughput: rqlab against torchattacks and against the forward+backward limit.

    .venv/bin/python benchmarks/attack_throughput.py                 # CPU, both models
    .venv/bin/python benchmarks/attack_throughput.py --device cuda   # GPU: bf16 autocast, channels_last
    .venv/bin/python benchmarks/attack_throughput.py --device cuda --compile

Contenders, on the same 4-bit model (quant.Fixed(4), first conv and last linear at FP,
activation ranges calibrated) and the same batch, run in turn every repetition:
  torchattacks     torchattacks.PGD(model, eps, alpha, steps=20, random_start=True)
  rqlab            rqlab.attacks.pgd with ThreatModel("pgd", eps, steps=20, step_size=alpha)
  rqlab-nocache    the same with quant.frozen_weights' cache switched off (rqlab before
                   issue 8: every forward re-quantizes the weights)
  limit            20 x one forward+backward for the input gradient, parameters frozen,
                   weights quantized once: the work any PGD-20 must do
Models: SmallCNN 1x28x28 (batch 256, eps 0.1, alpha 0.01) and PreActResNet-18 3x32x32
(batch 128 on a GPU; 32 on a CPU, where 128 would take minutes per attack; eps 8/255,
alpha 2/255). Targets: rqlab >= 1.0x torchattacks, and rqlab within 10% of the limit.
"""
from __future__ import annotations

import sys

import torch

import _common as C
from rqlab import quant
from rqlab.attacks import ThreatModel, pgd
from rqlab.attacks.base import input_grad
from rqlab.models.state import prepared

SETTINGS = {  # name: (eps, alpha, cpu batch, gpu batch)
    "smallcnn": (0.1, 0.01, 256, 256),
    "preactresnet18": (8 / 255, 2 / 255, 32, 128),
}


def contenders(model, x, y, eps, alpha, steps, autocast):
    import torchattacks

    threat = ThreatModel("pgd", norm="linf", eps=eps, steps=steps, step_size=alpha, seed=0)
    peer = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

    def limit():
        with prepared(model):
            for _ in range(steps):
                input_grad(model, x, y)

    def nocache():
        with C.caches_off():
            pgd(model, x, y, threat)

    fns = {"torchattacks": lambda: peer(x, y), "rqlab": lambda: pgd(model, x, y, threat),
           "rqlab-nocache": nocache, "limit": limit}
    if autocast:
        def wrap(fn):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    fn()
            return run
        fns = {k: wrap(f) for k, f in fns.items()}
    return fns


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smallcnn,preactresnet18", help="comma-separated: smallcnn, preactresnet18")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-amp", action="store_true", help="cuda: fp32 instead of bf16 autocast")
    p.add_argument("--no-channels-last", action="store_true", help="cuda: keep NCHW")
    p.add_argument("--compile", action="store_true", help="cuda: model.compile() (torch.compile in place)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("attack_throughput: --device cuda asked for, but this machine has no CUDA GPU "
              f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a machine "
              "with a GPU, or use --device cpu.", file=sys.stderr)
        return 2
    C.setup(args)
    gpu = args.device == "cuda"
    amp, channels_last = gpu and not args.no_amp, gpu and not args.no_channels_last
    info = C.machine(args.device)
    C.print_machine(info)
    results = []
    for name in args.models.split(","):
        eps, alpha, cpu_batch, gpu_batch = SETTINGS[name]
        batch = args.batch or (gpu_batch if gpu else cpu_batch)
        reps = args.reps or (10 if gpu else (15 if name == "smallcnn" else 5))
        x, y = C.images(C.shape_of(name), batch)
        model = C.build(name, bits=(4,), calib=x)
        quant.apply(model, quant.Fixed(4))
        if gpu:
            model, x, y = model.cuda(), x.cuda(), y.cuda()
            if channels_last:
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            if args.compile:
                model.compile()
        print(f"\n{name}: batch {batch}, PGD-{args.steps} linf eps {eps:.4g} alpha {alpha:.4g}, 4 bits, "
              f"{reps} reps" + (f", bf16 autocast={amp}, channels_last={channels_last}, compile={args.compile}"
                                if gpu else ""), flush=True)
        t = C.interleaved(contenders(model, x, y, eps, alpha, args.steps, amp), reps, args.device,
                          progress=not args.quiet)
        med = {k: v["median"] for k, v in t.items()}
        vs_peer = med["torchattacks"] / med["rqlab"]
        vs_limit = med["rqlab"] / med["limit"]
        print(f"{'contender':<15}{'median s':>10}{'images/s':>10}{'spread':>14}")
        for k, v in t.items():
            print(f"{k:<15}{v['median']:>10.3f}{batch / v['median']:>10.1f}{C.spread(v['times']):>14}")
        print(f"rqlab throughput / torchattacks = {vs_peer:.3f}x   (target >= 1.0x: {C.verdict(vs_peer >= 1.0)})")
        print(f"rqlab time / limit             = {vs_limit:.3f}    (target <= 1.10: {C.verdict(vs_limit <= 1.10)})")
        print(f"cache saves                    = {med['rqlab-nocache'] / med['rqlab']:.3f}x (rqlab-nocache / rqlab)")
        results.append({"model": name, "batch": batch, "steps": args.steps, "reps": reps, "times": t,
                        "images_per_s": {k: batch / v for k, v in med.items()},
                        "rqlab_over_torchattacks": vs_peer, "rqlab_over_limit": vs_limit,
                        "amp": amp, "channels_last": channels_last, "compile": args.compile})
    C.write_json(args.json, {"benchmark": "attack_throughput", "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
