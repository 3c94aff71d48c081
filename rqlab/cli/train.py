"""`rqlab train`: natural training at a given precision, with checkpoints and resuming.

    rqlab train --model smallcnn --data fashion-mnist --epochs 2            # ~90% clean accuracy
    rqlab train --bits 4 --out runs/smallcnn-4bit                           # quantization-aware, 4 bits
    rqlab train --bits 4-8 --epochs 10                                      # a random precision per forward
    rqlab train --defense pgd-at --epochs 5                                 # PGD-7 adversarial training
    rqlab train --defense rpt-pgd-at --bits 4-8                             # Double-Win Quant: RPT + RPI
    rqlab train --defense dq --beta 3e-3 --bits w32a4                       # Defensive Quantization
    rqlab train --defense odgq --bits 1                                     # ODG-Q, binary network

Writes OUT/checkpoint.pt and OUT/history.json after every epoch; re-running the same
command resumes from them (--no-resume starts over). torch is imported inside run_cli,
so registering the parser costs nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

# smallcnn on Fashion-MNIST, natural training: 2 epochs at lr 0.1 with the step schedule
# reach ~90% clean test accuracy (about a minute per epoch on 2 CPU cores).
DEFAULTS = dict(model="smallcnn", data="fashion-mnist", epochs=2, batch_size=128, lr=0.1, schedule="step")


def add_cli(subparsers) -> None:
    """Register `rqlab train` on an argparse subparsers object."""
    d = DEFAULTS
    p = subparsers.add_parser(
        "train", help="train a model (natural training) and write a checkpoint",
        description="Train a model at a precision policy; writes OUT/checkpoint.pt and OUT/history.json "
                    "after every epoch and resumes from them when re-run with the same settings.")
    p.add_argument("--model", default=d["model"], help=f"model name (default {d['model']})")
    p.add_argument("--data", default=d["data"], help=f"dataset name (default {d['data']})")
    p.add_argument("--data-root", default=None, help="dataset directory (default: rqlab's data root)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"default {d['epochs']}")
    p.add_argument("--out", default=None, help="output directory (default runs/MODEL-DATA-BITS-sSEED)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"default {d['batch_size']}")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"base learning rate (default {d['lr']})")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="default 5e-4")
    p.add_argument("--schedule", default=d["schedule"],
                   help=f"step (x0.1 at 50%% and 75%%) | cosine | constant (default {d['schedule']})")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order (default 0)")
    p.add_argument("--bits", default="fp",
                   help="training precision: fp, 4, w32a4, or a random set such as 4-8 or 4,6,8 "
                        "(a new draw every forward); default fp")
    p.add_argument("--defense", default="natural",
                   help="natural | pgd-at | fgsm-rs | dq | dq-pgd-at | rpt | rpt-pgd-at | rpt-fgsm-rs | odgq "
                        "(default natural; rpt* need a precision set in --bits and build switchable BN)")
    p.add_argument("--eps", type=float, default=None,
                   help="linf radius of adversarial defenses (default 0.1 for (fashion-)mnist, else 8/255)")
    p.add_argument("--attack-steps", type=int, default=7, help="PGD steps of pgd-at (default 7)")
    p.add_argument("--attack-step-size", type=float, default=None,
                   help="PGD step of pgd-at (default 0.025 for eps 0.1, 2/255 for 8/255, else 2.5 eps / steps)")
    p.add_argument("--beta", type=float, default=1e-3, help="DQ orthogonality weight (default 1e-3)")
    p.add_argument("--lam", type=float, default=1.0, help="ODG-Q weight of the variance of domain risks (default 1)")
    p.add_argument("--eval-pgd", type=int, default=0, metavar="N",
                   help="after every epoch, PGD-20 robust accuracy (at --eps) on N test examples (default 0: off)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--augment", action="store_true", help="random crop (padding 4) and horizontal flip")
    p.add_argument("--n-train", type=int, default=None, help="train on a fixed random subset of N examples")
    p.add_argument("--eval-n", type=int, default=None,
                   help="evaluate on a fixed random subset of N test examples (default: all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    """Build data and model, fit, print the final clean test accuracy. Returns 0.

    Raises RqlabError for bad settings (the CLI prints it without a traceback).
    """
    from .. import defenses, models

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    model_name = models.canonical_name(args.model)  # fail before loading any data
    defense = defenses.canonical(args.defense)

    from .. import data, quant
    from ..training import TrainConfig, fit, resolve_device, seed_everything

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
                      device=args.device, amp=args.amp, augment=args.augment, n_train=args.n_train,
                      eval_n=args.eval_n)
    policy = quant.parse_policy(args.bits, seed=cfg.seed)
    hooks = make_hooks(args, defense, policy)
    device = resolve_device(cfg.device)
    spelling = args.bits.strip().lower().replace(',', '_')
    out = Path(args.out or f"runs/{model_name}-{args.data}-{defense}-{spelling}-s{cfg.seed}")

    # Subsets are fixed (seed 0), whatever the run's seed: runs differ in weights and order only.
    train_set = data.load(args.data, split="train", n=cfg.n_train, seed=0, root=args.data_root)
    test_set = data.load(args.data, split="test", n=cfg.eval_n, seed=0, root=args.data_root)
    train_loader = data.Loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment,
                               device=device)
    test_loader = data.Loader(test_set, 500, device=device)

    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    model = models.create(model_name, input_shape=tuple(train_set.input_shape), mean=tuple(train_set.mean),
                          std=tuple(train_set.std), num_classes=train_set.num_classes,
                          sbn_bits=policy.support() if defenses.needs_bits_set(defense) else None)
    quant.apply(model, policy)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{model_name}: {n_params / 1e6:.3f} M parameters, {quant.macs(model) / 1e6:.2f} M MACs/example, "
          f"precision {policy}, defense {hooks.name} | {args.data}: {len(train_set)} train, {len(test_set)} test | device {device}")

    metrics = {}
    if args.eval_pgd:
        metrics["pgd20_acc"] = pgd20_metric(test_set, args.eval_pgd, args.eps or default_eps(args.data), device)
    t0 = time.perf_counter()
    history = fit(model, train_loader, cfg, hooks=hooks, out=out, test_loader=test_loader,
                  resume=not args.no_resume, progress=not args.no_progress, epoch_metrics=metrics)
    last = history[-1]
    print(f"clean test accuracy {100 * last['test_acc']:.2f}% ({len(test_set)} test examples, precision {policy}) "
          f"after {last['epoch']} epochs; training time {last['cumulative_time_s']:.0f}s, "
          f"this run {time.perf_counter() - t0:.0f}s")
    print(f"checkpoint: {out / 'checkpoint.pt'}")
    return 0


def default_eps(data_name: str) -> float:
    """METHODS section 0: linf 0.1 on (Fashion-)MNIST, 8/255 on CIFAR-10/100 and SVHN."""
    return 0.1 if "mnist" in data_name else 8 / 255


def default_train_step(eps: float) -> float | None:
    """METHODS: training step 0.025 at eps 0.1, 2/255 at 8/255; None: 2.5 eps / steps."""
    return {0.1: 0.025, round(8 / 255, 6): 2 / 255}.get(round(eps, 6))


def make_hooks(args, defense: str, policy):
    """The training hooks for `--defense` and its settings (eps, steps, beta, lam, bits)."""
    from .. import defenses, quant
    from ..validate import RqlabError

    eps = args.eps if args.eps is not None else default_eps(args.data)
    step = args.attack_step_size if args.attack_step_size is not None else default_train_step(eps)
    bits = None
    if defenses.needs_bits_set(defense):
        if not isinstance(policy, quant.RandomPrecision):
            raise RqlabError(f"--defense {defense} trains over a precision set: give --bits as a set such as "
                             f"4-8 or 4,6,8 (got --bits {args.bits})")
        bits = policy.choices
    return defenses.build(defense, eps=eps, steps=args.attack_steps, step_size=step, beta=args.beta,
                          lam=args.lam, bits=bits, seed=args.seed)


def pgd20_metric(test_set, n: int, eps: float, device):
    """fn(model) -> PGD-20 robust accuracy (linf eps, METHODS step) on the first n test examples."""
    from ..attacks import ThreatModel
    from ..evaluation import evaluate

    threat = ThreatModel("pgd", eps=eps, steps=20)
    n = min(n, len(test_set))
    return lambda model: evaluate(model, test_set, threat, n=n, progress=False)["robust_accuracy"]
