"""`rqlab train`: natural training at a given precision, with checkpoints and resuming.

    rqlab train --model smallcnn --data fashion-mnist --epochs 2            # ~90% clean accuracy
    rqlab train --bits 4 --out runs/smallcnn-4bit                           # quantization-aware, 4 bits
    rqlab train --bits 4-8 --epochs 10                                      # a random precision per forward
    rqlab train --defense pgd-at --epochs 5                                 # PGD-7 adversarial training
    rqlab train --defense rpt-pgd-at --bits 4-8                             # Double-Win Quant: RPT + RPI
    rqlab train --defense dq --beta 3e-3 --bits w32a4                       # Defensive Quantization
    rqlab train --defense odgq --bits 1                                     # ODG-Q, binary network

The arguments are read into a `rqlab.experiment.RunSpec` (`spec_from_args`) and trained by
`rqlab.train(spec, out)`: the command line is one spelling of a spec, and
`RunSpec.to_argv()` writes it back. Writes OUT/checkpoint.pt, OUT/history.json and
OUT/spec.json after every epoch; re-running the same command resumes from them
(--no-resume starts over). torch is imported inside run_cli, so registering the parser
costs nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..validate import RqlabError, check_int


def add_cli(subparsers) -> None:
    """Register `rqlab train` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train", help="train a model (natural training or a defense) and write a checkpoint",
        description="Train a model at a precision policy; writes OUT/checkpoint.pt and OUT/history.json "
                    "after every epoch and resumes from them when re-run with the same settings.")
    p.add_argument("--model", default="smallcnn", help="model name (default smallcnn)")
    p.add_argument("--data", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    p.add_argument("--data-root", default=None, help="dataset directory (default: rqlab's data root)")
    p.add_argument("--epochs", type=int, default=None, help="default 2")
    p.add_argument("--out", default=None, help="output directory (default runs/MODEL-DATA-DEFENSE-BITS-sSEED)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4")
    p.add_argument("--schedule", default=None, help="step (x0.1 at 50%% and 75%%) | cosine | constant (default step)")
    p.add_argument("--seed", type=int, default=None, help="initial weights and data order (default 0)")
    p.add_argument("--bits", default="fp",
                   help="training precision: fp, 4, w32a4, or a random set such as 4-8 or 4,6,8 "
                        "(a new draw every forward); default fp")
    p.add_argument("--defense", default="natural",
                   help="natural | pgd-at | fgsm-rs | dq | dq-pgd-at | rpt | rpt-pgd-at | rpt-fgsm-rs | odgq "
                        "(default natural; rpt* need a precision set in --bits and build switchable BN)")
    p.add_argument("--eps", type=float, default=None,
                   help="linf radius of adversarial defenses and of --eval-pgd (default 0.1 for (fashion-)mnist, "
                        "else 8/255)")
    p.add_argument("--attack-steps", type=int, default=None, help="PGD steps of *pgd-at (default 7)")
    p.add_argument("--attack-step-size", type=float, default=None,
                   help="PGD step of *pgd-at (default eps / 4: 0.025 at eps 0.1, 2/255 at 8/255)")
    p.add_argument("--alpha", type=float, default=None, help="FGSM step of fgsm-rs and odgq (default 1.25 eps)")
    p.add_argument("--beta", type=float, default=None, help="DQ orthogonality weight (default 1e-3)")
    p.add_argument("--lam", type=float, default=None, help="ODG-Q weight of the variance of domain risks (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of the defense, e.g. --set lam=0.5 (VALUE read as JSON, else as text); "
                        "repeatable")
    p.add_argument("--eval-pgd", type=int, default=0, metavar="N",
                   help="after every epoch, PGD-20 robust accuracy (at --eps) on N test examples (default 0: off)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--augment", action="store_true", default=None,
                   help="random crop (padding 4) and horizontal flip")
    p.add_argument("--n-train", type=int, default=None, help="train on a fixed random subset of N examples")
    p.add_argument("--eval-n", type=int, default=None,
                   help="evaluate on a fixed random subset of N test examples (default: all)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    p.add_argument("--amp", action="store_true", default=None, help="bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC memory format for the model and batches (faster on CPUs too)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step (CUDA only)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes (GPUs, or CPU processes with gloo) of this node: launches "
                        "`torchrun --standalone --nproc-per-node N -m rqlab train ...`; --batch-size stays the "
                        "global batch (docs/distributed.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    p.set_defaults(run=run_cli)


# Training settings: a flag left out keeps RunSpec's default (experiment.DEFAULT_TRAIN).
TRAIN_FLAGS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "seed", "device", "amp",
               "channels_last", "compile", "augment", "n_train", "eval_n")

# --flag -> the defense setting it gives (only settings given on the command line are passed:
# a setting the defense does not have is an error, not silently ignored)
DEFENSE_FLAGS = {"attack_steps": "steps", "attack_step_size": "step_size", "alpha": "alpha", "beta": "beta",
                 "lam": "lam"}


def spec_from_args(args):
    """The RunSpec that `rqlab train ARGS` trains (RqlabError for bad values)."""
    from dataclasses import replace

    from ..experiment import DEFAULT_TRAIN, RunSpec

    config = {key: getattr(args, flag) for flag, key in DEFENSE_FLAGS.items() if getattr(args, flag) is not None}
    for item in args.set:
        key, value = parse_setting(item)
        if key in config and config[key] != value:
            raise RqlabError(f"--set {item} repeats the defense setting {key!r} with another value")
        config[key] = value
    try:
        train = replace(DEFAULT_TRAIN, **{k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None})
        return RunSpec(model=args.model, data=args.data, policy=args.bits, defense=args.defense,
                       defense_config=config, eps=args.eps, train=train, eval_pgd=args.eval_pgd)
    except RqlabError as err:  # "eval_n=0 ..." -> "--eval-n=0 ...": the flag the user typed
        text = str(err)
        for key in TRAIN_FLAGS + ("eval_pgd",):
            if text.startswith(f"{key}=") and getattr(args, key) is not None:
                raise RqlabError(f"--{key.replace('_', '-')}{text[len(key):]}") from None
        raise


def parse_setting(item: str):
    """"lam=0.5" -> ("lam", 0.5): KEY=VALUE with VALUE read as JSON (numbers, true, null), else text."""
    import json

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RqlabError(f"--set {item!r} must be KEY=VALUE, e.g. --set lam=0.5")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def default_out(spec) -> Path:
    """runs/MODEL-DATA-DEFENSE-BITS-sSEED"""
    from ..experiment import policy_spelling

    bits = policy_spelling(spec.policy, spec.seed).replace(",", "_")
    return Path(f"runs/{spec.model}-{spec.data}-{spec.defense}-{bits}-s{spec.seed}")


def kept_checkpoint(out: Path, spec) -> str:
    """What an interrupted run leaves in `out`, and how to go on: one line."""
    import json

    try:
        done = len(json.loads((out / "history.json").read_text()))
    except (OSError, ValueError):
        done = 0
    if not done or not (out / "checkpoint.pt").is_file():
        return f"no epoch finished, no checkpoint kept in {out}; run `{spec.command(out)}` to start again"
    return (f"{out / 'checkpoint.pt'} is kept (epoch {done}/{spec.train.epochs} finished); "
            f"run `{spec.command(out)}` to resume from it")


def run_cli(args) -> int:
    """Train the spec the arguments give, print the final clean test accuracy. Returns 0.

    Raises RqlabError for bad settings (the CLI prints it without a traceback).
    """
    spec = spec_from_args(args)  # every setting is checked before any data is read
    from .. import distributed

    if args.nproc is not None:
        if distributed.under_torchrun():
            raise RqlabError("--nproc launches torchrun: under torchrun, leave it out")
        if args.nproc > 1:
            return distributed.launch(distributed.strip_nproc(args.argv), args.nproc)
    say = print if distributed.is_main() else (lambda *a: None)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    from .. import checkpoint, data, experiment, quant

    out = Path(args.out) if args.out else default_out(spec)
    checkpoint.check_output_dir(out, "--out")  # before any work, not at the first save
    sizes = data.dataset_info(spec.data).sizes
    for flag, n, split in (("--n-train", spec.train.n_train, "train"), ("--eval-n", spec.train.eval_n, "test")):
        if n is not None:  # named as the flag, not as data.load's `n`
            check_int(n, flag, lo=1, hi=sizes[split])
    checkpoint.sweep_temp(out)  # temp files of a killed earlier run
    say(f"{spec.command(out)}")
    t0 = time.perf_counter()
    try:
        model, history = experiment.train(spec, out, data_root=args.data_root, resume=not args.no_resume,
                                          progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"rqlab: interrupted: {kept_checkpoint(out, spec)}", file=sys.stderr)
        return 130
    n_params = sum(p.numel() for p in model.parameters())
    last = history[-1]
    say(f"{spec.model}: {n_params / 1e6:.3f} M parameters, {quant.macs(model) / 1e6:.2f} M MACs/example, "
          f"precision {spec.policy}, defense {spec.defense}")
    say(f"clean test accuracy {100 * last['clean_accuracy']:.2f}% (precision {spec.policy}) "
          f"after {last['epoch']} epochs; training time {last['cumulative_time_s']:.0f}s, "
          f"this run {time.perf_counter() - t0:.0f}s")
    say(f"checkpoint: {out / 'checkpoint.pt'}")
    return 0
