"""The model zoo: named, reproducible recipes, their trained checkpoints and one JSON card each.

    >>> from rqlab import zoo
    >>> zoo.names()                               # every recipe, trained here or not
    >>> model = zoo.load("fmnist-q4-pgd7")        # checksum verified, eval mode, its own precision
    >>> zoo.card("fmnist-q4-pgd7")["eval"]        # measured clean and PGD-20 accuracy

A recipe is the argument list of one `rqlab train` run, so every zoo model is reproduced
by a command a user can read (`rqlab zoo show NAME` prints it). `rqlab zoo build NAME`
trains it (resumable: runs/zoo/NAME/checkpoint.pt), calibrates the activation ranges of
2..8 bits that training did not set (post-training quantization), stores the weights
(no optimizer state) in rqlab/zoo/store/NAME.pt, measures clean accuracy on the first
1,000 test examples of the seed-0 subset and PGD-20 accuracy on the first 500 at each
of the recipe's evaluation precisions, and writes the card NAME.json beside it with
the checkpoint's SHA-256. It then audits the card's first row (`audit`): the sanity
checks of METHODS section 6 on the first 100 test examples, with Square (black box) and
a transfer attack from FP beside PGD-20; the lowest of them is the card's "strongest"
figure, and `rqlab zoo list` marks with "!" a model whose PGD-20 a check does not trust.

The Fashion-MNIST recipes are sized for 2 CPU cores: the FP natural model sees all
60,000 training images for 3 epochs, every other recipe a fixed 6,000-example subset for
4 epochs; the CIFAR-10 recipes carry the
paper's hyperparameters for GPU users and are not trained here.
"""
from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..validate import RqlabError

STORE = Path(__file__).parent / "store"
RUNS = Path("runs/zoo")
CLEAN_N, PGD_N = 1000, 500          # test examples of the card's measurements (seed-0 subset)
CALIBRATE_BITS = tuple(range(2, 9))  # PTQ ranges stored with every model
CALIBRATE_N = 1024
AUDIT_N = 100                        # test examples of the card's sanity audit (METHODS section 6)


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    train: tuple[str, ...]             # arguments of `rqlab train`
    eval_bits: tuple[str, ...]         # precisions measured on the card (policy spellings)
    paper: str = ""
    gpu: bool = False                  # a GPU recipe: listed, not trained here
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        return "rqlab train " + " ".join(shlex.quote(a) for a in self.train) + f" --out {RUNS / self.name}"


_FM = ("--model", "smallcnn", "--data", "fashion-mnist", "--seed", "0")
_AT = ("--n-train", "6000", "--epochs", "4", "--eval-pgd", "200")   # adversarial recipes, CPU-sized
_NAT = ("--epochs", "3", "--eval-pgd", "200")
_CIFAR = ("--data", "cifar10", "--epochs", "160", "--lr", "0.1", "--schedule", "step", "--augment",
          "--batch-size", "128", "--seed", "0", "--eval-pgd", "1000")

RECIPES = {r.name: r for r in (
    Recipe("fmnist-fp-natural", "FP SmallCNN, natural training", _FM + _NAT + ("--defense", "natural"),
           ("fp", "8", "4")),
    Recipe("fmnist-fp-pgd7", "FP SmallCNN, PGD-7 adversarial training",
           _FM + _AT + ("--defense", "pgd-at"), ("fp", "8", "6", "4"), "Madry et al. 2018"),
    Recipe("fmnist-fp-fgsm-rs", "FP SmallCNN, FGSM-RS fast adversarial training",
           _FM + _AT + ("--defense", "fgsm-rs"), ("fp",), "Wong et al. 2020"),
    Recipe("fmnist-q4-natural", "4-bit SmallCNN, natural quantization-aware training",
           _FM + _AT + ("--bits", "4", "--defense", "natural"), ("4",)),
    Recipe("fmnist-q4-fgsm-rs", "4-bit SmallCNN, FGSM-RS", _FM + _AT + ("--bits", "4", "--defense", "fgsm-rs"),
           ("4",), "Wong et al. 2020"),
    Recipe("fmnist-q4-pgd7", "4-bit SmallCNN, PGD-7 adversarial training",
           _FM + _AT + ("--bits", "4", "--defense", "pgd-at"), ("4", "3", "5", "6", "8"), "Double-Win Quant"),
    Recipe("fmnist-q8-pgd7", "8-bit SmallCNN, PGD-7 adversarial training",
           _FM + _AT + ("--bits", "8", "--defense", "pgd-at"), ("8", "4", "6")),
    Recipe("fmnist-a4-natural", "FP weights, 4-bit activations, natural training (vanilla quantization)",
           _FM + _AT + ("--bits", "w32a4", "--defense", "natural"), ("w32a4",), "Defensive Quantization"),
    Recipe("fmnist-dq-natural", "FP weights, 4-bit activations, DQ regulariser (beta 3e-3)",
           _FM + _AT + ("--bits", "w32a4", "--defense", "dq", "--beta", "3e-3"), ("w32a4",),
           "Defensive Quantization"),
    Recipe("fmnist-dq-pgd7", "FP weights, 4-bit activations, DQ (beta 3e-3) + PGD-7",
           _FM + _AT + ("--bits", "w32a4", "--defense", "dq-pgd-at", "--beta", "3e-3"), ("w32a4",),
           "Defensive Quantization"),
    Recipe("fmnist-rpt-pgd7", "RPT over 4..8 bits with PGD-7 and switchable BN; RPI at inference",
           _FM + _AT + ("--bits", "4-8", "--defense", "rpt-pgd-at"), ("4-8", "4", "6", "8"), "Double-Win Quant",
           notes="PGD-20 at 4-8 here is the paper's non-adaptive protocol (one random precision per "
                 "batch); EOT and expectation attacks are in docs/findings.md and notebook 05"),
    Recipe("fmnist-odgq-q4", "4-bit SmallCNN, ODG-Q (rqlab's construction)",
           _FM + _AT + ("--bits", "4", "--defense", "odgq"), ("4",), "ODG-Q"),
    Recipe("fmnist-odgq-bin", "binary SmallCNN (b = 1), ODG-Q (rqlab's construction)",
           _FM + _AT + ("--bits", "1", "--defense", "odgq"), ("1",), "ODG-Q"),
    Recipe("cifar10-preactresnet18-pgd7", "PreActResNet-18, FP, PGD-7 (eps 8/255, step 2/255)",
           ("--model", "preactresnet18", "--defense", "pgd-at") + _CIFAR, ("fp",), "Double-Win Quant", gpu=True),
    Recipe("cifar10-preactresnet18-q4-pgd7", "PreActResNet-18, 4 bits, PGD-7",
           ("--model", "preactresnet18", "--bits", "4", "--defense", "pgd-at") + _CIFAR,
           ("4", "3", "5", "6", "7", "8"), "Double-Win Quant", gpu=True),
    Recipe("cifar10-preactresnet18-rpt-pgd7", "PreActResNet-18, RPT over 4..16 bits with PGD-7, RPI",
           ("--model", "preactresnet18", "--bits", "4-16", "--defense", "rpt-pgd-at") + _CIFAR,
           ("4-16",), "Double-Win Quant", gpu=True),
    Recipe("cifar10-wrn34-10-pgd7", "WideResNet-34-10, FP, PGD-7",
           ("--model", "wrn34-10", "--defense", "pgd-at") + _CIFAR, ("fp",), "Madry et al. 2018", gpu=True),
)}


def names(trained_only: bool = False) -> list[str]:
    """Recipe names; with trained_only, those whose card and checkpoint are in the store."""
    return [n for n in RECIPES if not trained_only or _paths(n)[1].is_file()]


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise RqlabError(f"zoo model {name!r} is unknown: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def _paths(name: str) -> tuple[Path, Path]:
    return STORE / f"{name}.pt", STORE / f"{name}.json"


def card(name: str) -> dict:
    """The model's card (recipe, training, measured accuracies, checksum)."""
    r = recipe(name)
    path = _paths(name)[1]
    if not path.is_file():
        raise RqlabError(f"zoo model {name!r} is not trained yet: run `rqlab zoo build {name}`"
                         + (" (a GPU recipe)" if r.gpu else ""))
    return json.loads(path.read_text())


def path(name: str) -> Path:
    """The verified checkpoint file of zoo model `name`."""
    from .. import checkpoint

    c = card(name)
    ckpt = _paths(name)[0]
    if not ckpt.is_file():
        raise RqlabError(f"zoo checkpoint {ckpt} is missing: run `rqlab zoo build {name}`")
    digest = checkpoint.sha256(ckpt)
    if digest != c["sha256"]:
        raise RqlabError(f"zoo checkpoint {ckpt} does not match its card (sha256 {digest[:12]}... != "
                         f"{c['sha256'][:12]}...): the file is corrupt or was changed; restore it with "
                         f"`git checkout -- {ckpt}` or rebuild it with `rqlab zoo build {name} --force`")
    return ckpt


def load(name: str, device="cpu", policy=None):
    """Zoo model `name`, checksum verified, in eval mode at its stored precision
    (or at `policy`, a Policy or a spelling such as "4" or "4-8")."""
    from .. import checkpoint, quant

    model = checkpoint.load_model(path(name), device=device)
    if policy is not None:
        quant.apply(model, quant.parse_policy(policy) if isinstance(policy, str) else policy)
    return model


# ---- building ---------------------------------------------------------------------------

def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rqlab"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(name: str, force: bool = False, device: str = "auto", threads: int | None = None,
          progress: bool = True, log=print) -> dict:
    """Train (or resume) recipe `name`, store its weights, measure it, write its card."""
    from .. import checkpoint, data, quant
    from ..attacks import ThreatModel
    from ..cli import build_parser
    from ..evaluation import evaluate
    from ..training import resolve_device
    from ..cli.train import default_eps

    r = recipe(name)
    ckpt_out, card_out = _paths(name)
    if card_out.is_file() and ckpt_out.is_file() and not force:
        log(f"{name}: already built ({card_out}); --force rebuilds it")
        return card(name)
    run_dir = RUNS / name
    argv = ["train", *r.train, "--out", str(run_dir), "--device", device]
    argv += [] if progress else ["--no-progress"]
    argv += ["--threads", str(threads)] if threads else []
    if force:
        argv.append("--no-resume")
    args = build_parser().parse_args(argv)
    log(f"{name}: {r.command}")
    args.run(args)

    run = checkpoint.load(run_dir / "checkpoint.pt")
    dev = resolve_device(device)
    model = checkpoint.load_model(run_dir / "checkpoint.pt", device=dev)
    data_name = args.data
    calib = data.load(data_name, "train", n=CALIBRATE_N, seed=1)
    missing = sorted(set(CALIBRATE_BITS) - set(_trained_bits(model)))
    if missing and model.config.sbn_bits is None:
        x = calib.x.float().div(255).to(dev)
        quant.calibrate(model, [x[i:i + 256] for i in range(0, len(x), 256)], bits=missing)
    policy = quant.policy_from_dict(run["policy"])
    quant.apply(model, policy)
    payload = {"model": run["model"], "state_dict": model.state_dict(), "policy": run["policy"],
               "train_config": run["train_config"], "hooks": {"name": run["hooks"]["name"],
                                                              "config": run["hooks"]["config"]},
               "history": run["history"], "zoo_name": name}
    checkpoint.save(ckpt_out, payload)

    test = data.load(data_name, "test", n=CLEAN_N, seed=0)
    eps = args.eps if args.eps is not None else default_eps(data_name)
    threat = ThreatModel("pgd", eps=eps, steps=20)
    rows = []
    for spelling in r.eval_bits:
        p = quant.parse_policy(spelling)
        passes = 5 if isinstance(p, quant.RandomPrecision) else 1
        clean = clean_accuracy(model, test, p, passes)
        robust = evaluate(model, test, threat, policy=p, n=PGD_N, passes=passes, progress=progress)
        rows.append({"precision": str(p), "policy": p.to_dict(), "passes": passes,
                     "clean_accuracy": clean, "clean_n": len(test),
                     "pgd20_accuracy": robust["robust_accuracy"], "pgd20_ci95": robust["robust_ci95"],
                     "pgd20_n": robust["n"], "ptq": _is_ptq(p, policy)})
        log(f"  {str(p):>10}: clean {100 * rows[-1]['clean_accuracy']:.1f}%  "
            f"PGD-20 {100 * rows[-1]['pgd20_accuracy']:.1f}%")
    hist = run["history"]
    out = {
        "name": name, "summary": r.summary, "paper": r.paper, "notes": r.notes,
        "recipe": {"train_args": list(r.train), "command": r.command,
                   "train_config": run["train_config"], "defense": run["hooks"]["name"],
                   "defense_config": run["hooks"]["config"], "policy": run["policy"]},
        "seed": run["train_config"]["seed"], "commit": _commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev), "training_time_s": hist[-1]["cumulative_time_s"], "epochs": len(hist),
        "history": hist,
        "calibrated_bits": missing if model.config.sbn_bits is None else [],
        "threat": threat.to_dict(), "eval": rows,
        "sha256": checkpoint.sha256(ckpt_out), "size_bytes": ckpt_out.stat().st_size,
    }
    out["audit"] = audit_row(model, test, threat, quant.policy_from_dict(rows[0]["policy"]), rows[0]["passes"])
    checkpoint.save_json(card_out, out)
    log(f"{name}: stored {ckpt_out} and {card_out}")
    return out


def audit_row(model, data, threat, policy, passes: int = 1, cfg=None) -> dict:
    """The sanity checks of METHODS section 6 for `model` at `policy` under `threat`, on the
    first cfg.n examples of `data` (cfg: a sanity.SanityConfig, default n = AUDIT_N and
    Square with 1,000 queries). Returns {"n", "policy", "passes", "pgd20_accuracy",
    "others" (Square, transfer from FP: accuracy each), "strongest_accuracy" (the lowest of
    them all), "failed" (names of failed checks), "checks"}, JSON-serialisable."""
    import warnings

    from ..evaluation import evaluate
    from ..sanity import SanityConfig, SanityWarning

    cfg = cfg or SanityConfig(n=AUDIT_N)
    with warnings.catch_warnings():  # the failures go into the card (and `zoo list`), not the console
        warnings.simplefilter("ignore", SanityWarning)
        rec = evaluate(model, data, threat, policy=policy, n=cfg.n, passes=passes, sanity=cfg, progress=False)
    checks = rec["sanity"]
    others = next(c for c in checks if c["check"] == "whitebox_vs_blackbox")["others"]
    return {"n": rec["n"], "policy": policy.to_dict(), "passes": passes, "pgd20_accuracy": rec["robust_accuracy"],
            "others": others, "strongest_accuracy": min([rec["robust_accuracy"], *others.values()]),
            "failed": [c["check"] for c in checks if not c["passed"]], "checks": checks}


def audit(name: str, device: str = "cpu", cfg=None, log=print) -> dict:
    """(Re)compute the audit of a built zoo model and write it into its card (atomically;
    the checkpoint and its checksum are untouched). cfg: as `audit_row`. Returns the audit."""
    from .. import checkpoint, data, quant
    from ..attacks import ThreatModel
    from ..cli import build_parser

    c = card(name)
    model = load(name, device=device)
    row = c["eval"][0]
    dataset = build_parser().parse_args(["train", *recipe(name).train]).data  # as `build` reads it
    test = data.load(dataset, "test", n=cfg.n if cfg else AUDIT_N, seed=0)
    threat = ThreatModel("pgd", eps=c["threat"]["eps"], steps=c["threat"]["steps"])  # the card's PGD-20
    c["audit"] = audit_row(model, test, threat, quant.policy_from_dict(row["policy"]), row["passes"], cfg)
    checkpoint.save_json(_paths(name)[1], c)
    a = c["audit"]
    log(f"{name}: PGD-20 {100 * a['pgd20_accuracy']:.1f}%, "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in a["others"].items())
        + f" (n = {a['n']}); failed checks: {', '.join(a['failed']) or 'none'}")
    return a


def clean_accuracy(model, data, policy, passes: int = 1) -> float:
    """Mean over `passes` of the clean accuracy of `model` at `policy` on a Dataset."""
    import torch

    from .. import quant
    from ..models.state import eval_mode
    from ..evaluation import as_tensors, correct_passes, fresh_policy

    x, y = as_tensors(data)
    device = next(model.parameters()).device
    hits = 0
    with quant.using(model, fresh_policy(policy)), eval_mode(model), torch.no_grad():
        for i in range(0, len(x), 500):
            hits += correct_passes(model, x[i:i + 500].to(device), y[i:i + 500].to(device), passes).sum().item()
    return hits / (passes * len(x))


def _trained_bits(model) -> list[int]:
    """Bits whose activation ranges every quantized (not keep_fp) layer already has."""
    from .. import quant

    acts = [layer.act for _, layer in quant.quant_layers(model)]
    return sorted(set.intersection(*(set(a.calibrated_bits()) for a in acts))) if acts else []


def _is_ptq(p, trained) -> bool:
    return p.support() != trained.support() and str(p) != str(trained)


# ---- listing ----------------------------------------------------------------------------

def table() -> str:
    """The zoo as a text table: one line per recipe with its measured numbers."""
    lines = [f"{'name':<34}{'precision':>11}{'clean':>8}{'PGD-20':>8}{'audit':>8}  {'train time':>10}  summary"]
    for n, r in RECIPES.items():
        try:
            c = card(n)
        except RqlabError:
            lines.append(f"{n:<34}{'-':>11}{'-':>8}{'-':>8}{'-':>8}  {'-':>10}  {r.summary}"
                         + (" [GPU recipe, not trained here]" if r.gpu else " [not built]"))
            continue
        first = c["eval"][0]
        lines.append(f"{n:<34}{first['precision']:>11}{100 * first['clean_accuracy']:>7.1f}%"
                     f"{100 * first['pgd20_accuracy']:>7.1f}%{audit_cell(c):>8}  {c['training_time_s'] / 60:>8.1f}m  "
                     f"{r.summary}")
        for row in c["eval"][1:]:
            lines.append(f"{'':<34}{row['precision']:>11}{100 * row['clean_accuracy']:>7.1f}%"
                         f"{100 * row['pgd20_accuracy']:>7.1f}%" + ("  (PTQ)" if row.get("ptq") else ""))
    lines.append(f"audit: the lowest accuracy of PGD-20, Square and transfer from FP on {AUDIT_N} examples, at the "
                 "first precision; '!' = a sanity check failed (see `rqlab zoo show NAME`)")
    return "\n".join(lines)


def audit_cell(c: dict) -> str:
    """'40.0%!' for a card whose audit found its strongest attack at 40% and a failed check."""
    a = c.get("audit")
    if a is None:
        return "-"
    return f"{100 * a['strongest_accuracy']:.1f}%" + ("!" if a["failed"] else "")


def show(name: str) -> str:
    r = recipe(name)
    try:
        c = card(name)
    except RqlabError as e:
        return f"{name}: {r.summary}\nreproduce: {r.command}\n{e}"
    body = {k: v for k, v in c.items() if k != "history"}
    return (f"{name}: {r.summary}\nreproduce: rqlab zoo build {name}   (= {r.command})\n"
            + json.dumps(body, indent=2))


def build_many(which: list[str], force: bool = False, device: str = "auto", threads: int | None = None,
               progress: bool = True) -> int:
    """Build recipes in order (CPU recipes only unless named); returns the number built."""
    targets = which or [n for n, r in RECIPES.items() if not r.gpu]
    for n in targets:
        recipe(n)
    t0 = time.perf_counter()
    for i, n in enumerate(targets, 1):
        print(f"[{i}/{len(targets)}] {n}", flush=True)
        build(n, force=force, device=device, threads=threads, progress=progress)
    print(f"built {len(targets)} model(s) in {(time.perf_counter() - t0) / 60:.1f} min")
    return len(targets)
