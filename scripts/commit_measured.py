"""Commit each zoo card whose standard-protocol entries `rqlab zoo measure` has written (the
headline, and those at other eps or precisions) and that passes `zoo.standard_problems` (reference budget,
the recipe's n, the card's weights and precision, no higher than any attack or the card's
PGD-20, each record agreeing): the model's store files, alone, one commit per model (its
weights too where the training queue has not committed them, after the queue's own
checks). A card that fails is left uncommitted, the reasons printed for a person to read.
The background measuring queue (scripts/measure_queue.py, started by scripts/background.sh)
runs it after every model it measures.

    .venv/bin/python scripts/commit_measured.py            # commit what is measured and sane
    .venv/bin/python scripts/commit_measured.py --dry-run  # say what it would commit
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rqlab import zoo  # noqa: E402
from zoo_queue import changed, check, finished_progress, git, store_files  # noqa: E402  (git retries while another git command holds the index lock)


def pending(name: str) -> list[str]:
    """Every store file of `name` (weights, card, records) when git sees one of them changed
    or new, else []: a model is committed whole, so that a committed card never names
    weights or records that are not committed."""
    files = store_files(name)
    return files if changed(*files) else []


def problems(name: str) -> list[str]:
    """Why `name`'s pending files are not ones to commit: its standard-protocol entries'
    checks, and, where its weights are not committed yet (a full-budget model the queue
    built), the queue's own (`zoo_queue.check`)."""
    weights = f"rqlab/zoo/store/{name}.pt"
    return check(name) if changed(weights) else zoo.standard_problems(name)


def message(name: str) -> str:
    c, parts = zoo.card(name), []
    entries = [("" if eps is None else f"at eps {eps:g} ", s) for eps, s in zoo.standard_entries(c).items()]
    entries += [(f"at precision {p} ", s) for p, s in zoo.standard_precisions(c).items()]
    for at, s in entries:
        lo, hi = s["robust_ci95"]
        flags = f", flagged: {'; '.join(s['unreliable'])}" if s["unreliable"] else ""
        parts.append(f"{at}{100 * s['robust_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (strongest "
                     f"{s['strongest']}{flags}; {s['wall_time_s'] / 60:.0f} min on {s['device']})")
    return f"zoo: {name} under the standard protocol on {c['standard']['n']} images: " + "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print what would be committed, commit nothing")
    args = ap.parse_args(argv)
    for name in zoo.names(trained_only=True):
        if "standard" not in zoo.card(name) or not (files := pending(name)):
            continue
        why = problems(name)
        if why:
            print(f"{name}: NOT committed: {'; '.join(why)}", flush=True)
            continue
        files += finished_progress(name)  # a progress file committed at a stop, now finished
        if args.dry_run:
            print(f"{name}: would commit {', '.join(files)}: {message(name)}")
            continue
        for step in (["add", "--", *files], ["commit", "-m", message(name), "--", *files]):
            proc = git(*step)
            if proc.returncode != 0:
                print(f"{name}: git {step[0]} failed: {proc.stderr.strip()}", flush=True)
                break
        else:
            print(f"{name}: committed {', '.join(files)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
