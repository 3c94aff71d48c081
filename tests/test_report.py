"""`rqlab report`: a real batch of tiny notebooks (made here with nbformat) executed by
papermill, exported by nbconvert, indexed; bad configs fail before anything runs.

No network, no GPU, no torch in the notebooks: each run is one kernel start (~3 s).
"""
from __future__ import annotations

import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("papermill")
yaml = pytest.importorskip("yaml")

from rqlab import report  # noqa: E402
from rqlab.cli import main  # noqa: E402
from rqlab.validate import RqlabError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_notebook(path: Path) -> Path:
    """A notebook in the report's contract: parameters cell, one figure, results.json."""
    params = nbformat.v4.new_code_cell(
        'output_dir = "."\nscale = 1.0\nfail = False\nn_examples = 10\ninteractive = True\nlabel = "x"')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A tiny notebook"),
        params,
        nbformat.v4.new_code_cell(
            "import json, sys, pathlib\nimport matplotlib.pyplot as plt\n"
            "fig, ax = plt.subplots(figsize=(3, 2))\nax.plot([0, 1], [0, scale])\nplt.show()"),
        nbformat.v4.new_code_cell('if fail:\n    raise RuntimeError("asked to fail")'),
        nbformat.v4.new_code_cell(
            'results = {"acc": 0.5 * scale, "n_examples": n_examples, "interactive": interactive,\n'
            '           "per_bits": {"4": 0.25, "8": 0.75}, "curve": list(range(100)),\n'
            '           "kernel_prefix": sys.prefix}\n'
            'pathlib.Path(output_dir, "results.json").write_text(json.dumps(results))'),
    ]
    nbformat.write(nb, path)
    return path


def write_config(path: Path, runs: list, **top) -> Path:
    cfg = {"notebooks_dir": "nb", "default_profile": "quick",
           "profiles": {"smoke": {"n_examples": 3}, "quick": {"n_examples": 100}}, "runs": runs, **top}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Notebooks alpha and beta in ws/nb, and a config that makes beta fail."""
    ws = tmp_path_factory.mktemp("report")
    (ws / "nb").mkdir()
    write_notebook(ws / "nb" / "alpha.ipynb")
    write_notebook(ws / "nb" / "beta.ipynb")
    write_config(ws / "batch.yaml", [
        {"notebook": "alpha", "grid": {"scale": [2.0]}},
        {"notebook": "beta", "params": {"fail": True}},
    ])
    return ws


@pytest.fixture(scope="module")
def first_batch(workspace):
    """The batch, once, through the command line: (out folder, exit code)."""
    out = workspace / "out"
    code = main(["report", "--config", str(workspace / "batch.yaml"), "--profile", "smoke", "--out", str(out)])
    return out, code


class Links(HTMLParser):
    """Every src/href attribute value of a page."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]


def links(path: Path) -> list[str]:
    parser = Links()
    parser.feed(path.read_text())
    return parser.urls


def test_batch_records_ok_and_failed_runs(first_batch):
    out, code = first_batch
    assert code == 1  # beta failed: non-zero exit, after writing everything
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "rqlab-report" and summary["profile"] == "smoke"
    assert summary["n_runs"] == 2 and summary["n_failed"] == 1
    assert {"rqlab", "git_commit", "device", "torch", "python", "cpu"} <= set(summary["environment"])
    # the claims table (tests/test_claims.py): none of the papers' notebooks ran in this batch
    assert [c["id"] for c in summary["claims"]] == ["a", "b", "t", "c", "d"]
    assert {c["verdict"] for c in summary["claims"]} == {"not run"}
    ok, failed = summary["runs"]

    # the run that worked: parameters as planned, numbers read back, HTML and figure complete
    assert (ok["run_id"], ok["status"], ok["error"]) == ("alpha__scale=2", "ok", None)
    assert ok["params"] == {"n_examples": 3, "scale": 2.0, "interactive": False}  # smoke profile, grid point
    res = ok["results"]
    assert res["acc"] == 1.0 and res["n_examples"] == 3 and res["per_bits.4"] == 0.25
    assert res["interactive"] is False          # set by the report
    assert "curve" not in res                   # long lists are left out
    assert res["kernel_prefix"] == sys.prefix   # the python3 kernel is this environment's Python
    run_dir = out / "alpha__scale=2"
    assert json.loads((run_dir / "results.json").read_text())["acc"] == 1.0
    assert (run_dir / "figure.png").read_bytes().startswith(PNG_MAGIC)
    page = (run_dir / "alpha.html").read_text()
    assert page.rstrip().endswith("</html>") and "data:image/png;base64," in page
    assert "subplots" not in page  # inputs hidden by default
    assert not list(run_dir.glob(".*.ipynb"))  # no temp file left behind

    # the run that failed: recorded with papermill's error, its executed copy kept
    assert (failed["run_id"], failed["status"]) == ("beta", "failed")
    assert failed["error"].startswith("RuntimeError: asked to fail")
    executed = nbformat.read(out / "beta" / "beta.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in executed.cells for o in c.get("outputs", []))
    assert (out / "beta" / "beta.html").is_file() and not (out / "beta" / "results.json").exists()
    index = (out / "index.html").read_text()
    assert "RuntimeError: asked to fail" in index and 'class="failed"' in index and 'class="ok"' in index
    # the zoo's headline figures (the standard protocol, from the cards) are in the report
    from rqlab import zoo
    assert summary["zoo"] == json.loads(json.dumps(zoo.headlines()))
    for row in summary["zoo"]:
        assert row["name"] in index and (row["standard"] is None or f"{100 * row['standard']:.1f}%" in index)


def test_index_links_stay_inside_and_html_needs_no_network(first_batch):
    out, _ = first_batch
    urls = links(out / "index.html")
    assert any(u.endswith("figure.png") for u in urls) and any(u.endswith(".ipynb") for u in urls)
    for url in urls:
        assert not urlparse(url).scheme, url
        target = (out / unquote(url)).resolve()
        assert target.is_file() and target.is_relative_to(out.resolve()), url
    for page in out.rglob("*.html"):
        text = page.read_text()
        remote = [u for u in links(page) if u.startswith(("http://", "https://", "//"))]
        assert not remote, (page, remote)
        assert "url(http" not in text and "@import" not in text, page


@pytest.mark.parametrize("runs, message", [
    ([{"notebook": "gamma"}], "runs[0] (gamma): notebook 'gamma' is unknown"),
    ([{"notebook": "alpha"}, {"notebook": "beta", "params": {"sclae": 2.0}}],
     "runs[1] (beta): params.sclae is not a parameter of notebook beta"),
    ([{"notebook": "alpha"}, {"notebook": "beta", "grid": {"scale": 2.0}}],
     "runs[1] (beta): grid.scale must be a list, got 2.0"),
    ([{"notebook": "alpha", "params": {"scale": "1e-3"}}], "YAML reads 1e-3 as a string"),
    ([{"notebook": "alpha", "params": {"output_dir": "/tmp"}}], "output_dir is set by the report"),
    ([{"notebook": "alpha", "grid": {"scale": [1.0]}}, {"notebook": "alpha", "grid": {"scale": [1.0]}}],
     "run-id alpha__scale=1 repeats"),
    ([{"notebook": "alpha", "parms": {}}], "runs[0] (alpha): unknown key 'parms'"),
])
def test_bad_config_fails_before_anything_runs(workspace, tmp_path, runs, message):
    cfg = write_config(tmp_path / "bad.yaml", runs, notebooks_dir=str(workspace / "nb"))
    out = tmp_path / "out"
    with pytest.raises(RqlabError) as err:
        report.run_report(cfg, profile="smoke", out=out, progress=False)
    assert message in str(err.value)
    assert not out.exists()


def test_bad_options_and_global_typos(workspace, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", [{"notebook": "alpha"}], notebooks_dir=str(workspace / "nb"))
    out = tmp_path / "out"
    for argv, message in [(["--profile", "huge"], "--profile='huge' is unknown: choose one of smoke, quick"),
                          (["--jobs", "0"], "--jobs=0 is out of range"),
                          (["--only", "zeta"], "--only: 'zeta' matches no run")]:
        assert main(["report", "--config", str(cfg), "--out", str(out), *argv]) == 2
        assert message in capsys.readouterr().err
    typo = write_config(tmp_path / "t.yaml", [{"notebook": "alpha"}], notebooks_dir=str(workspace / "nb"),
                        profiles={"smoke": {"n_exmples": 3}}, default_profile="smoke")
    with pytest.raises(RqlabError, match=r"profiles.smoke.n_exmples is not a parameter of any notebook"):
        report.run_report(typo, out=out, progress=False)
    assert not out.exists()


def test_parameter_precedence_and_run_ids(workspace, tmp_path):
    cfg = write_config(tmp_path / "p.yaml", [
        {"notebook": "alpha", "params": {"label": "run", "n_examples": 7},
         "profiles": {"smoke": {"scale": 5.0}}, "grid": {"fail": [False]}},
        {"notebook": "alpha", "name": "alpha-b", "grid": {"scale": [0.001, 2], "label": ["a/b"]}},
    ], notebooks_dir=str(workspace / "nb"), params={"label": "top", "scale": 9.0})
    runs = report.plan(report.load_config(cfg), "smoke")
    assert [r.run_id for r in runs] == ["alpha__fail=false", "alpha-b__scale=0.001__label=a-b",
                                        "alpha-b__scale=2__label=a-b"]
    # params < entry params < profile < entry profile < grid
    assert runs[0].params == {"label": "run", "scale": 5.0, "n_examples": 3, "fail": False, "interactive": False}
    assert runs[1].params == {"label": "a/b", "scale": 0.001, "n_examples": 3, "interactive": False}
    only = report.plan(report.load_config(cfg), "smoke", only="alpha-b__scale=2__label=a-b")
    assert [r.run_id for r in only] == ["alpha-b__scale=2__label=a-b"]


def test_rerun_replaces_instead_of_mixing(first_batch, tmp_path, workspace):
    """A second batch into the same folder, two notebooks in parallel (--jobs 2)."""
    out = tmp_path / "out"
    shutil.copytree(first_batch[0], out)
    (out / "alpha__scale=2" / "stale.json").write_text('{"old": 1}')  # must not survive the rerun
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("not the report's")        # never deleted
    cfg = write_config(tmp_path / "rerun.yaml", [{"notebook": "alpha", "grid": {"scale": [2.0, 3.0]}}],
                       notebooks_dir=str(workspace / "nb"))
    code = main(["report", "--config", str(cfg), "--profile", "smoke", "--out", str(out), "--jobs", "2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["run_id"] for r in summary["runs"]] == ["alpha__scale=2", "alpha__scale=3"]
    assert [r["results"]["acc"] for r in summary["runs"]] == [1.0, 1.5]
    assert all("old" not in r["results"] for r in summary["runs"])
    assert not (out / "alpha__scale=2" / "stale.json").exists()
    assert not (out / "beta").exists()                      # the report's, not in this batch
    assert (out / "notes" / "mine.txt").is_file()           # the user's
    assert 'class="kv">beta<' not in (out / "index.html").read_text()  # (the zoo table may say "beta 3e-3")
    # a folder in the way that the report did not write is refused, before anything runs
    shutil.rmtree(out / "alpha__scale=3")
    (out / "alpha__scale=3").mkdir()
    with pytest.raises(RqlabError, match=r"was not written by rqlab report"):
        report.run_report(cfg, profile="smoke", out=out, progress=False)


def test_show_input_keeps_the_code(first_batch, tmp_path):
    out, _ = first_batch
    page = report.export_html(out / "alpha__scale=2" / "alpha.ipynb", tmp_path / "a.html", show_input=True)
    assert "subplots" in page.read_text()


# What reports/default.yaml expects of the notebooks' parameters cells (the contract with
# their author): the common names, plus each notebook's own (tests/test_notebooks.py plans
# the config against the real notebooks).
COMMON = ('dataset = "fashion-mnist"\nmodel = "fmnist-fp-natural-small"\nbits = [2, 4, 8]\neps = 0.1\nattack = "pgd"\n'
          'steps = 20\nn_examples = 500\nseed = 0\ndevice = "auto"\noutput_dir = "."\ninteractive = False\n')
EXTRA = {"01_precision_transferability": "eot = 10\npasses = 5\n",
         "02_lipschitz_error_amplification": "beta = 0.001\nbetas = [0.0]\ntrain_n = 1000\nepochs = 2\nsweep_models = []\n",
         "03_bit_selection": "budgets = [3.0]\nrandom_seeds = 3\niters = 300\nmethods = [\"uniform\"]\nsens_n = 256\n"
                             "hessian_probes = 16\n",
         "04_odgq_training_curves": "epochs = 10\nlive = False\ntrain_n = 2000\ncost_n = 512\ncost_reps = 3\n",
         "05_double_win_quant": "eot = 10\npasses = 5\naa_n_iter = 25\naa_n_examples = 100\n",
         "06_deployed_int8": "model = [\"fmnist-fp-pgd7-small\"]\nsquare_queries = 1000\ncalib_n = 1024\n"}


def test_default_config_plans_against_the_notebook_contract(tmp_path):
    """reports/default.yaml is valid for notebooks that declare the contract's parameters
    (stand-ins here: the real notebooks are checked when `rqlab report` runs)."""
    path = Path(__file__).resolve().parent.parent / "reports" / "default.yaml"
    cfg = report.load_config(path)
    assert cfg.notebooks_dir.resolve() == path.parent.parent / "notebooks"
    assert set(cfg.profiles) == {"smoke", "quick", "findings", "full"} and cfg.default_profile == "quick"
    stems = [e.notebook for e in cfg.runs]
    assert stems == ["01_precision_transferability", "02_lipschitz_error_amplification", "03_bit_selection",
                     "04_odgq_training_curves", "05_double_win_quant", "06_deployed_int8"]
    for stem in stems:
        cell = nbformat.v4.new_code_cell(COMMON + EXTRA.get(stem, ""))
        cell.metadata["tags"] = ["parameters"]
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), tmp_path / f"{stem}.ipynb")
    cfg = report.load_config(path, notebooks_dir=tmp_path)
    smoke, full = report.plan(cfg, "smoke"), report.plan(cfg, "full")
    assert [r.run_id for r in smoke][:4] == ["01_precision_transferability__model=fmnist-fp-pgd7",
                                              "01_precision_transferability__model=fmnist-q4-pgd7",
                                              "01_precision_transferability__model=fmnist-q8-pgd7",
                                              "02_lipschitz_error_amplification"]
    assert len(smoke) == 8 and all(r.params["interactive"] is False for r in smoke)
    assert all(r.params["n_examples"] < f.params["n_examples"] for r, f in zip(smoke, full))
    assert all(r.params["steps"] < f.params["steps"] for r, f in zip(smoke, full))
    findings = {r.run_id: r.params for r in report.plan(cfg, "findings")}  # docs/findings.md's strength
    assert all(p["n_examples"] == 1000 for p in findings.values())
    # the reference AutoAttack (100 iterations) on 500 images: a cross-check of claim (b), whose
    # headline is the cards' standard protocol on 1,000 (the claims table takes it from them)
    assert findings["05_double_win_quant"]["aa_n_iter"] == 100 and findings["05_double_win_quant"]["aa_n_examples"] == 500
