"""The batch: run every notebook of a planned config, record each run and write OUT/index.html
and OUT/summary.json (`run_report`).

Output (OUT, default reports/out)
    index.html                  one row per run: status, links, parameters, key numbers,
                                thumbnail, error; environment at the top. No network
                                resources: inline CSS, images as files or data: URIs.
    summary.json                the same data for machines, "claims": the claims table
                                (claims.py), which index.html opens with, and
                                "standard_claims": (a), (b) and (d) from the zoo cards' records
                                (standard.py), the table after it
    <run-id>/<stem>.ipynb       executed notebook (with the failing cell, if it failed)
    <run-id>/<stem>.html        HTML export (lab template, figures embedded as base64;
                                require.js, MathJax, mermaid and widget loaders removed)
    <run-id>/figure.png         the main figure
    <run-id>/*.json             what the notebook wrote
    <run-id>/.rqlab-report      marker: the report owns this folder

Every file is written atomically (temp file in the same folder, then rename), and every
run is written into a hidden staging folder OUT/.<run-id>.new, renamed to OUT/<run-id>
only when complete, so a rerun keeps the earlier results until the new ones are whole.
index.html and summary.json are rewritten after every finished run and list complete
runs only ("in progress" while the batch runs); a kill leaves them agreeing with the
folders, and the next start removes what the killed batch left (temp files, staging
folders). `--only` reruns the named runs and keeps the others (the index lists them
all); a whole batch removes, after it, the marked folders of runs that are not in it.
A rerun that fails where the earlier run was ok keeps the earlier results (the row
notes the failure; the failed run is in OUT/.<run-id>.failed). The report refuses to
touch a run folder without the marker. A failing notebook does not stop the batch.

A rerun skips every finished run it would redo identically: a run folder whose marker says
ok, with the same fingerprint (parameters after profile and grid, the notebook's sha256, the
rqlab source: the git tree under rqlab/ and notebooks/ with a hash of uncommitted changes
there, the zoo's cards aside (reuse.py); torch, device)
and its files as written (reuse.py). Its row is listed again, marked "reused"; the rest
(failed, missing, changed) runs. `force=True` (--force) reruns everything.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

from .. import zoo
from ..extras import require
from ..machine import cpu_model
from ..checkpoint import atomic_write_bytes, check_output_dir, save_json, sweep_temp
from ..validate import RqlabError, check_int
from .claims import claims_table
from .standard import standard_claims
from .config import DEFAULT_CONFIG, Run, load_config, plan
from .execute import check_kernel, execute_notebook, export_html, main_figure, read_results
from .html import index_html
from .reuse import MARKER, finished, fingerprint, seal, source_state

DEFAULT_OUT = "reports/out"
SUMMARY_FORMAT = "rqlab-report"


def environment() -> dict:
    """rqlab version and git commit, device, torch and Python versions, CPU model (imports torch)."""
    import torch

    from .. import __version__

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"rqlab": __version__, "git_commit": _git_commit(), "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model()}


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
               progress: bool = True, force: bool = False, log=print) -> dict:
    """Validate, run every notebook of the batch, write OUT/index.html and OUT/summary.json.

    Returns the summary (as in summary.json). Failed notebooks are recorded, not raised;
    RqlabError is raised only for bad input, before anything runs. The index and summary
    are rewritten after every finished run (marked in progress until the batch ends) and
    list only complete runs: the earlier batch's rows until a run is redone, then the new one.
    Finished runs with the same fingerprint are kept, not rerun (rows marked "reused"),
    unless force; `log` gets the line that says how many.
    """
    jobs = check_int(jobs, "--jobs", lo=1)
    check_output_dir(out, "--out")
    cfg = load_config(config, notebooks_dir=notebooks_dir)
    profile = cfg.default_profile if profile is None else profile
    runs = plan(cfg, profile, only)
    out = Path(out).resolve()
    _check_out(out, runs)
    check_kernel()
    env = environment()
    out.mkdir(parents=True, exist_ok=True)
    _sweep(out)

    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    previous = _previous_rows(out)  # complete runs of earlier batches, by run-id
    done: dict[str, dict] = {}
    notebooks_dir = cfg.notebooks_dir.resolve()
    source = source_state()
    prints = {r.run_id: fingerprint(r, notebooks_dir, source, env, show_input) for r in runs}
    for run in [] if force else runs:
        row = finished(out / run.run_id, prints[run.run_id])
        if row is not None:
            done[run.run_id] = {**row, "reused": True}
    if done:
        log(f"skipped {len(done)} finished runs (same parameters and rqlab source); --force reruns them")
    todo = [r for r in runs if r.run_id not in done]

    zoo_rows = zoo.headlines()
    standard_rows = standard_claims()  # claims (a), (b) and (d) from the cards' records (standard.py)

    def publish(in_progress: bool) -> dict:
        planned = [r.run_id for r in runs]
        order = list(previous) + [i for i in planned if i not in previous]
        if not in_progress and only is None:  # a whole batch: the index is this batch's runs
            order = planned
        rows = [done.get(i) or previous[i] for i in order if i in done or i in previous]
        summary = {
            "format": SUMMARY_FORMAT, "version": 1, "environment": env, "config": str(cfg.path), "profile": profile,
            "only": only, "jobs": jobs, "started": started.isoformat(timespec="seconds"),
            "wall_time_s": round(time.perf_counter() - t0, 2), "in_progress": in_progress,
            "batch": planned, "n_runs": len(rows), "n_failed": sum(r["status"] != "ok" for r in rows), "runs": rows,
            "zoo": zoo_rows,  # the cards' headline figures (standard protocol), measured by `rqlab zoo measure`
            "standard_claims": standard_rows,
        }
        # the papers' claims against the runs' results, the standard protocol's figure where measured (claims.py)
        summary["claims"] = claims_table(out, rows, standard_rows)
        save_json(out / "summary.json", summary)
        atomic_write_bytes(out / "index.html", index_html(summary).encode())
        return summary

    def finish(run: Run, record: dict) -> None:
        done[run.run_id] = record
        publish(True)

    publish(True)
    try:
        if todo:
            _run_all(todo, out, notebooks_dir, jobs, show_input, cell_progress, progress, previous, prints, finish)
    except BaseException:  # interrupted: the index lists the complete runs, no longer in progress
        publish(False)
        raise
    if only is None:  # folders of earlier batches: only those the report marked
        keep = {r.run_id for r in runs}
        for folder in out.iterdir():
            if folder.is_dir() and folder.name not in keep and (folder / MARKER).is_file():
                shutil.rmtree(folder)
    return publish(False)


def _check_out(out: Path, runs: list[Run]) -> None:
    check_output_dir(out, "--out")
    for run in runs:
        folder = out / run.run_id
        if folder.exists() and not (folder / MARKER).is_file():
            raise RqlabError(f"{folder} exists but was not written by rqlab report (no {MARKER} file): "
                             "move it away or choose another --out")


def _previous_rows(out: Path) -> dict[str, dict]:
    """The rows of OUT/summary.json whose run folder is still there (the report's): {run-id: row}."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        rows = summary["runs"] if summary.get("format") == SUMMARY_FORMAT else []
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {r["run_id"]: r for r in rows if isinstance(r, dict) and "run_id" in r
            and (out / str(r["run_id"]) / MARKER).is_file()}


def _staging(out: Path, run_id: str, kind: str = "new") -> Path:
    """Where a run is written before it is complete (`new`), and where its old folder waits
    while the new one is renamed in (`old`): hidden folders beside OUT/<run-id>."""
    return out / f".{run_id}.{kind}"


_STAGING = re.compile(r"^\.(.+)\.(new|old)$")


def _sweep(out: Path) -> None:
    """Clean what a killed batch left: temp files, half-written runs (.<run-id>.new), and a
    swap cut short (.<run-id>.old without <run-id>: it is put back)."""
    sweep_temp(out)
    for folder in sorted(out.iterdir()):
        m = _STAGING.match(folder.name)
        if not folder.is_dir() or not (folder / MARKER).is_file():
            continue
        if m is None:  # a run folder of an earlier batch
            sweep_temp(folder)
            continue
        final = out / m.group(1)
        if m.group(2) == "old" and not final.exists():
            os.rename(folder, final)
        else:
            shutil.rmtree(folder)


def _prepare(out: Path, run: Run) -> Path:
    """A fresh staging folder for the run, with the marker (OUT/<run-id> stays as it is)."""
    folder = _staging(out, run.run_id)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_json(folder / MARKER, {"run_id": run.run_id, "notebook": run.notebook, "written_by": "rqlab report"})
    return folder


def _swap(out: Path, run_id: str) -> None:
    """Rename the complete staging folder to OUT/<run-id>, the old folder out of the way first."""
    final, new, old = out / run_id, _staging(out, run_id), _staging(out, run_id, "old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    if old.exists():
        shutil.rmtree(old)


def _run_all(runs, out: Path, notebooks_dir: Path, jobs: int, show_input: bool, cell_progress: bool,
             progress: bool, previous: dict, prints: dict, on_finish) -> None:
    """Run the batch (in `jobs` worker processes when > 1), each run in its staging folder;
    a finished run is sealed (its marker gets the fingerprint prints[run-id], reuse.seal),
    swapped in and passed to on_finish(run, record). A run that fails
    where an earlier batch's run was ok keeps the earlier results (the row says so)."""
    from tqdm.auto import tqdm

    def arguments(run):  # of execute_notebook, after making the run's staging folder
        folder = _prepare(out, run)
        return (str(notebooks_dir / f"{run.notebook}.ipynb"), str(folder / f"{run.notebook}.ipynb"),
                {**run.params, "output_dir": str(folder)}, str(notebooks_dir), cell_progress)

    bar = tqdm(total=len(runs), desc="report", unit="run", disable=not progress)

    def finish(run, outcome):
        rec = _record(run, out, outcome, show_input)
        seal(_staging(out, run.run_id), run, prints[run.run_id], rec)
        old = previous.get(run.run_id)
        if rec["status"] != "ok" and old is not None and old["status"] == "ok":
            kept = _staging(out, run.run_id, "failed")
            if kept.exists():
                shutil.rmtree(kept)
            os.rename(_staging(out, run.run_id), kept)
            rec = {**old, "rerun_error": f"{rec['error']} (the earlier results are kept; the failed run is in "
                                         f"{kept.name}/)"}
        else:
            _swap(out, run.run_id)
        if rec["status"] != "ok" or rec.get("rerun_error"):
            bar.write(f"failed: {run.run_id}: {rec.get('rerun_error') or rec['error']}")
        on_finish(run, rec)
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
        for run in runs:  # an interrupted run leaves no half-written folder
            if _staging(out, run.run_id).exists():
                shutil.rmtree(_staging(out, run.run_id), ignore_errors=True)


def _record(run: Run, out: Path, outcome: dict, show_input: bool) -> dict:
    """Export HTML and thumbnail of a finished run (in its staging folder) and collect its
    row of the report (links to OUT/<run-id>/, where the folder is swapped in)."""
    nbformat = require("nbformat", "report")

    folder = _staging(out, run.run_id)
    ipynb, html_path, png = folder / f"{run.notebook}.ipynb", folder / f"{run.notebook}.html", folder / "figure.png"
    link = lambda path: f"{run.run_id}/{path.name}"  # noqa: E731
    error, trace = outcome["error"], outcome["traceback"]
    files = {"notebook": None, "html": None, "figure": None}
    if ipynb.is_file():
        files["notebook"] = link(ipynb)
        try:
            export_html(ipynb, html_path, show_input)
            files["html"] = link(html_path)
            figure = main_figure(nbformat.read(ipynb, as_version=4))
            if figure:
                atomic_write_bytes(png, figure)
                files["figure"] = link(png)
        except Exception as e:  # a broken export fails this run only
            error = error or f"HTML export failed: {type(e).__name__}: {e}"
    numbers, result_files, warnings = read_results(folder)
    seconds = outcome["seconds"]
    return {"run_id": run.run_id, "notebook": run.notebook, "entry": f"runs[{run.entry.index}]",
            "status": "failed" if error else "ok", "error": error, "traceback": trace,
            "params": run.params, "grid": run.grid_point, "results": numbers, "result_files": result_files,
            "warnings": warnings, "files": files, "seconds": None if seconds is None else round(seconds, 2),
            "reused": False}
