"""`rqlab bitselect`: Lipschitz-guided bits per layer under a budget (METHODS section 4).

    rqlab bitselect --model runs/x/checkpoint.pt --budget 4.0 --json bits.json
    rqlab bitselect --model fmnist-q4-pgd7-small --kind bitops --budget uniform:4 --method lipschitz
    rqlab bitselect --model fmnist-q4-pgd7-small --budget 3.5 --evaluate --n 1000      # + PGD-20 comparison

Loads the checkpoint, calibrates the activation ranges of every bit option on N training
images (--calibrate, default 512; 0 uses the ranges stored in the checkpoint and fails
if one is missing), computes the sensitivities (rqlab.bitselect), chooses the
bits and prints a per-layer table. The JSON (written atomically) holds the bits per
layer (usable as quant.PerLayer), their BitOPs, the budget, method and sensitivities.
"""
from __future__ import annotations

from pathlib import Path

from ..validate import RqlabError


def add_cli(subparsers) -> None:
    """Register `rqlab bitselect` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "bitselect", help="Lipschitz-guided bits per layer under a budget",
        description="Choose a bit-width per quantizable layer that minimises the summed Lipschitz sensitivity "
                    "(rqlab's construction, METHODS section 4) under a budget in average weight bits or BitOPs.")
    p.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="MODEL",
                   help="a zoo model name (rqlab zoo list) or a checkpoint path / run directory (rqlab train --out)")
    p.add_argument("--budget", required=True,
                   help="average weight bits (e.g. 4.0) for --kind avg_bits, BitOPs of the quantizable layers "
                        "(e.g. 2.5e7) for --kind bitops, or uniform:B for the cost of every layer at B bits")
    p.add_argument("--kind", default="avg_bits", help="avg_bits | bitops (default avg_bits)")
    p.add_argument("--bits", default="2,3,4,5,6,8", help="bit options, comma-separated (default 2,3,4,5,6,8)")
    p.add_argument("--method", default="lipschitz", help="lipschitz | uniform | random | reverse (default lipschitz)")
    p.add_argument("--calibrate", type=int, default=512, metavar="N",
                   help="calibrate activation ranges of every bit option on N training images (default 512; "
                        "0: use the checkpoint's ranges)")
    p.add_argument("--data", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    p.add_argument("--data-root", default=None, help="dataset directory (default: rqlab's data root)")
    p.add_argument("--iters", type=int, default=300, help="power-iteration steps per operator norm (default 300)")
    p.add_argument("--seed", type=int, default=0, help="calibration/test subset, random method and attack seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--evaluate", action="store_true",
                   help="also compare lipschitz, uniform, random and reverse at this budget under PGD")
    p.add_argument("--n", type=int, default=1000, help="test examples for --evaluate (default 1000)")
    p.add_argument("--eps", type=float, default=0.1, help="linf radius for --evaluate (default 0.1)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps for --evaluate (default 20)")
    p.add_argument("--random-seeds", type=int, default=3, help="random allocations for --evaluate (default 3)")
    p.add_argument("--json", default=None, help="write the selection here (atomically)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def parse_bits(text) -> tuple:
    """"2,3,4" -> (2, 3, 4); a non-integer raises naming --bits."""
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise RqlabError(f"bits={text!r} is not a list of bit-widths: write e.g. 2,3,4,5,6,8") from None


def parse_budget(text, model, kind) -> float:
    """A number, or uniform:B (the cost of every quantizable layer at B bits)."""
    from .. import bitselect
    from ..validate import check_bits, check_float

    s = str(text).strip().lower()
    if s.startswith("uniform:"):
        try:
            b = int(s.split(":", 1)[1])
        except ValueError:
            raise RqlabError(f"budget={text!r}: write uniform:B with an integer B, e.g. uniform:4") from None
        return bitselect.uniform_cost(model, check_bits(b, "budget bits"), kind)
    try:
        value = float(s)
    except ValueError:
        raise RqlabError(f"budget={text!r} is not a number: give e.g. 4.0 (avg_bits), 2.5e7 (bitops) "
                         "or uniform:4") from None
    return check_float(value, "budget", 0.0, lo_open=True)


def run_cli(args) -> int:
    """`rqlab bitselect`: load, calibrate, select, print, write JSON. Returns 0."""
    from .. import checkpoint, data, quant
    from ..zoo import load, weights_file
    from ..attacks import ThreatModel
    from .. import bitselect
    from ..training import resolve_device
    from ..validate import check_choice, check_int

    # fail on bad options before loading anything
    kind = check_choice(args.kind, "--kind", bitselect.KINDS)
    method = check_choice(args.method, "--method", bitselect.DEFAULT_METHODS)  # hessian, margin: Python API
    options = bitselect.check_bits_options(parse_bits(args.bits), "--bits")
    check_int(args.calibrate, "--calibrate", 0, data.dataset_info(args.data).sizes["train"])
    check_int(args.iters, "--iters", 1)
    check_int(args.seed, "--seed", 0)
    if args.json:  # before the work, not after it
        checkpoint.check_output_file(args.json, "--json")
        checkpoint.sweep_temp(Path(args.json).parent)  # temp files of a killed earlier write
    if not str(args.budget).strip().lower().startswith("uniform:"):
        budget = parse_budget(args.budget, None, kind)
        if kind == "avg_bits" and budget < options[0] - 1e-9:
            raise RqlabError(f"budget={budget:g} average bits is below the cheapest allocation "
                             f"(every layer at {options[0]} bits): raise the budget or add lower bits options")
    threat = ThreatModel("pgd", eps=args.eps, steps=args.steps, seed=args.seed) if args.evaluate else None
    if args.evaluate:
        check_int(args.n, "--n", 1, data.dataset_info(args.data).sizes["test"])
        check_int(args.random_seeds, "--random-seeds", 1)

    device = resolve_device(args.device)
    model = load(args.model, device=device)
    budget = parse_budget(args.budget, model, kind)
    calibration = None
    batches = None
    if args.calibrate:
        calib = data.load(args.data, split="train", n=args.calibrate, seed=args.seed, root=args.data_root)
        x = calib.x.float().div(255).to(device)
        batches = [x[i:i + 256] for i in range(0, len(x), 256)]
        calibration = {"n": args.calibrate, "bits": [b for b in options if b != 32], "split": "train",
                       "seed": args.seed}
    sens = bitselect.sensitivities(model, options, batches=batches, recalibrate=True, iters=args.iters)
    alloc = bitselect.select_bits(model, budget, options, kind, method, seed=args.seed, sensitivity=sens)
    uniform = bitselect.select_bits(model, budget, options, kind, "uniform", sensitivity=sens)

    policy = quant.PerLayer(alloc.bits)
    rows = {r["name"]: r for r in quant.summary(model, policy)}
    layers = []
    for name, b in alloc.bits.items():
        r = rows[name]
        layers.append({"name": name, "kind": r["kind"], "weights": sens.details[name]["weights"], "macs": r["macs"],
                       "bits": b, "bitops": r["bitops"], "sensitivity": sens.table[name][b],
                       "e_w": sens.details[name]["e_w"][b], "e_a": sens.details[name]["e_a"][b],
                       "downstream": sens.details[name]["downstream"]})
    total_bitops = float(sum(r["bitops"] for r in rows.values()))
    avg = bitselect.average_bits(model, alloc.bits)
    result = {
        "model": str(args.model), "checkpoint_sha256": checkpoint.sha256(weights_file(args.model)),
        "budget": budget, "budget_text": str(args.budget), "kind": kind, "method": method, "solver": alloc.method,
        "seed": args.seed, "bits_options": list(options), "bits": dict(alloc.bits), "policy": policy.to_dict(),
        "cost": alloc.cost, "avg_bits": avg, "objective": alloc.objective,
        "bitops_total": total_bitops, "bitops_quantized": float(sum(l["bitops"] for l in layers)),
        "layers": layers,
        "uniform": {"bits": dict(uniform.bits), "cost": uniform.cost, "objective": uniform.objective},
        "sensitivity": sens.to_dict(), "calibration": calibration, "data": args.data,
        "rqlab_version": checkpoint.rqlab_version(),
    }
    print(format_selection(result))
    if args.evaluate:
        test_set = data.load(args.data, split="test", n=args.n, seed=args.seed, root=args.data_root)
        comparison = bitselect.compare_allocations(
            model, test_set, threat, [budget], options, kind, n=args.n, random_seeds=args.random_seeds,
            sensitivity=sens, seed=args.seed, progress=not args.no_progress)
        result["comparison"] = comparison
        print()
        print(bitselect.format_comparison(comparison))
    if args.json:
        checkpoint.save_json(args.json, result)
        print(f"selection: {args.json}")
    return 0


def format_selection(res: dict) -> str:
    head = f"{'layer':<20}{'kind':<13}{'weights':>10}{'MACs':>13}{'bits':>6}{'MBitOPs':>10}{'S_l(b)':>12}"
    lines = [f"bit selection: method {res['method']} ({res['solver']}), kind {res['kind']}, "
             f"budget {res['budget']:g}, options {res['bits_options']}", head, "-" * len(head)]
    for l in res["layers"]:
        lines.append(f"{l['name']:<20}{l['kind']:<13}{l['weights']:>10,}{l['macs']:>13,}{l['bits']:>6}"
                     f"{l['bitops'] / 1e6:>10.3f}{l['sensitivity']:>12.4g}")
    lines.append(f"average weight bits {res['avg_bits']:.3f}  cost {res['cost']:.6g}  objective {res['objective']:.4g} "
                 f"(uniform {'/'.join(sorted({str(b) for b in res['uniform']['bits'].values()}))} at this budget: "
                 f"{res['uniform']['objective']:.4g})")
    lines.append(f"total BitOPs {res['bitops_total'] / 1e9:.4f} G (quantized layers "
                 f"{res['bitops_quantized'] / 1e9:.4f} G; FP layers at 32 bits)")
    return "\n".join(lines)
