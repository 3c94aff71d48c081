"""Train the full-budget zoo (issue 14) in the background, one model at a time, resumable,
committing each model's weights and card as it finishes.

    nohup .venv/bin/python scripts/zoo_queue.py > runs/zoo_queue.log 2>&1 &   # resumes where it stopped
    .venv/bin/python scripts/zoo_queue.py --dry-run                             # the order, and what is built

Order: the models the notebooks use first (03, 05, 06, 01: fp-pgd7; 01, 05, 06: q8), then the
natural ones, cheap (02 and claim (a): fp/a4/dq at three betas; the natural controls of (d)),
then q4/rpt PGD-7 (01, 05) and the rest of the findings' models.

Workers: several queues may run at once (`--worker K`, one per free core): each model is
trained by the first worker that takes its lock (runs/zoo/.locks/NAME.lock, released when
the worker finishes it or dies); the others pass over it to the next model. Each model is trained by
`zoo.build(..., protocol="quick")` (rqlab train's per-epoch checkpoints: a killed queue
resumes at its last epoch), then checked (`zoo.full_budget_problems`): clean accuracy at least 2 points above its
-small variant's (where one exists; not below it where the -small variant saw every
training image) and a plateaued held-out curve (gain <= 2 points over the last 3 epochs). A model that passes is committed alone
(`git commit -- its store files`); one that fails is left uncommitted with the reason
in the log, for a person to read. The standard-protocol cards (1,000 examples for the
adversarial models) are measured afterwards by `rqlab zoo measure`, also resumable.
"""
from __future__ import annotations

import argparse
import fcntl
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rqlab import zoo  # noqa: E402
from rqlab.validate import RqlabError  # noqa: E402

ORDER = ("fmnist-fp-pgd7", "fmnist-q8-pgd7", "fmnist-fp-natural", "fmnist-a4-natural", "fmnist-dq-natural",
         "fmnist-dq-natural-beta1e-3", "fmnist-dq-natural-beta1e-2", "fmnist-q4-natural", "fmnist-q4-pgd7",
         "fmnist-rpt-pgd7", "fmnist-bin-natural", "fmnist-q4-fgsm-rs", "fmnist-odgq-q4", "fmnist-fp-fgsm-rs",
         "fmnist-dq-pgd7", "fmnist-odgq-bin", "fmnist-bin-fgsm-rs", "fmnist-bin-pgd7")
LOCKS = ROOT / "runs" / "zoo" / ".locks"  # one lock file per model: a model trains in one worker at a time


def check(name: str) -> list[str]:
    """Why the built model `name` should not be committed ([] = it is sane): the full-budget
    checks, and those of the standard-protocol entries its card holds (the measuring loop
    may have measured it since it was built; scripts/commit_measured.py asks the same)."""
    return zoo.full_budget_problems(name) + zoo.standard_problems(name)


def store_files(name: str) -> list[str]:
    """Every store file of model `name` (weights, card, standard-protocol records), relative to
    the repository; not a stopped measurement's .progress."""
    return [str(p.relative_to(ROOT)) for p in sorted(zoo.STORE.glob(f"{name}.*")) if not p.name.endswith(".progress")]


def finished_progress(name: str) -> list[str]:
    """The progress files of `name`'s measurements that a session committed at its stop
    (`scripts/background.sh checkpoint`) and that the measurement has since finished and
    removed: their deletion is committed with the model's records."""
    return git("ls-files", "--deleted", "--", f"rqlab/zoo/store/{name}.standard*.progress").stdout.split()


def changed(*files: str) -> bool:
    """Whether git sees one of `files` changed or new."""
    return bool(git("status", "--porcelain", "--", *files).stdout.strip())


def git(*args: str) -> subprocess.CompletedProcess:
    for attempt in range(20):  # another git command may hold the index lock for a moment
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode == 0 or "index.lock" not in proc.stderr:
            return proc
        time.sleep(3)
    return proc


def commit(name: str) -> None:
    files = store_files(name)
    c = zoo.card(name)
    first = c["eval"][0]
    msg = (f"zoo: {name} trained at full budget ({c['epochs']} epochs, {c['training_time_s'] / 3600:.1f} h on "
           f"{c['device']}): clean {100 * first['clean_accuracy']:.1f}%, PGD-20 {100 * first['robust_accuracy']:.1f}%")
    for args in (["add", "--", *files], ["commit", "-m", msg, "--", *files]):
        proc = git(*args)
        if proc.returncode != 0:
            print(f"{name}: git {args[0]} failed: {proc.stderr.strip()}", flush=True)
            return
    print(f"{name}: committed ({', '.join(files)})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"models to train, in order (default: {len(ORDER)} in ORDER)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--dry-run", action="store_true", help="print the order and what is built, train nothing")
    ap.add_argument("--no-commit", action="store_true", help="train and check, commit nothing")
    ap.add_argument("--worker", default="1", help="this worker's label in the log (several may run at once)")
    args = ap.parse_args(argv)
    names = args.names or list(ORDER)
    for n in names:
        zoo.recipe(n)
    built = set(zoo.names(trained_only=True))
    for i, n in enumerate(names, 1):
        state = "built" if n in built else "to train"
        if args.dry_run:
            print(f"[{i}/{len(names)}] {n}: {state}  ({zoo.recipe(n).command})")
            continue
        locked(n, f"[{i}/{len(names)}] {n}", "trained", f"{state} (worker {args.worker})",
               lambda: build_and_commit(n, args.threads, args.no_commit))
    return 0


def build_and_commit(name: str, threads: int | None, no_commit: bool) -> None:
    zoo.build(name, threads=threads, progress=False, protocol="quick", log=lambda m: print(m, flush=True))
    problems = check(name)
    if problems:
        print(f"{name}: NOT committed: {'; '.join(problems)}", flush=True)
    elif not no_commit and changed(*store_files(name)):
        commit(name)


def locked(name: str, head: str, busy: str, start: str, work) -> bool:
    """Run `work()` holding lock `name` (`take`), the log's lines headed `head`: when another
    worker holds it, say it is being `busy` and pass; else say `start`, and print an
    RqlabError of `work` rather than raise it. Returns whether `work` ran to its end."""
    lock = take(name)
    if lock is None:
        print(f"{head}: being {busy} by another worker; next", flush=True)
        return False
    with lock:
        print(f"{head}: {start}", flush=True)
        try:
            work()
        except RqlabError as e:
            print(f"{name}: error: {e}", flush=True)
            return False
    return True


def take(name: str):
    """The open, exclusively locked lock file of model `name`, or None when another worker
    holds it (the lock goes with the file's closing, or with the process)."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    f = open(LOCKS / f"{name}.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


if __name__ == "__main__":
    sys.exit(main())
