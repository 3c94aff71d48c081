"""`rqlab report`: run the notebooks over the parameter grids of a config and write an
HTML report (one self-contained page per run, plus an index).

    rqlab report                                            # reports/default.yaml into reports/out
    rqlab report --profile smoke --jobs 2                   # small and fast, two notebooks at a time
    rqlab report --only 02_lipschitz_error_amplification --show-input

The config's schema, the notebooks' contract and the output layout are described in
rqlab/report/. Exit code 0 when every notebook ran, 1 when one failed (the index and
summary.json are written anyway), 2 for a bad config or option (nothing has run), 130
when interrupted (Ctrl-C, SIGTERM: the index then lists the runs that finished). With
--only, the other runs of an earlier batch in OUT are kept and listed. A rerun skips the
finished runs it would redo identically (same parameters after profile and grid, notebook
file, rqlab source: the git tree under rqlab/ and notebooks/, zoo cards aside, with a hash
of uncommitted changes there; torch and device; files untouched) and lists them as reused;
--force reruns them.
torch and papermill are imported inside run_cli, so registering the parser costs nothing.
"""
from __future__ import annotations

from ..report import DEFAULT_CONFIG, DEFAULT_OUT


def add_cli(subparsers) -> None:
    """Register `rqlab report` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "report", help="run the notebooks over a parameter grid and write an HTML report",
        description="Execute each run of the config with papermill into OUT/RUN-ID/, export it to "
                    "self-contained HTML, and write OUT/index.html and OUT/summary.json. A failing "
                    "notebook does not stop the batch; the exit code is 1 if one failed.")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--profile", default=None,
                   help="a profile of the config, e.g. smoke | quick | full (default: its default_profile)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated notebook stems or run-ids to run (default: all); the other runs "
                        "already in OUT are kept and stay in the index")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="notebooks run in parallel (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"report folder (default {DEFAULT_OUT})")
    p.add_argument("--force", action="store_true",
                   help="rerun every run; by default a finished ok run with the same parameters, notebook file, "
                        "rqlab source (the tree under rqlab/ and notebooks/, the zoo's cards aside; uncommitted "
                        "changes there count as another source, one per set of changes), torch and device is kept "
                        "and listed as reused")
    p.add_argument("--show-input", action="store_true", help="show code cells in the HTML (default: outputs only)")
    p.add_argument("--cell-progress", action="store_true", help="papermill's per-cell progress bar")
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    """Run the batch; print where the index is. Returns 1 if a notebook failed, else 0."""
    from pathlib import Path

    from .. import report

    summary = report.run_report(args.config, profile=args.profile, only=args.only, jobs=args.jobs,
                                out=args.out, show_input=args.show_input, cell_progress=args.cell_progress,
                                force=args.force)
    batch = set(summary["batch"])
    rows = [r for r in summary["runs"] if r["run_id"] in batch]
    failed = [r["run_id"] for r in rows if r["status"] != "ok" or r.get("rerun_error")]
    kept = summary["n_runs"] - len(rows)
    reused = sum(bool(r.get("reused")) for r in rows)
    print(f"{len(rows) - len(failed)}/{len(rows)} runs ok ({summary['profile']} profile, "
          f"{summary['wall_time_s']:.0f} s)" + (f", {reused} reused" if reused else "")
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; {kept} earlier runs kept in the index" if kept else ""))
    print(f"report: {Path(args.out).resolve() / 'index.html'}")
    return 1 if failed else 0
