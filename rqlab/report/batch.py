"""The batch: run every notebook of a planned config, record each run and write OUT/index.html
and OUT/summary.json (`run_report`).

Output (OUT, default reports/out)
    index.html                  one row per run: status, links, parameters, key numbers,
                                thumbnail, error; environment at the top. No network
                                resources: inline CSS, images as files or data: URIs.
    summary.json                the same data for machines
    <run-id>/<stem>.ipynb       executed notebook (with the failing cell, if it failed)
    <run-id>/<stem>.html        HTML export (lab template, figures embedded as base64;
                                require.js, MathJax, mermaid and widget loaders removed)
    <run-id>/figure.png         the main figure
    <run-id>/*.json             what the notebook wrote
    <run-id>/.rqlab-report      marker: the report owns this folder

Every file is written atomically (temp file in the same folder, then rename). A rerun
into the same OUT deletes a run's folder before running it and, after the batch, the
marked folders of runs that are not in this batch; it refuses to touch a run folder
without the marker. A failing notebook does not stop the batch.
"""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from .. import zoo
from ..extras import require
from ..checkpoint import atomic_write_bytes, save_json
from ..validate import RqlabError, check_int
from .config import DEFAULT_CONFIG, Run, load_config, plan
from .execute import check_kernel, execute_notebook, export_html, main_figure, read_results
from .html import index_html

DEFAULT_OUT = "reports/out"
MARKER = ".rqlab-report"
SUMMARY_FORMAT = "rqlab-report"


def environment() -> dict:
    """rqlab version and git commit, device, torch and Python versions (imports torch)."""
    import torch

    from .. import __version__

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"rqlab": __version__, "git_commit": _git_commit(), "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]  # the repository (rqlab/report/batch.py)
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: no index refresh written by status
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, env=env, text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, env=env,
                               text=True, capture_output=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} (uncommitted changes)" if dirty else commit


# --- the batch ----------------------------------------------------------------------

def run_report(config=DEFAULT_CONFIG, profile: str | None = None, only: str | None = None, jobs: int = 1,
               out=DEFAULT_OUT, show_input: bool = False, cell_progress: bool = False, notebooks_dir=None,
               progress: bool = True) -> dict:
    """Validate, run every notebook of the batch, write OUT/index.html and OUT/summary.json.

    Returns the summary (as in summary.json). Failed notebooks are recorded, not raised;
    RqlabError is raised only for bad input, before anything runs.
    """
    jobs = check_int(jobs, "--jobs", lo=1)
    cfg = load_config(config, notebooks_dir=notebooks_dir)
    profile = cfg.default_profile if profile is None else profile
    runs = plan(cfg, profile, only)
    out = Path(out).resolve()
    _check_out(out, runs)
    check_kernel()
    env = environment()

    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    records = _run_all(runs, out, cfg.notebooks_dir.resolve(), jobs, show_input, cell_progress, progress)
    keep = {r.run_id for r in runs}
    for folder in out.iterdir():  # folders of earlier batches: only those the report marked
        if folder.is_dir() and folder.name not in keep and (folder / MARKER).is_file():
            shutil.rmtree(folder)

    summary = {
        "format": SUMMARY_FORMAT, "version": 1, "environment": env, "config": str(cfg.path), "profile": profile,
        "only": only, "jobs": jobs, "started": started.isoformat(timespec="seconds"),
        "wall_time_s": round(time.perf_counter() - t0, 2), "n_runs": len(records),
        "n_failed": sum(r["status"] != "ok" for r in records), "runs": records,
        "zoo": zoo.headlines(),  # the cards' headline figures (standard protocol), measured by `rqlab zoo measure`
    }
    save_json(out / "summary.json", summary)
    atomic_write_bytes(out / "index.html", index_html(summary).encode())
    return summary


def _check_out(out: Path, runs: list[Run]) -> None:
    if out.exists() and not out.is_dir():
        raise RqlabError(f"--out={out} is a file: give a folder")
    for run in runs:
        folder = out / run.run_id
        if folder.exists() and not (folder / MARKER).is_file():
            raise RqlabError(f"{folder} exists but was not written by rqlab report (no {MARKER} file): "
                             "move it away or choose another --out")


def _prepare(out: Path, run: Run) -> Path:
    """A fresh run folder with the marker (the old one, ours by `_check_out`, is deleted)."""
    folder = out / run.run_id
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_json(folder / MARKER, {"run_id": run.run_id, "notebook": run.notebook, "written_by": "rqlab report"})
    return folder


def _run_all(runs, out: Path, notebooks_dir: Path, jobs: int, show_input: bool, cell_progress: bool,
             progress: bool) -> list[dict]:
    """Run the batch (in `jobs` worker processes when > 1); returns the records in run order."""
    from tqdm.auto import tqdm

    def arguments(run):  # of execute_notebook, after making the run's folder
        folder = _prepare(out, run)
        return (str(notebooks_dir / f"{run.notebook}.ipynb"), str(folder / f"{run.notebook}.ipynb"),
                {**run.params, "output_dir": str(folder)}, str(notebooks_dir), cell_progress)

    records = {}
    bar = tqdm(total=len(runs), desc="report", unit="run", disable=not progress)

    def finish(run, outcome):
        rec = records[run.run_id] = _record(run, out, outcome, show_input)
        if rec["status"] != "ok":
            bar.write(f"failed: {run.run_id}: {rec['error']}")
        bar.update()

    try:
        if jobs == 1:
            for run in runs:
                bar.set_postfix_str(run.run_id)
                finish(run, execute_notebook(*arguments(run)))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: the workers get no forked copy of this process's threads or CUDA state
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(runs)),
                                       mp_context=multiprocessing.get_context("spawn"))
            try:
                futures = {pool.submit(execute_notebook, *arguments(run)): run for run in runs}
                for future in as_completed(futures):
                    try:
                        outcome = future.result()
                    except Exception as e:  # the worker process itself died
                        outcome = {"error": f"{type(e).__name__}: {e}", "traceback": None, "seconds": None}
                    finish(futures[future], outcome)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return [records[r.run_id] for r in runs if r.run_id in records]


def _record(run: Run, out: Path, outcome: dict, show_input: bool) -> dict:
    """Export HTML and thumbnail of a finished run and collect its row of the report."""
    nbformat = require("nbformat", "report")

    folder = out / run.run_id
    ipynb, html_path, png = folder / f"{run.notebook}.ipynb", folder / f"{run.notebook}.html", folder / "figure.png"
    error, trace = outcome["error"], outcome["traceback"]
    files = {"notebook": None, "html": None, "figure": None}
    if ipynb.is_file():
        files["notebook"] = ipynb.relative_to(out).as_posix()
        try:
            export_html(ipynb, html_path, show_input)
            files["html"] = html_path.relative_to(out).as_posix()
            figure = main_figure(nbformat.read(ipynb, as_version=4))
            if figure:
                atomic_write_bytes(png, figure)
                files["figure"] = png.relative_to(out).as_posix()
        except Exception as e:  # a broken export fails this run only
            error = error or f"HTML export failed: {type(e).__name__}: {e}"
    numbers, result_files, warnings = read_results(folder)
    seconds = outcome["seconds"]
    return {"run_id": run.run_id, "notebook": run.notebook, "entry": f"runs[{run.entry.index}]",
            "status": "failed" if error else "ok", "error": error, "traceback": trace,
            "params": run.params, "grid": run.grid_point, "results": numbers, "result_files": result_files,
            "warnings": warnings, "files": files, "seconds": None if seconds is None else round(seconds, 2)}
