"""Show that rqlab.train(spec) trains the weights that `rqlab train` trained before the
experiment layer existed: each small run below is trained by the command line of an
earlier commit (default: 848b8ec, the last one before RunSpec) and by rqlab.train with
the equivalent RunSpec, and the two state dicts are compared tensor by tensor.

    .venv/bin/python scripts/same_weights.py [--before COMMIT]     # about a minute on 2 CPU cores

Prints one line per run ("identical" or the first differing tensor) and exits 1 on any
difference. Both trainings run on this machine, so the comparison is exact (bit for bit).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import rqlab
from rqlab.experiment import RunSpec, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = TrainConfig(n_train=1024, eval_n=200, epochs=1, device="cpu")
RUNS = {  # name: (RunSpec, the same run's arguments for the old `rqlab train`)
    "q4-pgd7": (RunSpec(policy="4", defense="pgd-at", train=replace(SMALL, epochs=2), eval_pgd=50),
                ["--bits", "4", "--defense", "pgd-at", "--epochs", "2", "--eval-pgd", "50"]),
    "rpt-pgd7": (RunSpec(policy="4-6", defense="rpt-pgd-at", train=SMALL), ["--bits", "4-6", "--defense", "rpt-pgd-at"]),
    "dq-a4": (RunSpec(policy="w32a4", defense="dq", defense_config={"beta": 3e-3}, train=SMALL),
              ["--bits", "w32a4", "--defense", "dq", "--beta", "3e-3"]),
}


def train_before(argv: list[str], out: Path, tree: Path) -> None:
    code = "import sys; from rqlab.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "train", "--n-train", "1024", "--eval-n", "200", "--epochs", "1",
           "--device", "cpu", "--no-progress", "--out", str(out), *argv]  # a later --epochs wins
    subprocess.run(cmd, cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, check=True,
                   capture_output=True, text=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="848b8ec", help="the commit whose `rqlab train` is the reference")
    args = p.parse_args(argv)
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = tmp / "before"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "rqlab"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        for name, (spec, old_argv) in RUNS.items():
            train_before(old_argv, tmp / f"{name}-before", tree)
            before = torch.load(tmp / f"{name}-before" / "checkpoint.pt", weights_only=True)["state_dict"]
            model, _ = rqlab.train(spec, tmp / f"{name}-now", progress=False, log=None)
            now = model.state_dict()
            bad = [k for k in before if k not in now or not torch.equal(before[k], now[k])]
            bad += [k for k in now if k not in before]
            differ += bool(bad)
            print(f"{name:10} {spec.command()}: " + ("identical weights" if not bad else f"DIFFERENT ({bad[0]} ...)"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
