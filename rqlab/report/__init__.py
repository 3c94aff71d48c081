"""Batch reports: run the notebooks over parameter grids with papermill, export each run
to self-contained HTML and write an index page (`rqlab report`).

    >>> summary = run_report("reports/default.yaml", profile="smoke", out="reports/out")
    >>> summary["n_failed"], summary["runs"][0]["results"]        # also in OUT/summary.json

    config.py    the YAML config (schema, parameter precedence, run-ids): load_config, plan
    execute.py   one notebook (the notebook contract): execute_notebook, export_html, ...
    batch.py     the batch and its output folder (layout, reruns): run_report, environment
    reuse.py     which finished runs a rerun keeps: fingerprint, source_state, finished
    html.py      the index page: index_html

A rerun with the same config skips the runs already finished ok with the same parameters,
notebook file and rqlab commit (uncommitted changes count as another commit) and lists them
as reused; `force=True` (--force) reruns them.

papermill, nbconvert and jupyter_client are imported inside the functions that use them:
worker processes (--jobs N) start quickly.
"""
from .batch import DEFAULT_OUT, MARKER, SUMMARY_FORMAT, environment, run_report
from .config import (DEFAULT_CONFIG, RESERVED, ReportConfig, Run, RunEntry, load_config, notebook_parameters,
                     plan, run_id)
from .execute import KERNEL, check_kernel, execute_notebook, export_html, main_figure, read_results
from .html import index_html
from .claims import CLAIMS, claims_table   # claims.py: the papers' claims, the index's first table

__all__ = [
    "DEFAULT_CONFIG", "DEFAULT_OUT", "KERNEL", "MARKER", "RESERVED", "SUMMARY_FORMAT",
    "RunEntry", "ReportConfig", "Run", "load_config", "plan", "notebook_parameters", "run_id",
    "check_kernel", "execute_notebook", "export_html", "main_figure", "read_results",
    "run_report", "environment", "index_html",
]
__all__ += ["CLAIMS", "claims_table"]   # findings.py (python -m rqlab.report.findings): docs/findings.md from summary.json
