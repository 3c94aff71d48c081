"""Issue 18: a rerun of `rqlab report` keeps the runs that finished and redoes only the rest
(rqlab/report/reuse.py): same parameters, notebook file and rqlab source, files as written.

Each notebook here appends a line to ../executions.log (beside the notebooks folder) when it
completes, so a test counts what ran. No torch in the notebooks: a run is one kernel start.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("papermill")
yaml = pytest.importorskip("yaml")

from rqlab.cli import main  # noqa: E402
from rqlab.report import batch, reuse  # noqa: E402

from test_bad_inputs import assert_index_agrees, kill_tree, spawn, wait_for  # noqa: E402

SKIPPED = "finished runs (same parameters and rqlab source); --force reruns them"


def write_notebook(path: Path, title: str = "") -> None:
    """Report contract; `pause` seconds of sleep, acc = scale / 2, one log line per completed run."""
    params = nbformat.v4.new_code_cell('output_dir = "."\nscale = 1.0\npause = 0.0\nlog = ""')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# tiny {title}"), params, nbformat.v4.new_code_cell(
        "import json, pathlib, time\ntime.sleep(pause)\n"
        'pathlib.Path(output_dir, "results.json").write_text(json.dumps({"acc": 0.5 * scale}))\n'
        'with open(log, "a") as f:\n    f.write(f"{scale} {pause}\\n")')]
    nbformat.write(nb, path)


def write_workspace(ws: Path, runs: list) -> Path:
    """ws/nb/{alpha,beta}.ipynb and ws/c.yaml; returns the config."""
    (ws / "nb").mkdir(parents=True, exist_ok=True)
    for stem in ("alpha", "beta"):
        write_notebook(ws / "nb" / f"{stem}.ipynb")
    return write_config(ws, runs)


def write_config(ws: Path, runs: list) -> Path:
    config = {"notebooks_dir": "nb", "default_profile": "quick", "profiles": {"quick": {}},
              "params": {"log": "../executions.log"}, "runs": runs}  # relative to nb/, the kernels' cwd
    (ws / "c.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return ws / "c.yaml"


def executions(ws: Path) -> list[str]:
    log = ws / "executions.log"
    return log.read_text().splitlines() if log.exists() else []


def stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def reused(out: Path) -> dict[str, bool]:
    return {r["run_id"]: r["reused"] for r in json.loads((out / "summary.json").read_text())["runs"]}


def test_sigterm_after_the_first_run_then_a_rerun_redoes_only_the_rest(tmp_path):
    """The issue's test: killed after the first finished run, the rerun (same config) exits
    0 with every run ok, the first one not recomputed, and the index complete."""
    write_workspace(tmp_path, [{"notebook": "alpha", "name": "fast", "params": {"scale": 2.0}},
                               {"notebook": "alpha", "name": "slow", "params": {"scale": 3.0, "pause": 6.0}}])
    argv = ["report", "--config", "c.yaml", "--out", "out"]
    out = tmp_path / "out"

    proc = spawn(argv, tmp_path)
    wait_for(lambda: (out / "fast").is_dir(), proc)  # swapped in: finished; the slow one is running
    kill_tree(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert_index_agrees(out, {"fast": 1.0}, in_progress=False)
    assert executions(tmp_path) == ["2.0 0.0"] and not (out / "slow").exists()
    before = {p.name: stamp(p) for p in (out / "fast").iterdir()}

    proc = spawn(argv, tmp_path)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"skipped 1 {SKIPPED}" in stdout and "2/2 runs ok (quick profile" in stdout, stdout
    assert "s), 1 reused" in stdout, stdout
    assert executions(tmp_path) == ["2.0 0.0", "3.0 6.0"]              # the first run did not run again
    assert {p.name: stamp(p) for p in (out / "fast").iterdir()} == before  # nor was its folder rewritten
    assert_index_agrees(out, {"fast": 1.0, "slow": 1.5}, in_progress=False)
    assert reused(out) == {"fast": True, "slow": False}
    assert "reused: same parameters and rqlab source" in (out / "index.html").read_text()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished batch of two runs (alpha, beta) in ws/out, to copy."""
    ws = tmp_path_factory.mktemp("reuse")
    cfg = write_workspace(ws, [{"notebook": "alpha", "params": {"scale": 2.0}},
                               {"notebook": "beta", "params": {"scale": 3.0}}])
    assert main(["report", "--config", str(cfg), "--out", str(ws / "out")]) == 0
    assert executions(ws) == ["2.0 0.0", "3.0 0.0"]
    return ws


def copy(base: Path, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(base, ws)  # the config's paths are relative: the copy is the same batch
    return ws


def rerun(ws: Path, *argv: str) -> list[str]:
    """`rqlab report` with ws's config (exit code 0); returns the log lines it added."""
    n = len(executions(ws))
    assert main(["report", "--config", str(ws / "c.yaml"), "--out", str(ws / "out"), *argv]) == 0
    return executions(ws)[n:]


def test_a_changed_parameter_or_notebook_reruns_only_that_run(base, tmp_path, capsys):
    ws = copy(base, tmp_path)
    out = ws / "out"
    assert rerun(ws) == []                                      # nothing changed: nothing runs
    assert f"skipped 2 {SKIPPED}" in capsys.readouterr().out
    assert reused(out) == {"alpha": True, "beta": True}
    assert_index_agrees(out, {"alpha": 1.0, "beta": 1.5}, in_progress=False)

    write_config(ws, [{"notebook": "alpha", "params": {"scale": 2.0}},
                      {"notebook": "beta", "params": {"scale": 4.0}}])   # beta's parameters change
    assert rerun(ws) == ["4.0 0.0"]
    assert f"skipped 1 {SKIPPED}" in capsys.readouterr().out
    assert reused(out) == {"alpha": True, "beta": False}
    assert_index_agrees(out, {"alpha": 1.0, "beta": 2.0}, in_progress=False)

    write_notebook(ws / "nb" / "alpha.ipynb", title="edited")           # alpha's notebook changes
    assert rerun(ws) == ["2.0 0.0"]
    assert reused(out) == {"alpha": False, "beta": True}
    assert_index_agrees(out, {"alpha": 1.0, "beta": 2.0}, in_progress=False)


def test_force_or_another_source_reruns_every_run(base, tmp_path, capsys, monkeypatch):
    ws = copy(base, tmp_path)
    assert sorted(rerun(ws, "--force")) == ["2.0 0.0", "3.0 0.0"]
    assert "skipped" not in capsys.readouterr().out
    assert reused(ws / "out") == {"alpha": False, "beta": False}

    monkeypatch.setattr(batch, "source_state", lambda: "source 0123abcd+dirty.feedfeedfeedfeed")
    assert sorted(rerun(ws)) == ["2.0 0.0", "3.0 0.0"]
    assert "skipped" not in capsys.readouterr().out
    assert rerun(ws) == []  # the same (dirty) state again: kept
    assert_index_agrees(ws / "out", {"alpha": 1.0, "beta": 1.5}, in_progress=False)


def test_a_finished_run_is_kept_only_as_written(tmp_path):
    """reuse.finished: ok, the same fingerprint and the very files of the folder, or None."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text('{"acc": 0.5}')
    (folder / "sub").mkdir()
    (folder / "sub" / "figure.png").write_bytes(b"png")
    run = SimpleNamespace(run_id="run", notebook="alpha")
    fp = {"params": {"scale": 1.0, "bits": [4, 8]}, "source": "abc", "notebook_sha256": "0" * 64}
    record = {"run_id": "run", "status": "ok", "results": {"acc": 0.5}, "reused": False}
    reuse.seal(folder, run, fp, record)
    assert reuse.finished(folder, fp) == record
    assert reuse.finished(folder, {**fp, "params": {"scale": 1.0, "bits": [4, 6]}}) is None
    assert reuse.finished(folder, {**fp, "source": "abc+dirty.0123"}) is None

    for change, undo in [
        (lambda: (folder / "extra.json").write_text("{}"), lambda: (folder / "extra.json").unlink()),
        (lambda: (folder / "results.json").write_text('{"acc": 0.9}'),
         lambda: (folder / "results.json").write_text('{"acc": 0.5}')),
        (lambda: (folder / "sub" / "figure.png").rename(tmp_path / "f.png"),
         lambda: (tmp_path / "f.png").rename(folder / "sub" / "figure.png")),
    ]:
        change()
        assert reuse.finished(folder, fp) is None
        undo()
        assert reuse.finished(folder, fp) == record

    reuse.seal(folder, run, fp, {**record, "status": "failed"})
    assert reuse.finished(folder, fp) is None                      # failed runs are redone
    (folder / reuse.MARKER).write_text('{"run_id": "run", "written_by": "rqlab report"}')  # unfinished
    assert reuse.finished(folder, fp) is None
    (folder / reuse.MARKER).write_text('{"run_id": ')
    assert reuse.finished(folder, fp) is None


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_the_source_state_follows_rqlab_and_the_notebooks_only(tmp_path):
    """Clean: a hash of the tree under rqlab/ and notebooks/, whatever the commit. A commit
    elsewhere, or of a zoo card only (measuring rewrites cards, not weights), keeps it;
    weights or code change it. Uncommitted changes under rqlab/ or notebooks/ (tracked or
    new, not ignored; cards aside): +dirty.<hash>, one hash per set of changes."""
    repo = tmp_path / "repo"
    for rel, text in [("rqlab/a.py", "x = 1\n"), ("notebooks/n.ipynb", "{}\n"), ("README.md", "hi\n"),
                      ("rqlab/zoo/store/m.json", "{}\n"), ("rqlab/zoo/store/m.pt", "w1"),
                      (".gitignore", "__pycache__/\n")]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    clean = reuse.source_state(repo)
    assert clean.startswith("source ") and "+dirty" not in clean

    (repo / "README.md").write_text("changed\n")                 # outside rqlab/ and notebooks/
    (repo / "rqlab" / "__pycache__").mkdir()
    (repo / "rqlab" / "__pycache__" / "a.pyc").write_bytes(b"ignored")
    (repo / "rqlab" / "zoo" / "store" / "m.json").write_text('{"standard": 1}\n')   # a card measured
    (repo / "rqlab" / "zoo" / "store" / "m.standard.progress").write_bytes(b"half")  # a stopped measurement
    assert reuse.source_state(repo) == clean
    git(repo, "add", "-f", "rqlab/zoo/store/m.standard.progress")
    git(repo, "commit", "-q", "-am", "docs, a measured card and a checkpointed measurement")
    assert reuse.source_state(repo) == clean                       # another commit, the same source

    (repo / "rqlab" / "a.py").write_text("x = 2\n")
    one = reuse.source_state(repo)
    assert one.startswith(f"{clean}+dirty.") and reuse.source_state(repo) == one
    (repo / "rqlab" / "a.py").write_text("x = 3\n")               # another change, same file list
    two = reuse.source_state(repo)
    assert two.startswith(f"{clean}+dirty.") and two != one
    (repo / "rqlab" / "a.py").write_text("x = 1\n")
    assert reuse.source_state(repo) == clean
    (repo / "notebooks" / "helper.py").write_text("y = 1\n")     # untracked, not ignored
    assert reuse.source_state(repo).startswith(f"{clean}+dirty.")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "helper")
    code = reuse.source_state(repo)
    assert code != clean and "+dirty" not in code
    (repo / "rqlab" / "zoo" / "store" / "m.pt").write_text("w2")     # weights retrained
    git(repo, "commit", "-q", "-am", "retrained")
    trained = reuse.source_state(repo)
    assert trained not in (clean, code)

    for rel in ("rqlab/report/findings.py", "rqlab/report/standard.py"):   # run after the runs: left out
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("page = 1\n")
    assert reuse.source_state(repo) == trained                    # untracked, yet the same source
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the findings page's generator")
    assert reuse.source_state(repo) == trained
    (repo / "rqlab" / "report" / "execute.py").write_text("papermill = 1\n")   # what runs the notebooks: in
    assert reuse.source_state(repo).startswith(f"{trained}+dirty.")
    (repo / "rqlab" / "report" / "execute.py").unlink()

    shutil.rmtree(repo / ".git")                                  # an installed copy: no git
    assert reuse.source_state(repo).startswith("rqlab ")


def test_no_notebook_imports_the_report_modules_the_source_state_leaves_out():
    """reuse._AFTER_RUNS may leave rqlab/report's after-run modules out of the source state
    only because no run executes them: the layer contract (make test's lint-imports) keeps
    rqlab.studies and below from importing rqlab.report, and no notebook imports it itself."""
    root = Path(__file__).resolve().parents[1]
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        assert not re.search(r"rqlab\.(report|cli)\b|from rqlab import[^\n]*\b(report|cli)\b", code), nb.name
    assert reuse._AFTER_RUNS.fullmatch("rqlab/report/findings.py")
    assert not reuse._AFTER_RUNS.fullmatch("rqlab/report/execute.py")
