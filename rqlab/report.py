"""Batch reports: run the notebooks over parameter grids with papermill, export each run
to self-contained HTML and write an index page (`rqlab report`).

    >>> summary = run_report("reports/default.yaml", profile="smoke", out="reports/out")
    >>> summary["n_failed"], summary["runs"][0]["results"]        # also in OUT/summary.json

Config (YAML)
    notebooks_dir: ../notebooks     # optional; relative to the config file (default ../notebooks)
    default_profile: quick          # optional; default: the first profile listed
    params: {seed: 0}               # optional; every run, where its notebook declares the name
    profiles:                       # required; --profile picks one; applied where declared
      smoke: {n_examples: 64, steps: 5}
      full:  {n_examples: 10000, steps: 50}
    runs:                           # required; each entry is one run, or one per grid point
      - notebook: 02_lipschitz_error_amplification   # notebooks_dir/<stem>.ipynb
        name: dq                    # optional prefix of the run-ids (default: the stem)
        params: {model: smallcnn}   # fixed values
        grid: {beta: [0.001, 0.01]} # lists, expanded as a cartesian product
        profiles: {smoke: {n_examples: 32}}          # this entry's overrides per profile

    A run's parameters, later wins: params < runs[i].params < profiles[P] <
    runs[i].profiles[P] < the grid point < output_dir (the run folder) and interactive
    (False, where declared), which the report sets itself. Names under a run entry must
    be parameters of its notebook; names under the top-level `params` and `profiles` apply
    to the notebooks that declare them, and each must be declared by at least one of the
    config's notebooks (checked when the whole config runs, i.e. without --only).

Run-ids: the entry's name, plus `__key=value` per grid parameter (lists as a+b+c,
characters outside [A-Za-z0-9._+=-] as "-"), e.g. `02_lipschitz_error_amplification__beta=0.001`.
They must be unique across the config; give repeated notebooks a `name`.

Everything is validated before anything runs (RqlabError naming the config entry, the
field, the value and what is allowed): unknown keys, notebooks and parameters, grids
that are not lists, values whose type differs from the notebook's default, unknown
profiles, --only names that match no run, bad --jobs.

Notebook contract
    * a cell tagged `parameters` that declares every name the config sets, `output_dir`
      included (and `interactive` if it has widgets: the report passes False);
    * key numbers written as JSON into output_dir (`results.json`; other *.json files are
      read too, their keys prefixed with the file's stem); scalars are flattened
      (nested keys joined by "."), short lists of scalars kept, the rest ignored;
    * the main figure is the first PNG output (inline matplotlib), or the first PNG of a
      cell tagged `main-figure`.
    Notebooks run with the `python3` kernel, which must be this interpreter (checked),
    in notebooks_dir as the working directory.

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

This module imports neither torch nor papermill at import time: worker processes
(--jobs N) start quickly.
"""
from __future__ import annotations

import ast
import base64
import datetime
import html
import itertools
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .checkpoint import file_mode
from .validate import RqlabError, check_choice, check_int

DEFAULT_CONFIG = "reports/default.yaml"
DEFAULT_OUT = "reports/out"
KERNEL = "python3"
MARKER = ".rqlab-report"
SUMMARY_FORMAT = "rqlab-report"
RESERVED = {"output_dir": "the run's folder", "interactive": "False"}  # set by the report itself

_TOP_KEYS = ("notebooks_dir", "default_profile", "params", "profiles", "runs")
_RUN_KEYS = ("notebook", "name", "params", "grid", "profiles")
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MAX_ID = 100           # longer run-ids are cut and get a hash suffix
_INDEX_NUMBERS = 12     # key numbers shown per row of index.html (summary.json has all)

# The lab template loads require.js, MathJax, mermaid and the widget manager from CDNs;
# none is needed for text, tables and PNG figures, and the HTML must work offline.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


# --- config -------------------------------------------------------------------------

@dataclass(frozen=True)
class RunEntry:
    """One item of the config's `runs` list."""
    index: int
    notebook: str
    name: str
    params: dict
    grid: dict            # name -> non-empty list
    profiles: dict        # profile -> {name: value}

    @property
    def label(self) -> str:
        return f"runs[{self.index}] ({self.notebook})"


@dataclass(frozen=True)
class ReportConfig:
    path: Path
    notebooks_dir: Path
    default_profile: str
    params: dict
    profiles: dict        # profile -> {name: value}
    runs: tuple           # RunEntry, ...


@dataclass
class Run:
    """One notebook execution: a run entry at one grid point, in one profile."""
    run_id: str
    notebook: str
    entry: RunEntry
    grid_point: dict
    params: dict = field(default_factory=dict)   # filled by `plan` (output_dir excluded)


def load_config(path, notebooks_dir=None) -> ReportConfig:
    """Read and check a report config (its structure; notebooks are checked by `plan`).

    notebooks_dir overrides the config's `notebooks_dir` (e.g. tests).
    """
    path = Path(path)
    if not path.is_file():
        raise RqlabError(f"config {path} does not exist: pass --config FILE "
                         f"(the default, {DEFAULT_CONFIG}, is relative to the repository root)")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RqlabError(f"config {path} is not valid YAML: {e}") from e
    where = f"config {path}"
    if not isinstance(raw, dict):
        raise RqlabError(f"{where} must be a mapping with keys {', '.join(_TOP_KEYS)}, "
                         f"got {type(raw).__name__}")
    _check_keys(raw, _TOP_KEYS, where)

    params = _mapping(raw.get("params"), f"{where}: params")
    profiles = _mapping(raw.get("profiles"), f"{where}: profiles")
    if not profiles:
        raise RqlabError(f"{where}: profiles is missing or empty: define at least one, "
                         "e.g. profiles: {smoke: {n_examples: 64}}")
    profiles = {str(p): _mapping(v, f"{where}: profiles.{p}") for p, v in profiles.items()}
    default_profile = raw.get("default_profile", next(iter(profiles)))
    check_choice(default_profile, f"{where}: default_profile", list(profiles))

    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise RqlabError(f"{where}: runs must be a non-empty list of entries such as "
                         f"{{notebook: STEM, grid: {{seed: [0, 1]}}}}, got {runs!r}")
    entries = tuple(_run_entry(i, r, profiles, where) for i, r in enumerate(runs))

    if notebooks_dir is None:
        notebooks_dir = raw.get("notebooks_dir", "../notebooks")
        if not isinstance(notebooks_dir, str):
            raise RqlabError(f"{where}: notebooks_dir={notebooks_dir!r} must be a path (a string)")
        notebooks_dir = os.path.normpath(path.parent / notebooks_dir)
    return ReportConfig(path, Path(notebooks_dir), default_profile, params, profiles, entries)


def _run_entry(i: int, raw, profiles: dict, where: str) -> RunEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("notebook"), str):
        raise RqlabError(f"{where}: runs[{i}] must be a mapping with a `notebook: STEM` entry, got {raw!r}")
    notebook = raw["notebook"]
    label = f"runs[{i}] ({notebook})"
    if notebook.endswith(".ipynb") or not _NAME.fullmatch(notebook):
        raise RqlabError(f"{label}: notebook={notebook!r} must be a file stem in the notebooks folder, "
                         "without folder or .ipynb (e.g. 01_precision_transferability)")
    _check_keys(raw, _RUN_KEYS, label)
    name = raw.get("name", notebook)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RqlabError(f"{label}: name={name!r} must be letters, digits, '.', '_' or '-'")
    params = _mapping(raw.get("params"), f"{label}: params")
    grid = _mapping(raw.get("grid"), f"{label}: grid")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise RqlabError(f"{label}: grid.{key} must be a list, got {values!r} "
                             f"(a fixed value goes under params: {{{key}: {values!r}}})")
        if not values:
            raise RqlabError(f"{label}: grid.{key} is an empty list: give at least one value")
        if key in params:
            raise RqlabError(f"{label}: {key} is set in both params and grid: keep one")
    run_profiles = _mapping(raw.get("profiles"), f"{label}: profiles")
    for p, over in run_profiles.items():
        check_choice(p, f"{label}: profiles", list(profiles))
        run_profiles[p] = _mapping(over, f"{label}: profiles.{p}")
    return RunEntry(i, notebook, name, params, grid, run_profiles)


def _check_keys(raw: dict, allowed, where: str) -> None:
    for key in raw:
        if key not in allowed:
            raise RqlabError(f"{where}: unknown key {key!r}: allowed keys are {', '.join(allowed)}")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RqlabError(f"{where} must be a mapping {{name: value}}, got {value!r}")
    return dict(value)


# --- planning -----------------------------------------------------------------------

def plan(config: ReportConfig, profile: str | None = None, only: str | None = None) -> list[Run]:
    """The runs of the batch, validated against the notebooks, with their parameters.

    only: comma-separated notebook stems, entry names or run-ids to keep (None: all).
    Raises RqlabError before anything runs.
    """
    profile = config.default_profile if profile is None else profile
    check_choice(profile, "--profile", list(config.profiles))

    runs, seen = [], {}
    for entry in config.runs:
        keys = list(entry.grid)
        for values in itertools.product(*(entry.grid[k] for k in keys)):
            point = dict(zip(keys, values))
            run = Run(run_id(entry.name, point), entry.notebook, entry, point)
            if run.run_id in seen:
                raise RqlabError(f"{entry.label}: run-id {run.run_id} repeats one of {seen[run.run_id]}: "
                                 "give one of the entries a different `name`")
            seen[run.run_id] = entry.label
            runs.append(run)
    if only is not None:
        runs = _select(runs, only)

    declared = {}   # notebook -> {name: default source}
    for run in runs:
        if run.notebook not in declared:
            declared[run.notebook] = notebook_parameters(config.notebooks_dir, run.notebook, run.entry.label)
        run.params = _merge(config, run, profile, declared[run.notebook])
    if only is None:  # a name set for all notebooks must be used by one of them (catches typos)
        used = set().union(*declared.values())
        sections = [("params", config.params)] + [(f"profiles.{p}", v) for p, v in config.profiles.items()]
        for section, values in sections:
            for key in values:
                if key in RESERVED:
                    raise RqlabError(f"config {config.path}: {section}.{key} is set by the report "
                                     f"({RESERVED[key]}): remove it")
                if key not in used:
                    raise RqlabError(f"config {config.path}: {section}.{key} is not a parameter of any notebook "
                                     f"in runs (their parameters: {', '.join(sorted(used))})")
    return runs


def _select(runs: list[Run], only: str) -> list[Run]:
    names = [n.strip() for n in str(only).split(",") if n.strip()]
    if not names:
        raise RqlabError(f"--only={only!r} names nothing: give notebook stems or run-ids, comma-separated")
    for name in names:
        if not any(name in (r.run_id, r.notebook, r.entry.name) for r in runs):
            raise RqlabError(f"--only: {name!r} matches no run: use a notebook stem "
                             f"({', '.join(sorted({r.notebook for r in runs}))}) or a run-id "
                             f"({', '.join(r.run_id for r in runs)})")
    return [r for r in runs if {r.run_id, r.notebook, r.entry.name} & set(names)]


def _merge(config: ReportConfig, run: Run, profile: str, declared: dict) -> dict:
    """Parameters of `run`, later sources winning (see the module docstring)."""
    entry = run.entry
    # (section as named in messages, values, must every name be the notebook's?)
    sources = [("top-level params", config.params, False), ("params", entry.params, True),
               (f"top-level profiles.{profile}", config.profiles[profile], False),
               (f"profiles.{profile}", entry.profiles.get(profile, {}), True), ("grid", run.grid_point, True)]
    params = {}
    for section, values, strict in sources:
        for key, value in values.items():
            where = f"{entry.label}: {section}.{key}"
            if key in RESERVED:
                raise RqlabError(f"{where} is set by the report ({RESERVED[key]}): remove it")
            if key not in declared:
                if strict:
                    raise RqlabError(f"{where} is not a parameter of notebook {entry.notebook} "
                                     f"(its parameters: {', '.join(sorted(declared))})")
                continue
            _check_type(value, declared[key], where)
            params[key] = value
    if "interactive" in declared:
        params["interactive"] = False  # no widgets in a batch (and none would work offline)
    return params


def notebook_parameters(notebooks_dir, notebook: str, label: str = "") -> dict:
    """{name: default source text} of the notebook's cell tagged `parameters`."""
    path = Path(notebooks_dir) / f"{notebook}.ipynb"
    prefix = f"{label}: " if label else ""
    if not path.is_file():
        present = sorted(p.stem for p in Path(notebooks_dir).glob("*.ipynb"))
        raise RqlabError(f"{prefix}notebook {notebook!r} is unknown: no file {path} "
                         f"(notebooks there: {', '.join(present) or 'none'})")
    import nbformat

    cells = [c for c in nbformat.read(path, as_version=4).cells
             if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise RqlabError(f"{prefix}notebook {path} has no code cell tagged 'parameters': tag the cell "
                         "that sets output_dir and the other parameters")
    declared = _assignments(cells[0].source, f"{prefix}notebook {path}, cell tagged 'parameters'")
    if "output_dir" not in declared:
        raise RqlabError(f"{prefix}notebook {path} does not declare output_dir in its parameters cell: "
                         "the report passes each run's folder as output_dir and reads the JSON written there")
    return declared


def _assignments(source: str, where: str) -> dict:
    """{name: value source} of the top-level `name = value` statements of a cell (what
    papermill can override: it injects a cell of assignments right after it)."""
    # IPython magics and shell escapes are not Python: blank them, keeping line numbers
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise RqlabError(f"{where} is not valid Python (line {e.lineno}: {e.msg})") from e
    declared = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                declared[target.id] = ast.get_source_segment(code, value)
    return declared


def _kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return None


def _check_type(value, default_src: str, where: str) -> None:
    """`value` must be of the same kind as the notebook's default (when that is a literal)."""
    try:
        default = ast.literal_eval(default_src)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return  # an expression (e.g. a function call): nothing to compare with
    want, got = _kind(default), _kind(value)
    if want is None or got is None or want == got:
        return
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = f"; YAML reads {value} as a string: write it with a dot, e.g. 0.001 or 1.0e-3"
        except ValueError:
            pass
    raise RqlabError(f"{where}={value!r} is {got}, but the notebook's default is {default_src} "
                     f"({want}){hint}")


def run_id(name: str, grid_point: dict) -> str:
    """Stable run-id: `name`, then `__key=value` per grid parameter (in config order)."""
    parts = [name] + [f"{k}={_slug(v)}" for k, v in grid_point.items()]
    rid = _SAFE.sub("-", "__".join(parts))
    if len(rid) > _MAX_ID:
        import hashlib

        rid = rid[:_MAX_ID - 9] + "-" + hashlib.sha1(rid.encode()).hexdigest()[:8]
    return rid


def _slug(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_slug(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


# --- execution ----------------------------------------------------------------------

def check_kernel() -> None:
    """The `python3` kernel must run this interpreter (so notebooks import this rqlab).

    jupyter_client replaces a bare `python` in a kernelspec by sys.executable; an absolute
    path elsewhere (e.g. a kernelspec left in ~/.local/share/jupyter) means another Python.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel as e:
        raise RqlabError(f"no Jupyter kernel {KERNEL!r}: run `{sys.executable} -m ipykernel install "
                         "--sys-prefix`") from e
    exe = spec.argv[0] if spec.argv else ""
    if exe in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        return
    if Path(exe).parent.resolve() != Path(sys.executable).parent.resolve():
        raise RqlabError(f"kernel {KERNEL!r} ({spec.resource_dir}/kernel.json) runs {exe}, not this Python "
                         f"({sys.executable}), so the notebooks would not use this rqlab: remove that "
                         f"kernelspec folder, or make its argv start with \"python\" or {sys.executable}")


@contextmanager
def _inline_matplotlib():
    """Kernels inherit the environment: an MPLBACKEND such as Agg would keep figures out of
    the outputs (no PNG, no thumbnail). Force the inline backend while the kernel starts."""
    old = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = old


def execute_notebook(source: str, output: str, params: dict, cwd: str, cell_progress: bool = False) -> dict:
    """Run `source` with papermill into `output` (via a temp file in the same folder).

    Returns {"error": None or "Name: message", "traceback": str or None, "seconds": float}.
    The executed notebook is kept when a cell fails (papermill saves it with the error).
    Runs in worker processes too, so it takes and returns plain values.
    """
    import papermill

    out = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".ipynb", dir=out.parent)
    os.close(fd)
    t0 = time.perf_counter()
    error = trace = None
    try:
        with _inline_matplotlib():
            papermill.execute_notebook(
                source, tmp, parameters=params, kernel_name=KERNEL, language="python", progress_bar=cell_progress,
                cwd=cwd,
                extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no "TCP without encryption" noise
    except papermill.PapermillExecutionError as e:
        error = f"{e.ename}: {_ANSI.sub('', str(e.evalue))} (cell In [{e.exec_count}])"
        trace = _ANSI.sub("", "\n".join(e.traceback))
    except Exception as e:  # kernel died, timeout, bad notebook...: keep going with the other runs
        lines = _ANSI.sub("", str(e)).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"
        trace = "\n".join(lines)
    finally:
        if os.path.exists(tmp) and os.path.getsize(tmp) > 0:  # papermill wrote it (also when a cell failed)
            os.chmod(tmp, file_mode())
            os.replace(tmp, out)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    return {"error": error, "traceback": trace, "seconds": time.perf_counter() - t0}


def export_html(ipynb, html_path, show_input: bool = False) -> Path:
    """Write the executed notebook as self-contained HTML (figures inline, no CDN scripts)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    log = logging.getLogger("rqlab.report.nbconvert")
    log.setLevel(logging.ERROR)  # not "Alternative text is missing" for every matplotlib figure
    exporter = HTMLExporter(
        log=log, template_name="lab", template_file="rqlab_offline.html.j2",
        extra_loaders=[jinja2.DictLoader({"rqlab_offline.html.j2": _OFFLINE_TEMPLATE})],
        embed_images=True, exclude_input=not show_input)
    body, _ = exporter.from_notebook_node(nbformat.read(ipynb, as_version=4))
    return _write(html_path, body.encode())


def main_figure(nb) -> bytes | None:
    """PNG bytes of the notebook's main figure: the first PNG output of a cell tagged
    `main-figure`, else the first PNG output; None if there is none."""
    def pngs(cells):
        for cell in cells:
            for out in cell.get("outputs", []):
                data = out.get("data", {}).get("image/png")
                if data:
                    yield base64.b64decode(data if isinstance(data, str) else "".join(data))

    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "main-figure" in c.get("metadata", {}).get("tags", [])]
    return next(pngs(tagged), None) or next(pngs(code), None)


def read_results(run_dir) -> tuple[dict, list[str], list[str]]:
    """Flattened key numbers from the *.json files in run_dir (results.json first).

    Returns (numbers, file names, warnings). Keys of files other than results.json are
    prefixed with the file's stem.
    """
    numbers, files, warnings = {}, [], []
    paths = sorted(Path(run_dir).glob("*.json"), key=lambda p: (p.name != "results.json", p.name))
    for path in paths:
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            warnings.append(f"{path.name} unreadable: {e}")
            continue
        files.append(path.name)
        _flatten(obj, "" if path.name == "results.json" else path.stem, numbers)
    return numbers, files, warnings


def _flatten(obj, prefix: str, out: dict, max_list: int = 8) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, max_list)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        out[prefix or "value"] = obj
    elif isinstance(obj, list) and len(obj) <= max_list and all(
            v is None or isinstance(v, (bool, int, float, str)) for v in obj):
        out[prefix or "value"] = obj


def _write(path, data: bytes) -> Path:
    from .checkpoint import atomic_write

    return atomic_write(path, lambda f: f.write(data))


def _write_json(path, obj) -> Path:
    return _write(path, (json.dumps(obj, indent=2) + "\n").encode())




def environment() -> dict:
    """rqlab version and git commit, device, torch and Python versions (imports torch)."""
    import torch

    from . import __version__

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"rqlab": __version__, "git_commit": _git_commit(), "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
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
    }
    _write_json(out / "summary.json", summary)
    _write(out / "index.html", index_html(summary).encode())
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
    _write_json(folder / MARKER, {"run_id": run.run_id, "notebook": run.notebook, "written_by": "rqlab report"})
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
    import nbformat

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
                _write(png, figure)
                files["figure"] = png.relative_to(out).as_posix()
        except Exception as e:  # a broken export fails this run only
            error = error or f"HTML export failed: {type(e).__name__}: {e}"
    numbers, result_files, warnings = read_results(folder)
    seconds = outcome["seconds"]
    return {"run_id": run.run_id, "notebook": run.notebook, "entry": f"runs[{run.entry.index}]",
            "status": "failed" if error else "ok", "error": error, "traceback": trace,
            "params": run.params, "grid": run.grid_point, "results": numbers, "result_files": result_files,
            "warnings": warnings, "files": files, "seconds": None if seconds is None else round(seconds, 2)}


# --- index.html ---------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .4em; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .5em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
table.env { width: auto; margin-bottom: 1.5em; }
table.env th, table.env td { border: none; padding: .1em .8em .1em 0; background: none; }
.ok { color: #176f2c; font-weight: 600; }
.failed { color: #b00020; font-weight: 600; }
.small { font-size: .9em; color: #444; }
.kv { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; white-space: nowrap; }
.grid { font-weight: 600; }
img.thumb { max-width: 260px; max-height: 180px; border: 1px solid #ddd; }
pre.error { color: #b00020; white-space: pre-wrap; margin: .3em 0; font-size: .85em; }
details pre { font-size: .8em; white-space: pre-wrap; max-width: 70em; }
"""


def index_html(summary: dict) -> str:
    """The report's index page: plain HTML, inline CSS, relative links only."""
    e = html.escape
    env = summary["environment"]
    n, failed = summary["n_runs"], summary["n_failed"]
    head = [("rqlab", env["rqlab"]), ("git commit", env["git_commit"] or "unknown"), ("device", env["device"]),
            ("torch", env["torch"]), ("python", env["python"]), ("profile", summary["profile"]),
            ("config", summary["config"]), ("runs", f"{n} ({failed} failed)" if failed else f"{n}, all ok"),
            ("wall time", f"{summary['wall_time_s']:.0f} s"), ("date", summary["started"])]
    rows = "\n".join(_index_row(r) for r in summary["runs"])
    env_rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in head)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>rqlab report ({e(summary['profile'])})</title>
<style>{_CSS}</style>
</head>
<body>
<h1>rqlab report</h1>
<table class="env">
{env_rows}
</table>
<table>
<thead><tr><th>run</th><th>figure</th><th>parameters</th><th>key numbers</th><th>files</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="small">Machine-readable: <a href="summary.json">summary.json</a>.</p>
</body>
</html>
"""


def _index_row(r: dict) -> str:
    e = html.escape
    files = r["files"]
    href = {k: quote(v, safe="/=+") for k, v in files.items() if v}
    status = f'<span class="{"ok" if r["status"] == "ok" else "failed"}">{e(r["status"])}</span>'
    run = f'{status}<br><span class="kv">{e(r["run_id"])}</span>'
    if r["seconds"] is not None:
        run += f'<br><span class="small">{r["seconds"]:.1f} s</span>'
    if r["error"]:
        run += f'<pre class="error">{e(r["error"])}</pre>'
        if r["traceback"]:
            run += f"<details><summary>traceback</summary><pre>{e(r['traceback'])}</pre></details>"
    figure = ""
    if "figure" in href:
        img = f'<img class="thumb" src="{href["figure"]}" alt="main figure of {e(r["run_id"])}">'
        figure = f'<a href="{href["html"]}">{img}</a>' if "html" in href else img
    params = "<br>".join(
        f'<span class="kv{" grid" if k in r["grid"] else ""}">{e(k)} = {e(_fmt(v))}</span>'
        for k, v in r["params"].items())
    items = list(r["results"].items())
    numbers = "<br>".join(f'<span class="kv">{e(k)} = {e(_fmt(v))}</span>' for k, v in items[:_INDEX_NUMBERS])
    if len(items) > _INDEX_NUMBERS:
        numbers += f'<br><span class="small">and {len(items) - _INDEX_NUMBERS} more in summary.json</span>'
    if not items:
        numbers = '<span class="small">no JSON written</span>'
    for w in r["warnings"]:
        numbers += f'<br><span class="small">{e(w)}</span>'
    links = [f'<a href="{href[k]}">{label}</a>' for k, label in (("html", "HTML"), ("notebook", "notebook"))
             if k in href]
    return (f"<tr><td>{run}</td><td>{figure}</td><td>{params}</td><td>{numbers}</td>"
            f"<td>{'<br>'.join(links)}</td></tr>")


def _fmt(value) -> str:
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)
