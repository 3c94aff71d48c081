"""Which finished runs a rerun of `rqlab report` may keep instead of recomputing.

Every finished run's marker (OUT/<run-id>/.rqlab-report) holds, beside the run's row of the
index, its fingerprint and the sha256 of each file of the folder:

    {"run_id": ..., "notebook": ..., "written_by": "rqlab report", "status": "ok",
     "fingerprint": {"params": ..., "notebook": STEM, "notebook_sha256": ..., "source": ...,
                     "torch": ..., "device": ..., "python": ..., "show_input": ...},
     "files": {"results.json": SHA256, ...}, "record": {the row of summary.json}}

A rerun keeps (`finished`) a run whose marker says ok with the same fingerprint and whose
files are exactly the listed ones, unchanged; anything else (failed, missing, other
parameters after profile and grid, an edited notebook, another rqlab source or environment, a
file added, removed or edited in the folder) is rerun. `--force` reruns everything.

The source (`source_state`) is what the runs execute, not the commit it came with: a hash of
the git tree's entries under rqlab/ and notebooks/ (path, mode and blob id), so that a commit
elsewhere (docs, tests, scripts) keeps every finished run, and a findings batch of several
hours can be resumed in a later session once the last commit was only a measured card.
The zoo store's files other than the weights (cards, standard-protocol records, the
progress files of measurements a session's stop commits) are left out: measuring rewrites
them (a headline, an audit) without touching the weights, and no run reads what it adds (a
run reads a card's recipe, history and device, which change only with the weights, *.pt,
which are in). So are the report's modules that the batch runs after the runs, on every
batch, reused runs included (_AFTER_RUNS: the claims, the standard-protocol pairs, the index
and findings pages, the zoo's curves): no run imports them. Uncommitted changes under rqlab/ or notebooks/ (tracked or untracked, not
ignored; the store's files other than weights aside) add "+dirty." and a hash of
those changes (each changed path with its status and content), so the state differs from the
clean one and from any other set of changes, and the same uncommitted state still lets a
rerun skip. Without git (an installed package) it is the package version plus a hash of the
package's source files. Not covered: data files outside the repository, which rqlab treats
as fixed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

from ..checkpoint import save_json

MARKER = ".rqlab-report"  # in every folder the report writes; the complete run's fingerprint
FORMAT_KEYS = ("status", "fingerprint", "files", "record")
_TRACKED = ("rqlab", "notebooks")  # what the source state covers, below the repository root
# the zoo store but its weights: cards, records and measurements' progress files, which
# measuring rewrites (and a session's checkpoint commits) without touching the weights
_VOLATILE = re.compile(r"rqlab/zoo/store/[^/]+(?<!\.pt)")
# what the batch computes, after the runs, from their results and the zoo's cards, on every
# batch (reused runs included): the claims, the standard-protocol pairs, the index page, the
# findings page and the zoo's curves. No run executes them (the layer contract keeps
# rqlab.studies and below from importing rqlab.report; tests/test_report_reuse.py checks
# that the notebooks do not), so editing them keeps every finished run
_AFTER_RUNS = re.compile(r"rqlab/report/(claims|standard|findings|html|zoo_curves)\.py")


def _outside(path: str) -> bool:
    """Whether `path` (relative to the repository) is left out of the source state."""
    return bool(_VOLATILE.fullmatch(path) or _AFTER_RUNS.fullmatch(path))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_state(root=None) -> str:
    """The rqlab source the runs execute: "source <hash>" of the git tree under rqlab/ and
    notebooks/ (of the zoo store, the weights only; the report's modules that run after the
    runs, _AFTER_RUNS, left out), "+dirty.<hash>" for uncommitted changes there (see
    the module docstring), or, without git, the version and a hash of the package's *.py
    files. root: the repository (default: this rqlab's)."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: no index refresh written by status
    git = lambda *args: subprocess.run(["git", *args], cwd=root, env=env, capture_output=True,  # noqa: E731
                                       timeout=30, check=True).stdout
    try:
        if not (root / ".git").exists():  # e.g. site-packages inside some other repository
            raise FileNotFoundError(root / ".git")
        tree = git("ls-tree", "-r", "-z", "HEAD", "--", *_TRACKED)  # "MODE TYPE ID\tPATH" entries
        status = git("status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *_TRACKED)
    except (OSError, subprocess.SubprocessError):
        return _package_state(root)
    entries = [e for e in tree.split(b"\0") if e and not _outside(e.split(b"\t", 1)[1].decode())]
    state = "source " + hashlib.sha256(b"\0".join(entries)).hexdigest()[:16]
    changed = sorted(p for p in _changed_paths(status) if not _outside(p))
    if not changed:
        return state
    h = hashlib.sha256()
    for rel in changed:
        path = root / rel
        h.update(f"\0{rel}\0{sha256_file(path) if path.is_file() else 'absent'}".encode())
    return f"{state}+dirty.{h.hexdigest()[:16]}"


def _changed_paths(status: bytes) -> set[str]:
    """The paths of `git status --porcelain=v1 -z`: "XY PATH" entries, a rename's or copy's
    source in the field after it."""
    fields, paths, i = status.split(b"\0"), set(), 0
    while i < len(fields):
        entry, i = fields[i], i + 1
        if len(entry) < 4:
            continue
        paths.add(entry[3:].decode())
        if entry[:1] in (b"R", b"C") or entry[1:2] in (b"R", b"C"):
            paths.add(fields[i].decode())
            i += 1
    return paths


def _package_state(root: Path) -> str:
    from .. import __version__

    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(f"{path.relative_to(package)}\0{sha256_file(path)}\0".encode())
    return f"rqlab {__version__}, source sha256 {h.hexdigest()[:16]}"


def fingerprint(run, notebooks_dir, source: str, env: dict, show_input: bool) -> dict:
    """What makes a run's results what they are: its parameters (after profile and grid;
    output_dir aside), its notebook file, the rqlab source (`source_state`) and the
    environment that runs it."""
    return _plain({"params": run.params, "notebook": run.notebook,
                   "notebook_sha256": sha256_file(Path(notebooks_dir) / f"{run.notebook}.ipynb"),
                   "source": source, "torch": env.get("torch"), "device": env.get("device"),
                   "python": env.get("python"), "show_input": bool(show_input)})


def folder_files(folder) -> dict:
    """{relative path: sha256} of every file in a run folder except its marker."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def seal(folder, run, fp: dict, record: dict) -> None:
    """Write the complete run's marker: fingerprint, file hashes and its row (atomically)."""
    save_json(Path(folder) / MARKER, {"run_id": run.run_id, "notebook": run.notebook, "written_by": "rqlab report",
                                      "status": record["status"], "fingerprint": fp,
                                      "files": folder_files(folder), "record": _plain(record)})


def finished(folder, fp: dict) -> dict | None:
    """The row of the ok run in `folder` if a rerun may keep it (same fingerprint, files as
    written), else None."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        if not all(k in marker for k in FORMAT_KEYS):  # an unfinished run, or an older report's
            return None
        if marker["status"] != "ok" or marker["record"].get("status") != "ok" or marker["fingerprint"] != fp:
            return None
        return marker["record"] if folder_files(folder) == marker["files"] else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _plain(obj):
    """As it reads back from JSON (tuples as lists...), so fingerprints compare equal."""
    return json.loads(json.dumps(obj))
