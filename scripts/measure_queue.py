"""Measure the zoo's standard-protocol cards in the background, the claims' models first,
one model at a time per worker, resumable, committing each measured card that passes its
checks (issue 14).

    .venv/bin/python scripts/measure_queue.py --worker 1 --loop     # as scripts/background.sh runs it
    .venv/bin/python scripts/measure_queue.py --dry-run             # the order, and what is measured

Order: ORDER first (the models of the claims' standard-protocol comparisons,
rqlab.report.standard, and of notebooks 01 and 05), then every other built model in the
zoo's order. Each model gets `zoo.measure_many([name])`: its headline, then its recipe's
extra eps and precisions, each skipped where already measured the same way and resumed
from its .progress file where a stopped run left one. After each model,
scripts/commit_measured.py commits every measured card that passes
`zoo.standard_problems` (one commit per model).

Workers: several may run at once (`--worker K`, one per free core): a model is measured
by the first worker that takes its lock (runs/zoo/.locks/measure-NAME.lock, released when
the worker finishes it or dies); the others pass over it to the next model, so two
workers never write the same progress file. `--loop`: after a pass, wait 10 minutes and
pass again (models the training queue builds meanwhile get measured).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rqlab import zoo  # noqa: E402
from zoo_queue import locked  # noqa: E402

# the binary pair of claim (d) before q8-pgd7's random-precision entry (about 3 h on one core),
# so that a second worker settles the binary verdict while the first measures RPI/RPT
ORDER = ("fmnist-q4-pgd7", "fmnist-odgq-q4", "fmnist-rpt-pgd7", "fmnist-bin-natural", "fmnist-odgq-bin",
         "fmnist-q8-pgd7", "fmnist-q4-fgsm-rs", "fmnist-dq-pgd7", "fmnist-bin-pgd7", "fmnist-bin-fgsm-rs",
         "fmnist-fp-fgsm-rs")
PAUSE_S = 600


def order(built: list[str]) -> list[str]:
    """ORDER's built models, then the other built ones in the zoo's order."""
    return [n for n in ORDER if n in built] + [n for n in built if n not in ORDER]


def unmeasured(name: str) -> list[str]:
    """The standard-protocol entries of `name` (headline, extra eps, extra precisions) that
    its card does not hold yet ([] = fully measured)."""
    c, r = zoo.card(name), zoo.recipe(name)
    missing = [] if "standard" in c else ["headline"]
    have_eps, have_prec = zoo.standard_entries(c), zoo.standard_precisions(c)
    missing += [f"eps {e:g}" for e in r.extra_eps if e not in have_eps]
    missing += [f"precision {p}" for p in r.extra_precisions if p not in have_prec]
    return missing


def measure_and_commit(name: str, no_commit: bool) -> None:
    zoo.measure_many([name], progress=False, channels_last=True, log=lambda m: print(m, flush=True))
    commit = [sys.executable, str(ROOT / "scripts" / "commit_measured.py")] + (["--dry-run"] if no_commit else [])
    subprocess.run(commit, cwd=ROOT, check=False)


def one_pass(worker: str, dry_run: bool = False, no_commit: bool = False) -> int:
    """Measure every model that needs it and is not taken; returns how many were measured."""
    done = 0
    names = order(zoo.names(trained_only=True))
    for i, name in enumerate(names, 1):
        todo = unmeasured(name)
        if not todo:
            continue
        if dry_run:
            print(f"[{i}/{len(names)}] {name}: to measure ({', '.join(todo)})")
            continue
        if locked(f"measure-{name}", f"[{i}/{len(names)}] {name}", "measured",
                  f"measuring {', '.join(todo)} (worker {worker})", lambda: measure_and_commit(name, no_commit)):
            done += 1
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default="1", help="this worker's label in the log (several may run at once)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--loop", action="store_true", help=f"pass again every {PAUSE_S // 60} minutes, forever")
    ap.add_argument("--dry-run", action="store_true", help="print what a pass would measure, measure nothing")
    ap.add_argument("--no-commit", action="store_true", help="measure, commit nothing")
    args = ap.parse_args(argv)
    for n in ORDER:
        zoo.recipe(n)  # a renamed recipe fails here, not silently
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    while True:
        one_pass(args.worker, dry_run=args.dry_run, no_commit=args.no_commit)
        if not args.loop or args.dry_run:
            return 0
        time.sleep(PAUSE_S)


if __name__ == "__main__":
    sys.exit(main())
