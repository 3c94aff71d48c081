"""`rqlab eval`: evaluate a checkpoint under an attack and write the record as JSON.

    rqlab eval --model fmnist-q4-pgd7-small --n 1000 --json out.json      # the standard protocol (default)
    rqlab eval --model runs/x --attack pgd --eps 0.1 --steps 20 --bits 4 --n 1000   # one attack (quick)
    rqlab eval --model ... --random-bits 4-8 --calibrate 512 --attack eot-pgd --eot 10 --passes 5 --sanity
    rqlab eval --model runs/x --bits 3 --attack pgd --sanity --strict   # exit code 3 if a sanity check failed

Without --attack and --protocol the standard protocol runs (the headline figure);
--attack NAME alone runs that one attack (the quick protocol). --json is checked before
the evaluation starts; with --json, the outcomes so far are kept after each batch in
JSON.progress, so a rerun of a killed or interrupted command resumes there. Precisions the checkpoint has no activation ranges for are
calibrated on 512 training images (a warning; the record's extra.calibration says so),
and a random policy attacked without averaging is warned about before the run.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..validate import RqlabError, check_int

STRICT_EXIT = 3        # --strict: the evaluation ran, but a sanity check failed or the record is unreliable
AUTO_CALIBRATE = 512   # training images that calibrate the precisions a checkpoint has no ranges for


def add_cli(subparsers) -> None:
    """Register `rqlab eval` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="clean and robust accuracy of a checkpoint under an attack",
        description="Evaluate a checkpoint at a precision policy under a threat model; prints a short table "
                    "and writes the full record (per-example outcomes included) with --json.")
    p.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="MODEL",
                   help="a zoo model name (rqlab zoo list) or a checkpoint path / run directory (rqlab train --out)")
    p.add_argument("--data", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    p.add_argument("--data-root", default=None, help="dataset directory (default: rqlab's data root)")
    p.add_argument("--attack", default=None,
                   help="one attack, the quick protocol: fgsm | pgd | cw | eot-pgd | expectation | transfer | "
                        "autoattack | square | bpda (default: none, the standard protocol runs)")
    p.add_argument("--norm", default="linf", help="linf | l2 (default linf)")
    p.add_argument("--eps", type=float, default=0.1, help="radius in [0, 1] pixel units (default 0.1)")
    p.add_argument("--steps", type=int, default=20, help="attack steps (default 20)")
    p.add_argument("--step-size", type=float, default=None,
                   help="default: 0.01 for linf 0.1, 2/255 for 8/255, else 2.5 eps / steps")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--eot", type=int, default=None, help="gradient samples per step (default 10 for eot-pgd, else 1)")
    p.add_argument("--version", default=None, help="AutoAttack version: standard | rand (for random defenses)")
    p.add_argument("--bits", default=None,
                   help="defender's precision: fp, 4, w32a4, 4-8, 4,6,8 (default: as stored in the checkpoint)")
    p.add_argument("--random-bits", default=None, help="random precision inference over a set, e.g. 4-8")
    p.add_argument("--attack-bits", default=None,
                   help="attacker's precision (e.g. 4 to craft at 4 bits; for eot-pgd/expectation the set)")
    p.add_argument("--passes", type=int, default=1, help="stochastic forward passes per example (default 1)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="post-training quantization: calibrate activation ranges of the precisions used on N "
                        "training images first (default 0: only the precisions the checkpoint has no ranges "
                        f"for are calibrated, on {AUTO_CALIBRATE} images, with a warning and a note in the record)")
    p.add_argument("--n", type=int, default=1000, help="test examples (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--protocol", default=None, choices=("quick", "standard"),
                   help="standard (the default without --attack): METHODS section 8 at --eps/--norm (AutoAttack "
                        "standard + PGD; for --random-bits the support ensemble + EOT-PGD + expectation; for binary "
                        "models Square and BPDA too); quick (the default with --attack): the one --attack "
                        "(default pgd); docs/protocol.md")
    p.add_argument("--aa-iters", type=int, default=None,
                   help="standard protocol: AutoAttack iterations (default 100, the reference; fewer for smoke runs)")
    p.add_argument("--aa-targets", type=int, default=None, help="standard protocol: APGD-T/FAB-T targets (default 9)")
    p.add_argument("--square-queries", type=int, default=None,
                   help="standard protocol: Square's queries (default 5000, the reference)")
    p.add_argument("--arithmetic", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="the attacks' forward and backward: fp32 (default), bf16 autocast (CUDA, or a CPU with "
                        "AVX512-BF16/AMX; every final score stays fp32; binary models keep fp32), or auto (bf16 where "
                        "the hardware has it); recorded in extra.attack_settings (docs/performance.md)")
    p.add_argument("--active-set", action="store_true",
                   help="attacks on deterministic models drop examples once fooled (fewer passes; robust accuracy "
                        "equal or lower, docs/performance.md); recorded in extra.attack_settings")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format for the model (faster on CUDA and on CPUs: "
                        "benchmarks/eval_throughput.py, rqlab-cl); recorded")
    p.add_argument("--sanity", action="store_true", help="run the sanity checks and add them to the record")
    p.add_argument("--strict", action="store_true",
                   help=f"exit with code {STRICT_EXIT} when a sanity check failed or the record is marked unreliable")
    p.add_argument("--json", default=None,
                   help="write the record here (atomically); JSON.progress keeps the finished batches until "
                        "then, and a rerun of the same command resumes from it")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="shard the test examples over N processes (GPUs, or CPU processes with gloo): launches "
                        "`torchrun --standalone --nproc-per-node N -m rqlab eval ...`; the record is the "
                        "single-process one (docs/distributed.md)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def threat_from_args(args):
    from .. import quant
    from ..attacks import ThreatModel

    options = {}
    attack = args.attack or "pgd"
    if args.version is not None:
        options["version"] = args.version
    policy = quant.parse_policy(args.attack_bits, seed=args.seed) if args.attack_bits else None
    return ThreatModel(attack, norm=args.norm, eps=args.eps, steps=args.steps, step_size=args.step_size,
                       restarts=args.restarts, eot=args.eot, seed=args.seed, policy=policy, options=options)


def run_cli(args) -> int:
    """`rqlab eval`: load, evaluate, print the table, write the JSON record. Returns 0."""
    import torch

    from .. import attacks, checkpoint, data, distributed, quant
    from ..evaluation import _quick_reasons as quick_reasons, evaluate, format_record
    from ..zoo import load, weights_file
    from ..training import resolve_device
    from .zoo import standard_options

    if args.bits and args.random_bits:
        raise RqlabError("give --bits or --random-bits, not both")
    if args.protocol is None:
        args.protocol = "quick" if args.attack else "standard"
    elif args.protocol == "standard" and args.attack not in (None, "pgd"):
        raise RqlabError(f"--attack {args.attack} picks the one attack of the quick protocol; the standard protocol "
                         "runs its own attacks (and PGD at --steps): drop --attack, or add --protocol quick")
    sizes = data.dataset_info(args.data).sizes  # flags named as flags, not as data.load's `n`
    check_int(args.n, "--n", lo=1, hi=sizes["test"])
    check_int(args.calibrate, "--calibrate", lo=0, hi=sizes["train"])
    check_int(args.batch_size, "--batch-size", lo=1)
    check_int(args.passes, "--passes", lo=1)
    if args.json:  # before the evaluation, not after it
        checkpoint.check_output_file(args.json, "--json")
        checkpoint.sweep_temp(Path(args.json).parent)  # temp files of a killed earlier write
    threat = threat_from_args(args)  # fail on a bad threat before loading anything
    options = None
    if args.protocol == "standard":
        options = standard_options(args) or {}
        if args.eot is not None:
            options["eot"] = args.eot
    elif any(v is not None for v in (args.aa_iters, args.aa_targets, args.square_queries)):
        raise RqlabError("--aa-iters, --aa-targets and --square-queries set the standard protocol: drop --attack "
                         "(or add --protocol standard); with --attack autoattack use its own options")
    if args.nproc is not None:
        if distributed.under_torchrun():
            raise RqlabError("--nproc launches torchrun: under torchrun, leave it out")
        if args.nproc > 1:
            return distributed.launch(distributed.strip_nproc(args.argv), args.nproc)
    group = distributed.init(args.device)  # under torchrun: join, and take this rank's GPU
    spelling = args.random_bits or args.bits
    policy = quant.parse_policy(spelling, seed=args.seed) if spelling else None
    if args.random_bits and not isinstance(policy, quant.RandomPrecision):
        raise RqlabError(f"--random-bits={args.random_bits!r} is a single precision: use a set such as 4-8 or 4,6,8")
    device = resolve_device(args.device)
    model = load(args.model, device=device)
    calibration = None
    bits = set((policy or quant.current(model)).support()) | set(threat.policy.support() if threat.policy else ())
    n_calib, missing = args.calibrate, missing_ranges(model, bits | activation_bits(policy or quant.current(model)))
    if not n_calib and missing and getattr(getattr(model, "config", None), "sbn_bits", None) is None:
        n_calib, bits = AUTO_CALIBRATE, missing
        warnings.warn(f"the checkpoint has no activation ranges for {', '.join(map(str, missing))} bits: "
                      f"calibrating them on {AUTO_CALIBRATE} training images (post-training quantization, "
                      "noted in the record; --calibrate N sets N and recalibrates every precision used)")
    if n_calib:
        calib = data.load(args.data, split="train", n=n_calib, seed=args.seed, root=args.data_root)
        x = calib.x.float().div(255).to(device)
        quant.calibrate(model, [x[i:i + 256] for i in range(0, len(x), 256)], bits=sorted(bits))
        calibration = {"n": n_calib, "bits": sorted(bits), "split": "train", "seed": args.seed,
                       "automatic": not args.calibrate}
    if args.protocol == "quick":  # say it before the work, not only in the table after it
        for reason in quick_reasons(policy or quant.current(model), threat):
            warnings.warn(f"unreliable: {reason}")
    test_set = data.load(args.data, split="test", n=args.n, seed=args.seed, root=args.data_root)
    resume = progress_file(args.json) if args.json and group is None else None
    if resume is not None and resume.exists():
        print(f"resuming from {resume} (its finished batches are kept; delete it to start afresh)", file=sys.stderr)
    channels_last = bool(args.channels_last)  # NHWC: faster on CUDA and on CPUs (oneDNN) alike
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with attacks.arithmetic(args.arithmetic), attacks.active_set(args.active_set):
        attacks.arithmetic_in_use(device, policy or quant.current(model))  # bf16 without the hardware: say so now
        record = evaluate(model, test_set, threat, policy=policy, batch_size=args.batch_size, seed=args.seed,
                          passes=args.passes, sanity=args.sanity, model_id=str(args.model),
                          progress=not args.no_progress, protocol=args.protocol, options=options,
                          distributed=group is not None, resume=resume)
    record = record.with_extra(checkpoint_sha256=checkpoint.sha256(weights_file(args.model)), data=args.data,
                               calibration=calibration, channels_last=channels_last)
    if group is not None and not group.is_main:
        return 0  # every rank holds the record; rank 0 prints and writes it
    print(format_record(record))
    if args.json:
        write_record(args.json, record)
        print(f"record: {args.json}")
    failed = record.failed_checks
    if args.strict and (failed or record.unreliable):
        print(f"rqlab: --strict: {'sanity check ' + ', '.join(failed) + ' failed' if failed else 'unreliable'}"
              f" (exit code {STRICT_EXIT})", file=sys.stderr)
        return STRICT_EXIT
    return 0


def progress_file(json_path) -> Path:
    """Where `rqlab eval --json PATH` keeps its finished batches until the record is written."""
    path = Path(json_path)
    return path.with_name(path.name + ".progress")


def activation_bits(policy) -> set[int]:
    """The activation bit-widths a policy uses (w32a4: 4; per layer: every layer's)."""
    if hasattr(policy, "a_bits"):
        return {policy.a_bits}
    if hasattr(policy, "layer_bits"):
        return {policy.layer_bits(name)[1] for name in policy.bits} | {policy.default}
    return set(policy.support())


def missing_ranges(model, bits) -> list[int]:
    """The bit-widths in `bits` (2..16) that some quantized layer has no activation range for."""
    from .. import quant

    need = {b for b in bits if 1 < b < 32}
    have = [set(layer.act.calibrated_bits()) for _, layer in quant.quant_layers(model)]
    return sorted(b for b in need if any(b not in h for h in have))


def write_record(path, record) -> None:
    """Write a Record as JSON atomically (temp file + os.replace)."""
    from ..checkpoint import save_json

    save_json(path, record.to_dict())
