"""The report's YAML config: its runs, profiles and grids, checked against the notebooks'
parameters cells, and the run-ids (`load_config`, then `plan`).

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
"""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..extras import require
from ..validate import RqlabError, check_choice

DEFAULT_CONFIG = "reports/default.yaml"
RESERVED = {"output_dir": "the run's folder", "interactive": "False"}  # set by the report itself

_TOP_KEYS = ("notebooks_dir", "default_profile", "params", "profiles", "runs")
_RUN_KEYS = ("notebook", "name", "params", "grid", "profiles")
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_ID = 100           # longer run-ids are cut and get a hash suffix


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
    yaml = require("yaml", "report")

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
    nbformat = require("nbformat", "report")

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
