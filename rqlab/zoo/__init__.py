"""The model zoo: named, reproducible recipes, their trained checkpoints and one JSON card each.

    >>> from rqlab import zoo
    >>> zoo.names()                               # every recipe, trained here or not
    >>> model = zoo.load("fmnist-q4-pgd7-small")        # checksum verified, eval mode, its own precision
    >>> zoo.card("fmnist-q4-pgd7-small")["eval"]        # measured clean and PGD-20 accuracy

A recipe holds the RunSpec of one training run (`rqlab.train(spec)`); the `rqlab train`
command that reproduces it is derived from the spec (`rqlab zoo show NAME` prints it). `rqlab zoo build NAME`
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
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..experiment import RunSpec, TrainConfig
from ..machine import device_name
from ..validate import RqlabError

STORE = Path(__file__).parent / "store"
RUNS = Path("runs/zoo")
GPUS = 4  # the GPU count `rqlab zoo list` shows in the recipes' commands (any N works)
CLEAN_N, PGD_N = 1000, 500          # test examples of the card's measurements (seed-0 subset)
CALIBRATE_BITS = tuple(range(2, 9))  # PTQ ranges stored with every model
CALIBRATE_N = 1024
AUDIT_N = 100                        # test examples of the card's sanity audit (METHODS section 6)
STANDARD_N = 500                     # test examples of the card's headline (the standard protocol)
MEASURE_BATCH = 100                  # ... measured in batches of 100, each kept when it finishes
RANDOM_PASSES = 5                    # stochastic passes scoring a random precision (its mean)


@dataclass(frozen=True)
class Recipe:
    """A named zoo model: the RunSpec that trains it and the precisions its card measures."""

    name: str
    summary: str
    spec: RunSpec
    eval_bits: tuple[str, ...]         # precisions measured on the card (policy spellings)
    paper: str = ""
    gpu: bool = False                  # a GPU recipe: listed, not trained here
    notes: str = ""
    standard_n: int = STANDARD_N       # test examples of the card's headline (`measure`)
    extra_eps: tuple[float, ...] = ()  # the standard protocol also at these eps (card["standard_eps"])
    extra_precisions: tuple[str, ...] = ()  # ... and at these precisions (card["standard_precision"])

    @property
    def command(self) -> str:
        """The `rqlab train` command that trains this recipe (derived from the spec)."""
        return self.spec.command(RUNS / self.name)

    def gpu_command(self, nproc: int = GPUS) -> str:
        """The command that trains this recipe on `nproc` GPUs of one node (torchrun through
        `rqlab train --nproc`; the batch size stays the recipe's global batch)."""
        return f"{self.command} --nproc {nproc}"


def _fmnist(policy: str, defense: str, small: bool = False, **defense_config) -> RunSpec:
    """A Fashion-MNIST SmallCNN recipe with the papers' optimiser (SGD 0.1, momentum 0.9,
    weight decay 5e-4, batch 128, x0.1 at 50% and 75%; METHODS sections 2-5).

    Full budget (issue 14): all 60,000 training images, 15 epochs for the adversarial
    recipes and 10 for the natural ones (quantization-aware and DQ included), with clean
    accuracy on 2,000 and PGD-20 on 1,000 test images after every epoch (the curve that
    shows the plateau). small: the zoo before issue 14, sized for smoke runs on 2 CPU
    cores: a fixed 6,000-example subset for 4 epochs (FP natural: all 60,000 for 3)."""
    natural = defense in ("natural", "dq")
    if small:
        train = TrainConfig(epochs=3) if (natural and policy == "fp") else TrainConfig(epochs=4, n_train=6000)
        eval_pgd = 200
    else:
        # channels_last: oneDNN's convolutions are faster in NHWC on a CPU (0.6-0.8x per PGD-7
        # batch, benchmarks/training_cost.py --formats); the same recipe up to float rounding
        train = TrainConfig(epochs=FULL_EPOCHS[natural], eval_n=2000, channels_last=True)
        eval_pgd = 1000
    return RunSpec(model="smallcnn", data="fashion-mnist", policy=policy, defense=defense,
                   defense_config=defense_config, train=train, eval_pgd=eval_pgd)


FULL_EPOCHS = {True: 10, False: 15}  # natural / adversarial recipes at full budget
# Claim (a) at a small eps (docs/methods.md, "Claim (a) at a small eps"): at eps 0.1 every
# full-budget naturally trained model is at 0% under the standard protocol, a floor where
# DQ's effect cannot show; the cards of claim (a)'s models are measured at this eps too.
SMALL_EPS = 0.03
SMALL_NOTE = ("the -small variant: 6,000 training images for 4 epochs (the zoo before issue 14), kept for "
              "smoke runs")


def _fmnist_pair(name: str, summary: str, policy: str, defense: str, eval_bits: tuple, paper: str = "",
                 notes: str = "", defense_config: dict | None = None) -> tuple:
    """The full-budget recipe `name` and its 6k `-small` variant."""
    defense_config = defense_config or {}
    adversarial = defense not in ("natural", "dq")
    small_notes = "; ".join(n for n in (notes, SMALL_NOTE) if n)
    small = _fmnist(policy, defense, small=True, **defense_config)
    budget = f"{(small.train.n_train or 60_000) // 1000}k images, {small.train.epochs} epochs"
    return (Recipe(name, summary, _fmnist(policy, defense, **defense_config), eval_bits, paper, notes=notes,
                   standard_n=1000 if adversarial else STANDARD_N, extra_eps=_extra_eps(policy, defense),
                   extra_precisions=B_CONTROLS.get(name, ())),
            Recipe(f"{name}-small", f"{summary} ({budget})", small, eval_bits, paper, notes=small_notes))


def _cifar(model: str, policy: str, defense: str, **defense_config) -> RunSpec:
    # the papers' schedule (Double-Win Quant: SGD 0.1, step decay, 160 epochs, augmentation)
    return RunSpec(model=model, data="cifar10", policy=policy, defense=defense, eval_pgd=1000,
                   defense_config=defense_config,
                   train=TrainConfig(epochs=160, lr=0.1, schedule="step", augment=True, batch_size=128))


_FMNIST = (
    ("fmnist-fp-natural", "FP SmallCNN, natural training", "fp", "natural", ("fp", "8", "4")),
    ("fmnist-fp-pgd7", "FP SmallCNN, PGD-7 adversarial training", "fp", "pgd-at", ("fp", "8", "6", "4"),
     "Madry et al. 2018"),
    ("fmnist-fp-fgsm-rs", "FP SmallCNN, FGSM-RS fast adversarial training", "fp", "fgsm-rs", ("fp",),
     "Wong et al. 2020"),
    ("fmnist-q4-natural", "4-bit SmallCNN, natural quantization-aware training", "4", "natural", ("4",)),
    ("fmnist-q4-fgsm-rs", "4-bit SmallCNN, FGSM-RS", "4", "fgsm-rs", ("4",), "Wong et al. 2020"),
    ("fmnist-q4-pgd7", "4-bit SmallCNN, PGD-7 adversarial training", "4", "pgd-at", ("4", "3", "5", "6", "8"),
     "Double-Win Quant"),
    ("fmnist-q8-pgd7", "8-bit SmallCNN, PGD-7 adversarial training", "8", "pgd-at", ("8", "4", "6")),
    ("fmnist-a4-natural", "FP weights, 4-bit activations, natural training (vanilla quantization)", "w32a4",
     "natural", ("w32a4",), "Defensive Quantization"),
    ("fmnist-dq-natural", "FP weights, 4-bit activations, DQ regulariser (beta 3e-3)", "w32a4", "dq", ("w32a4",),
     "Defensive Quantization", "", {"beta": 3e-3}),
    ("fmnist-dq-pgd7", "FP weights, 4-bit activations, DQ (beta 3e-3) + PGD-7", "w32a4", "dq-pgd-at", ("w32a4",),
     "Defensive Quantization", "", {"beta": 3e-3}),
    ("fmnist-rpt-pgd7", "RPT over 4..8 bits with PGD-7 and switchable BN; RPI at inference", "4-8",
     "rpt-pgd-at", ("4-8", "4", "6", "8"), "Double-Win Quant",
     "PGD-20 at 4-8 here is the paper's non-adaptive protocol (one random precision per batch); the card's "
     "headline is the standard protocol's (support ensemble, EOT-PGD, expectation attack)"),
    ("fmnist-odgq-q4", "4-bit SmallCNN, ODG-Q (rqlab's construction)", "4", "odgq", ("4",), "ODG-Q"),
    ("fmnist-odgq-bin", "binary SmallCNN (b = 1), ODG-Q (rqlab's construction)", "1", "odgq", ("1",), "ODG-Q"),
)
# full budget only: the binary controls of finding (d) and the DQ strengths of finding (a)
_FMNIST_FULL_ONLY = (
    ("fmnist-bin-natural", "binary SmallCNN (b = 1), natural training (ODG-Q's control)", "1", "natural", ("1",),
     "ODG-Q"),
    ("fmnist-bin-fgsm-rs", "binary SmallCNN (b = 1), FGSM-RS", "1", "fgsm-rs", ("1",), "ODG-Q"),
    ("fmnist-bin-pgd7", "binary SmallCNN (b = 1), PGD-7 adversarial training", "1", "pgd-at", ("1",), "ODG-Q"),
    ("fmnist-dq-natural-beta1e-3", "FP weights, 4-bit activations, DQ regulariser (beta 1e-3)", "w32a4", "dq",
     ("w32a4",), "Defensive Quantization", "", {"beta": 1e-3}),
    ("fmnist-dq-natural-beta1e-2", "FP weights, 4-bit activations, DQ regulariser (beta 1e-2)", "w32a4", "dq",
     ("w32a4",), "Defensive Quantization", "", {"beta": 1e-2}),
)


# Claim (b) under the standard protocol, each side against the same weights (Double-Win
# Quant; docs/methods.md): the RPT model also at a fixed 8 bits, the fixed 8-bit PGD-7 model
# also under random precision inference over 4..8 (RPI alone)
B_CONTROLS = {"fmnist-rpt-pgd7": ("8",), "fmnist-q8-pgd7": ("4-8",)}


def _extra_eps(policy: str, defense: str) -> tuple[float, ...]:
    """The claim-(a) models (natural FP, vanilla w32a4 and DQ at full budget): SMALL_EPS too."""
    return (SMALL_EPS,) if defense == "dq" or (defense == "natural" and policy in ("fp", "w32a4")) else ()


def _fmnist_recipes():
    for row in _FMNIST:
        yield from _fmnist_pair(*row)
    for name, summary, policy, defense, bits, paper, notes, config in (r + ("", "", None)[len(r) - 5:]
                                                                       for r in _FMNIST_FULL_ONLY):
        yield Recipe(name, summary, _fmnist(policy, defense, **(config or {})), bits, paper, notes=notes,
                     standard_n=STANDARD_N if defense in ("natural", "dq") else 1000,
                     extra_eps=_extra_eps(policy, defense))


RECIPES = {r.name: r for r in (
    *_fmnist_recipes(),
    Recipe("cifar10-preactresnet18-pgd7", "PreActResNet-18, FP, PGD-7 (eps 8/255, step 2/255)",
           _cifar("preactresnet18", "fp", "pgd-at"), ("fp",), "Double-Win Quant", gpu=True),
    Recipe("cifar10-preactresnet18-q4-pgd7", "PreActResNet-18, 4 bits, PGD-7", _cifar("preactresnet18", "4", "pgd-at"),
           ("4", "3", "5", "6", "7", "8"), "Double-Win Quant", gpu=True),
    Recipe("cifar10-preactresnet18-rpt-pgd7", "PreActResNet-18, RPT over 4..16 bits with PGD-7, RPI",
           _cifar("preactresnet18", "4-16", "rpt-pgd-at"), ("4-16",), "Double-Win Quant", gpu=True),
    Recipe("cifar10-preactresnet18-dq-pgd7", "PreActResNet-18, FP weights, 4-bit activations, DQ + PGD-7",
           _cifar("preactresnet18", "w32a4", "dq-pgd-at"), ("w32a4",), "Defensive Quantization", gpu=True,
           notes="beta is rqlab's default (1e-3), not tuned on CIFAR-10"),
    Recipe("cifar10-preactresnet18-odgq-q4", "PreActResNet-18, 4 bits, ODG-Q (rqlab's construction)",
           _cifar("preactresnet18", "4", "odgq"), ("4",), "ODG-Q", gpu=True,
           notes="on N GPUs each rank runs ODG-Q's four domains on its own part of the batch"),
    Recipe("cifar10-wrn34-10-pgd7", "WideResNet-34-10, FP, PGD-7", _cifar("wrn34-10", "fp", "pgd-at"), ("fp",),
           "Madry et al. 2018", gpu=True),
    Recipe("cifar10-wrn34-10-q4-pgd7", "WideResNet-34-10, 4 bits, PGD-7", _cifar("wrn34-10", "4", "pgd-at"),
           ("4", "8"), "Double-Win Quant", gpu=True),
    Recipe("cifar10-wrn34-10-rpt-pgd7", "WideResNet-34-10, RPT over 4..16 bits with PGD-7, RPI",
           _cifar("wrn34-10", "4-16", "rpt-pgd-at"), ("4-16",), "Double-Win Quant", gpu=True),
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
        small = f"{name}-small"
        raise RqlabError(f"zoo model {name!r} is not trained yet: run `rqlab zoo build {name}`"
                         + (" (a GPU recipe)" if r.gpu else "")
                         + (f", or use {small} (6,000 training images, built)"
                            if small in RECIPES and _paths(small)[1].is_file() else ""))
    return json.loads(path.read_text())


def standard_record(name: str, eps: float | None = None, precision: str | None = None):
    """The standard-protocol Record of zoo model `name`'s card (`rqlab zoo measure`: per-example
    outcomes of every attack), the headline's, or (eps) the one at another radius, or
    (precision) the one at another precision; None when the model is not built or not
    measured (there) yet."""
    from ..record import Record

    if name not in names(trained_only=True):
        return None
    c = card(name)
    s = (standard_precisions(c).get(precision) if precision is not None
         else standard_entries(c).get(None if eps is None else float(eps)))
    return Record.from_json((STORE / s["record"]).read_text()) if s else None


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


def is_checkpoint_path(spec) -> bool:
    """True when `spec` reads as a file path (a Path, a folder separator, a .pt/.pth
    suffix, or an existing file or run directory), not a zoo name."""
    if isinstance(spec, os.PathLike):
        return True
    spec = str(spec)
    return "/" in spec or os.sep in spec or spec.endswith((".pt", ".pth")) or Path(spec).expanduser().exists()


def check_spec(spec, field: str = "model"):
    """Check, cheaply, that `spec` names a model: a trained zoo model (its card is read,
    not its weights; returns the name) or an existing checkpoint file or run directory
    holding checkpoint.pt (returns the file's Path). RqlabError naming `field` otherwise."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise RqlabError(f"{field}={spec!r} must be a zoo model name (e.g. fmnist-q4-pgd7-small; see `rqlab zoo list`) "
                         "or the path of a checkpoint file or run directory")
    if not is_checkpoint_path(spec):
        name = str(spec).strip()
        card(name)  # unknown name, or a recipe not trained yet
        return name
    file = Path(spec).expanduser()
    file = file / "checkpoint.pt" if file.is_dir() else file
    if not file.is_file():
        raise RqlabError(f"{field}={str(spec)!r} is not an existing checkpoint file (paths are read relative to "
                         f"{Path.cwd()}); give a zoo model name such as fmnist-q4-pgd7-small or a file written by "
                         "`rqlab train --out DIR` (DIR/checkpoint.pt)")
    return file


def weights_file(spec) -> Path:
    """The checkpoint file `spec` names (see `check_spec`); a zoo model's is checksum verified."""
    checked = check_spec(spec)
    return checked if isinstance(checked, Path) else path(checked)


def load(spec, policy=None, device="cpu"):
    """The model `spec` names, in eval mode: `rqlab.load`, the one loader.

    spec: a zoo model name (checksum verified against its card; `rqlab zoo list`), a
        checkpoint file, or a run directory holding checkpoint.pt (`rqlab train --out`).
    policy: None keeps the stored precision; else a Policy, its dict or a spelling
        ("fp", "4", "w32a4", "4-8").
    """
    from .. import experiment, quant

    model = experiment.restore(weights_file(spec), device=device)
    if policy is not None:
        quant.apply(model, experiment.as_policy(policy))
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
          progress: bool = True, log=print, protocol: str = "standard", options: dict | None = None,
          standard_n: int | None = None) -> dict:
    """Train (or resume) recipe `name`, store its weights, measure it, write its card.
    protocol "standard" (default) then measures the card's headline (`measure`, with
    `options` on `standard_n` examples); "quick" stops after PGD-20 and the audit."""
    from .. import checkpoint, data, experiment, quant
    from ..attacks import ThreatModel
    from ..evaluation import clean_accuracy, evaluate
    from ..record import PROTOCOLS
    from ..training import resolve_device
    from ..validate import check_choice

    r = recipe(name)
    check_choice(protocol, "protocol", PROTOCOLS)
    ckpt_out, card_out = _paths(name)
    if card_out.is_file() and ckpt_out.is_file() and not force:
        log(f"{name}: already built ({card_out}); --force rebuilds it")
        if protocol == "standard":
            measure(name, n=standard_n, device=str(resolve_device(device)), options=options, progress=progress,
                    log=log)
        return card(name)
    if threads:
        import torch

        torch.set_num_threads(threads)
    run_dir = RUNS / name
    spec = r.spec.replace(train={"device": device})
    log(f"{name}: {r.command}")
    model, _ = experiment.train(spec, run_dir, resume=not force, progress=progress, log=log)
    run = checkpoint.load(run_dir / "checkpoint.pt")
    dev = resolve_device(device)
    data_name = spec.data
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
    threat = ThreatModel("pgd", eps=spec.eps, steps=experiment.PGD_EVAL_STEPS)
    rows = []
    for spelling in r.eval_bits:
        p = quant.parse_policy(spelling)
        passes = _passes(p)
        clean = clean_accuracy(model, test, p, passes)
        robust = evaluate(model, test, threat, policy=p, n=PGD_N, passes=passes, progress=progress)
        rows.append({"precision": str(p), "policy": p.to_dict(), "passes": passes,
                     "clean_accuracy": clean, "clean_n": len(test),
                     "robust_accuracy": robust["robust_accuracy"], "robust_ci95": robust["robust_ci95"],
                     "robust_n": robust["n"], "ptq": _is_ptq(p, policy)})
        log(f"  {str(p):>10}: clean {100 * rows[-1]['clean_accuracy']:.1f}%  "
            f"PGD-20 {100 * rows[-1]['robust_accuracy']:.1f}%")
    hist = run["history"]
    out = {
        "name": name, "summary": r.summary, "paper": r.paper, "notes": r.notes,
        "recipe": {"spec": spec.to_dict(), "command": r.command,
                   "train_config": run["train_config"], "defense": run["hooks"]["name"],
                   "defense_config": run["hooks"]["config"], "policy": run["policy"]},
        "seed": run["train_config"]["seed"], "commit": _commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dev), "training_time_s": hist[-1]["cumulative_time_s"], "epochs": len(hist),
        "history": hist,
        "calibrated_bits": missing if model.config.sbn_bits is None else [],
        "threat": threat.to_dict(), "eval": rows,
        "sha256": checkpoint.sha256(ckpt_out), "size_bytes": ckpt_out.stat().st_size,
    }
    out["audit"] = audit_row(model, test, threat, quant.policy_from_dict(rows[0]["policy"]), rows[0]["passes"])
    checkpoint.save_json(card_out, out)
    log(f"{name}: stored {ckpt_out} and {card_out}")
    if protocol == "standard":
        measure(name, n=standard_n, device=str(dev), options=options, force=True, progress=progress, log=log)
    return card(name)


def audit_row(model, data, threat, policy, passes: int = 1, cfg=None) -> dict:
    """The sanity checks of METHODS section 6 for `model` at `policy` under `threat`, on the
    first cfg.n examples of `data` (cfg: a sanity.SanityConfig, default n = AUDIT_N and
    Square with 1,000 queries). Returns {"n", "policy", "passes", "robust_accuracy",
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
    return {"n": rec["n"], "policy": policy.to_dict(), "passes": passes, "robust_accuracy": rec["robust_accuracy"],
            "others": others, "strongest_accuracy": min([rec["robust_accuracy"], *others.values()]),
            "failed": [c["check"] for c in checks if not c["passed"]], "checks": checks}


def audit(name: str, device: str = "cpu", cfg=None, log=print) -> dict:
    """(Re)compute the audit of a built zoo model and write it into its card (atomically;
    the checkpoint and its checksum are untouched). cfg: as `audit_row`. Returns the audit."""
    from .. import checkpoint, data, quant
    from ..attacks import ThreatModel

    c = card(name)
    model = load(name, device=device)
    row = c["eval"][0]
    dataset = recipe(name).spec.data
    test = data.load(dataset, "test", n=cfg.n if cfg else AUDIT_N, seed=0)
    threat = ThreatModel("pgd", eps=c["threat"]["eps"], steps=c["threat"]["steps"])  # the card's PGD-20
    c["audit"] = audit_row(model, test, threat, quant.policy_from_dict(row["policy"]), row["passes"], cfg)
    checkpoint.save_json(_paths(name)[1], c)
    a = c["audit"]
    log(f"{name}: PGD-20 {100 * a['robust_accuracy']:.1f}%, "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in a["others"].items())
        + f" (n = {a['n']}); failed checks: {', '.join(a['failed']) or 'none'}")
    return a


# ---- the standard protocol's headline -------------------------------------------------------

def _eps_key(eps: float) -> str:
    return f"{eps:g}"


def standard_files(name: str, eps: float | None = None, precision: str | None = None) -> tuple[Path, Path]:
    """The record and the progress file of `name`'s standard-protocol measurement: the
    headline's (eps None: the card's threat), the one at another `eps` (Recipe.extra_eps)
    or the one at another `precision` (Recipe.extra_precisions)."""
    stem = (f"{name}.standard-p{precision}" if precision is not None
            else f"{name}.standard" if eps is None else f"{name}.standard-eps{_eps_key(eps)}")
    return STORE / f"{stem}.json", STORE / f"{stem}.progress"


def _passes(policy) -> int:
    from .. import quant

    return RANDOM_PASSES if isinstance(policy, quant.RandomPrecision) else 1


_PRECISION_SPELLING = re.compile(r"^[0-9a-z][0-9a-z,\-]*$")


def check_precision(spelling) -> str:
    """A precision spelling of `quant.parse_policy` ("8", "w32a4", "4-8", "4,6,8"), checked
    (it names a file of the store): returned as written, lower case."""
    from .. import quant

    s = str(spelling).strip().lower()
    if not _PRECISION_SPELLING.match(s):
        raise RqlabError(f"precision={spelling!r}: write a precision as the card does, e.g. 8, w32a4 or 4-8")
    try:
        quant.parse_policy(s)
    except RqlabError as e:
        raise RqlabError(f"precision: {e}") from None   # names the allowed spellings
    return s


def standard_precisions(c: dict) -> dict:
    """The card's standard-protocol entries at other precisions than its first (claim (b)'s
    same-model controls): {spelling: entry}, those measured so far."""
    return dict(c.get("standard_precision") or {})


def standard_entries(c: dict) -> dict:
    """The card's standard-protocol entries: {None: the headline, eps: the entry at eps, ...},
    those measured so far."""
    entries = {None: c["standard"]} if c.get("standard") else {}
    entries.update({float(k): v for k, v in (c.get("standard_eps") or {}).items()})
    return entries


def measure(name: str, n: int | None = None, device: str = "cpu", options: dict | None = None,
            force: bool = False, progress: bool = True, log=print, channels_last: bool = False,
            eps: float | None = None, precision: str | None = None) -> dict:
    """The card's headline: the standard protocol (METHODS section 8) at the card's first
    precision, on the first `n` (default: the recipe's standard_n, 500, or 1,000 for the
    adversarially trained full-budget models) examples of the card's test subset,
    written into the card as card["standard"] (atomically; the weights are untouched) with
    the full record (per-example outcomes of every attack) beside it in
    store/NAME.standard.json. eps: the same protocol at another radius than the card's
    threat (its PGD step by the default rule, `ThreatModel.alpha`), written into
    card["standard_eps"]["EPS"] and store/NAME.standard-epsEPS.json (claim (a) at
    SMALL_EPS). precision: the same protocol at another precision than the card's first
    (a spelling of `quant.parse_policy`; a random one scored over RANDOM_PASSES passes),
    written into card["standard_precision"][SPELLING] and store/NAME.standard-pSPELLING.json
    (claim (b)'s same-model controls, B_CONTROLS). A card already measured with the same n,
    options and weights
    is kept unless `force` (so a stopped `rqlab zoo measure` resumes where it stopped); within
    a card, the finished batches of MEASURE_BATCH examples are kept in
    store/NAME.standard.progress, so a killed measurement resumes at its next batch.
    options: the protocol's settings (`evaluation.STANDARD_OPTIONS`; None = the reference
    AutoAttack). channels_last: the model in NHWC memory format (faster on CPUs and GPUs;
    the same attacks, float rounding aside), recorded in the entry; it does not make a
    measured card stale. Returns the entry."""
    from .. import checkpoint, data, quant
    from ..attacks import ThreatModel
    from ..evaluation import evaluate
    from ..validate import check_float, check_int

    n = recipe(name).standard_n if n is None else check_int(n, "n", 1, CLEAN_N)
    if eps is not None:
        eps = check_float(eps, "eps", 0.0, 1.0, lo_open=True)
    if precision is not None:
        if eps is not None:
            raise RqlabError("eps and precision: give one of them (a measurement varies one thing from the headline)")
        precision = check_precision(precision)
    c = card(name)
    existing = standard_precisions(c).get(precision) if precision is not None else standard_entries(c).get(eps)
    at = f" at precision {precision}" if precision is not None else "" if eps is None else f" at eps {_eps_key(eps)}"
    if existing and not force and existing["n"] == n and existing["sha256"] == c["sha256"] \
            and existing["requested_options"] == (options or {}):
        log(f"{name}: standard protocol{at} already measured on {n} examples; --force remeasures it")
        return existing
    model = load(name, device=device)
    if channels_last:
        import torch

        model = model.to(memory_format=torch.channels_last)
    row = c["eval"][0]
    test = data.load(recipe(name).spec.data, "test", n=CLEAN_N, seed=0)
    t = c["threat"]
    threat = ThreatModel("pgd", norm=t["norm"], eps=t["eps"] if eps is None else eps, steps=t["steps"],
                         step_size=t["step_size"] if eps is None else None, restarts=t["restarts"], seed=t["seed"])
    record_path, progress_path = standard_files(name, eps, precision)  # progress: a stopped run's finished batches
    if force:
        progress_path.unlink(missing_ok=True)
    elif progress_path.exists():
        log(f"{name}: resuming from {progress_path.name}")
    policy = quant.policy_from_dict(row["policy"]) if precision is None else quant.parse_policy(precision)
    passes = row["passes"] if precision is None else _passes(policy)
    rec = evaluate(model, test, threat, policy=policy, n=n, passes=passes,
                   batch_size=MEASURE_BATCH, protocol="standard", options=options, model_id=name, progress=progress,
                   resume=progress_path)
    checkpoint.save_json(record_path, rec.to_dict())
    entry = {"n": rec["n"], "eps": threat.eps, "policy": rec["policy"], "passes": rec["passes"],
             "clean_accuracy": rec["clean_accuracy"], "robust_accuracy": rec["robust_accuracy"],
             "robust_ci95": rec["robust_ci95"], "robust_worst_accuracy": rec["robust_worst_accuracy"],
             "attacks": {a["name"]: a["robust_accuracy"] for a in rec.attacks},
             "time_s": {a["name"]: a["time_s"] for a in rec.attacks}, "strongest": rec["strongest"],
             "unreliable": list(rec.unreliable), "protocol_options": rec["protocol_options"],
             "requested_options": options or {}, "wall_time_s": rec["wall_time_s"],
             "device": device_name(next(model.parameters()).device), "channels_last": channels_last,
             "commit": _commit(),
             "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "sha256": c["sha256"], "record": record_path.name}
    entry = json.loads(json.dumps(entry))  # as it reads back from the card (tuples -> lists)
    c = card(name)  # re-read: written only with what is on disk now
    if precision is not None:
        c.setdefault("standard_precision", {})[precision] = entry
    elif eps is None:
        c["standard"] = entry
    else:
        c.setdefault("standard_eps", {})[_eps_key(eps)] = entry
    checkpoint.save_json(_paths(name)[1], c)
    log(f"{name}: standard protocol{at} {100 * entry['robust_accuracy']:.1f}% "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in entry["attacks"].items())
        + f" (n = {n}, {entry['wall_time_s'] / 60:.1f} min)" + ("  UNRELIABLE" if entry["unreliable"] else ""))
    return entry


def measure_many(which: list[str], n: int | None = None, device: str = "cpu", options: dict | None = None,
                 force: bool = False, progress: bool = True, log=print, channels_last: bool = False) -> int:
    """`measure` each named (default: every built) model in turn, its headline and then each
    of its recipe's extra_eps and extra_precisions; returns how many models."""
    for w in which:
        card(w)  # unknown or unbuilt names fail before any work
    targets = which or names(trained_only=True)
    for i, w in enumerate(targets, 1):
        log(f"[{i}/{len(targets)}] {w}")
        for eps in (None, *recipe(w).extra_eps):
            measure(w, n=n, device=device, options=options, force=force, progress=progress, log=log,
                    channels_last=channels_last, eps=eps)
        for precision in recipe(w).extra_precisions:
            measure(w, n=n, device=device, options=options, force=force, progress=progress, log=log,
                    channels_last=channels_last, precision=precision)
    return len(targets)


FULL_GAIN_OVER_SMALL = 0.02   # clean accuracy a full-budget model must add over its 6k -small variant
FULL_PLATEAU_TOL = 0.02       # and its held-out curve's gain over the last 3 epochs, at most


def full_budget_problems(name: str) -> list[str]:
    """Why the built full-budget model `name` (issue 14) should not be committed ([] = sane):
    clean accuracy at least FULL_GAIN_OVER_SMALL above its -small variant's where that one
    trained on a subset (not below it where it saw every training image, as FP natural's 3
    epochs on 60,000 did), and a plateaued held-out curve (`plateau`, FULL_PLATEAU_TOL)."""
    problems = []
    first = card(name)["eval"][0]
    small = f"{name}-small"
    if small in RECIPES and small in names(trained_only=True):
        base = card(small)["eval"][0]["clean_accuracy"]
        gain = FULL_GAIN_OVER_SMALL if recipe(small).spec.train.n_train else 0.0
        if first["clean_accuracy"] < base + gain:
            problems.append(f"clean accuracy {first['clean_accuracy']:.3f} is not {gain} above {small}'s {base:.3f}")
    p = plateau(name, tol=FULL_PLATEAU_TOL)
    if p["gain"] is None:
        problems.append(f"{p['key']}: too short a curve to see a plateau (more than {p['window']} epochs needed)")
    elif not p["plateaued"]:
        problems.append(f"{p['key']} still rising: +{p['gain']:.3f} over the last {p['window']} epochs")
    return problems


def standard_problems(name: str) -> list[str]:
    """Why the standard-protocol entries of card `name` are not ones to commit ([] = sane; a
    card not measured yet has nothing to check): each measured at the reference budget
    (AutoAttack 100 iterations, Square 5,000 queries) on the recipe's standard_n examples of
    the card's first precision (an entry at another precision: that one, scored over
    `_passes` passes) and current weights; no higher than any of its attacks; no higher
    (beyond a point that float rounding may flip) than the card's own PGD-20 row at its
    precision where the card has one at the card's eps (the protocol's PGD reruns it on the
    same examples with the same seeds); each entry's record beside it, agreeing with it (an
    entry at another eps: at that eps). Each problem of an extra entry names it ("at eps
    0.03: ...", "at precision 8: ...")."""
    from .. import quant

    c = card(name)
    first = c["eval"][0]
    entries = [("" if eps is None else f"at eps {_eps_key(eps)}: ", eps, first["policy"], first["passes"], s)
               for eps, s in standard_entries(c).items()]
    for spelling, s in standard_precisions(c).items():
        policy = quant.parse_policy(spelling)
        entries.append((f"at precision {spelling}: ", None, policy.to_dict(), _passes(policy), s))
    problems = []
    for at, eps, policy, passes, s in entries:
        checks = [
            (s["n"] == recipe(name).standard_n, f"n = {s['n']}, not the recipe's {recipe(name).standard_n}"),
            (s["requested_options"] == {}, f"requested options {s['requested_options']}, not the reference budget"),
            (s["sha256"] == c["sha256"], "measured on other weights (sha256 differs)"),
            (s["protocol_options"].get("n_iter") == 100 and s["protocol_options"].get("n_queries") == 5000,
             f"protocol options {s['protocol_options']}: not AutoAttack's 100 iterations and Square's 5,000 queries"),
            (s["policy"] == policy and s["passes"] == passes,
             "another precision or number of passes than the card's first row" if policy is first["policy"]
             else f"measured at {s['policy']} over {s['passes']} passes, not {policy} over {passes}"),
            (s["robust_accuracy"] <= min(s["attacks"].values()),
             f"headline {s['robust_accuracy']} above an attack's {min(s['attacks'].values())}"),
        ]
        row = next((r for r in c["eval"] if r["policy"] == policy and r["passes"] == passes), None)
        if eps is None and row is not None:
            checks.append((s["robust_accuracy"] <= row["robust_accuracy"] + 0.01,
                           f"headline {s['robust_accuracy']} above the card's PGD-20 {row['robust_accuracy']}"))
        problems += [at + why for ok, why in checks if not ok]
        path = STORE / s["record"]
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{at}its record {path.name} is unreadable: {e}")
            continue
        if record["robust_accuracy"] != s["robust_accuracy"] or len(record["per_example"]["robust"]) != s["n"]:
            problems.append(f"{at}its record {path.name} disagrees with the card (robust accuracy or n)")
        if [a["name"] for a in record["attacks"]] != list(s["attacks"]):
            problems.append(f"{at}its record {path.name} lists other attacks than the card")
        if eps is not None and record["threat"]["eps"] != eps:
            problems.append(f"{at}its record {path.name} is at eps {record['threat']['eps']}")
        if record.get("policy") is not None and record["policy"] != policy:
            problems.append(f"{at}its record {path.name} is at another precision ({record['policy']})")
    return problems


def headline(c: dict) -> tuple[float | None, bool]:
    """(the card's headline robust accuracy, whether a flag says not to trust it): the
    standard protocol's figure where measured, else None."""
    s = c.get("standard")
    return (s["robust_accuracy"], bool(s["unreliable"])) if s else (None, False)


def plateau(name_or_history, window: int = 3, tol: float = 0.01, key: str | None = None) -> dict:
    """Whether a training curve has stopped improving (issue 14's full-budget check): the
    best of the last `window` epochs gains at most `tol` over the best epoch before them.
    key: the held-out metric of the card's history (default: PGD-20 "robust_accuracy" for
    adversarial recipes, "clean_accuracy" for natural ones, whose robust accuracy is ~0).
    Returns {"plateaued", "gain", "key", "window", "tol"}; too short a curve is not one."""
    if isinstance(name_or_history, str):
        history = card(name_or_history)["history"]
        if key is None:
            key = "clean_accuracy" if recipe(name_or_history).spec.defense in ("natural", "dq") else "robust_accuracy"
    else:
        history = name_or_history
    key = key or "robust_accuracy"
    values = [row[key] for row in history if row.get(key) is not None]
    gain = max(values[-window:]) - max(values[:-window]) if len(values) > window else None
    return {"plateaued": gain is not None and gain <= tol, "gain": gain, "key": key, "window": window, "tol": tol}


def headlines() -> list[dict]:
    """Every built model's headline, as `rqlab zoo list` sorts them (the report's zoo table):
    name, summary, precision, clean accuracy, the standard protocol's robust accuracy with
    its interval, n, flags and device (None where not measured yet), and PGD-20 beside it."""
    rows = []
    for n in names(trained_only=True):
        c = card(n)
        first, s = c["eval"][0], c.get("standard") or {}
        rows.append({"name": n, "summary": RECIPES[n].summary, "precision": first["precision"],
                     "clean_accuracy": first["clean_accuracy"], "standard": s.get("robust_accuracy"),
                     "standard_ci95": s.get("robust_ci95"), "standard_n": s.get("n"),
                     "strongest": s.get("strongest"), "unreliable": s.get("unreliable", []),
                     "device": s.get("device"), "pgd20": first["robust_accuracy"]})
    return sorted(rows, key=lambda r: (r["standard"] is None, -(r["standard"] or 0.0), r["name"]))


def _trained_bits(model) -> list[int]:
    """Bits whose activation ranges every quantized (not keep_fp) layer already has."""
    from .. import quant

    acts = [layer.act for _, layer in quant.quant_layers(model)]
    return sorted(set.intersection(*(set(a.calibrated_bits()) for a in acts))) if acts else []


def _is_ptq(p, trained) -> bool:
    return p.support() != trained.support() and str(p) != str(trained)


# ---- listing ----------------------------------------------------------------------------

def table() -> str:
    """The zoo as a text table, built models first, sorted by their headline (the standard
    protocol's robust accuracy; "!" = a flag says not to trust it), with PGD-20 and the
    audit beside it; recipes not built (or not yet measured) follow."""
    lines = [f"{'name':<34}{'precision':>11}{'clean':>8}{'standard [95% CI]':>22}{'PGD-20':>8}{'audit':>8}  "
             f"{'train time':>10}  summary"]
    built, rest = [], []
    for n, r in RECIPES.items():
        try:
            c = card(n)
        except RqlabError:
            rest.append(f"{n:<34}{'-':>11}{'-':>8}{'-':>22}{'-':>8}{'-':>8}  {'-':>10}  {r.summary}"
                        + (" [GPU recipe, not trained here]" if r.gpu else " [not built]"))
            continue
        built.append((headline(c)[0], n, c))
    built.sort(key=lambda t: (t[0] is None, -(t[0] or 0.0), t[1]))
    for _, n, c in built:
        first = c["eval"][0]
        lines.append(f"{n:<34}{first['precision']:>11}{100 * first['clean_accuracy']:>7.1f}%{standard_cell(c):>22}"
                     f"{100 * first['robust_accuracy']:>7.1f}%{audit_cell(c):>8}  {c['training_time_s'] / 60:>8.1f}m  "
                     f"{RECIPES[n].summary}")
        for row in c["eval"][1:]:
            lines.append(f"{'':<34}{row['precision']:>11}{100 * row['clean_accuracy']:>7.1f}%{'':>22}"
                         f"{100 * row['robust_accuracy']:>7.1f}%" + ("  (PTQ)" if row.get("ptq") else ""))
    lines += rest
    lines.append(f"standard: the headline, robust accuracy under the standard protocol (AutoAttack standard + PGD-20; "
                 f"adaptive attacks for random and binary precisions; worst case per example) on the "
                 f"card's first {STANDARD_N} examples (1,000 for adversarially trained full-budget models) at the "
                 "first precision; '!' = flagged unreliable; '-' = not measured yet "
                 "(`rqlab zoo measure NAME`)")
    lines.append(f"audit: the lowest accuracy of PGD-20, Square and transfer from FP on {AUDIT_N} examples, at the "
                 "first precision; '!' = a sanity check failed (see `rqlab zoo show NAME`)")
    gpu = [r for r in RECIPES.values() if r.gpu]
    if gpu:
        lines.append(f"GPU recipes, trained on {GPUS} GPUs of one node (any number works; docs/distributed.md):")
        lines += [f"  {r.gpu_command()}" for r in gpu]
    return "\n".join(lines)


def standard_cell(c: dict) -> str:
    """'48.2% [43.9, 52.6]' (with '!' after the figure when flagged unreliable) for a card's
    headline and its 95% interval; '-' if not measured."""
    value, flagged = headline(c)
    if value is None:
        return "-"
    lo, hi = c["standard"]["robust_ci95"]
    return f"{100 * value:.1f}%" + ("!" if flagged else "") + f" [{100 * lo:.1f}, {100 * hi:.1f}]"


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
        how = f"{r.gpu_command()}   (on {GPUS} GPUs; docs/distributed.md)" if r.gpu else r.command
        return f"{name}: {r.summary}\nreproduce: {how}\n{e}"
    body = {k: v for k, v in c.items() if k != "history"}
    return (f"{name}: {r.summary}\nreproduce: rqlab zoo build {name}   (= {r.command})\n"
            + json.dumps(body, indent=2))


def build_many(which: list[str], force: bool = False, device: str = "auto", threads: int | None = None,
               progress: bool = True, protocol: str = "standard", options: dict | None = None,
               standard_n: int | None = None) -> int:
    """Build recipes in order (CPU recipes only unless named); returns the number built."""
    targets = which or [n for n, r in RECIPES.items() if not r.gpu]
    for n in targets:
        recipe(n)
    t0 = time.perf_counter()
    for i, n in enumerate(targets, 1):
        print(f"[{i}/{len(targets)}] {n}", flush=True)
        build(n, force=force, device=device, threads=threads, progress=progress, protocol=protocol,
              options=options, standard_n=standard_n)
    print(f"built {len(targets)} model(s) in {(time.perf_counter() - t0) / 60:.1f} min")
    return len(targets)
