"""The six notebooks (notebooks/*.ipynb), run end to end by papermill with the smoke
settings of reports/default.yaml, and checked through the results.json each writes:
shapes, ranges and relations that hold at any sample size (budgets met,
the knapsack's objective no worse than any other allocation's, one curve point per epoch,
non-decreasing wall time...). A bad parameter must stop a notebook in its first code cell
with RqlabError. The committed notebooks carry no outputs.

Models: each notebook uses its zoo models where `rqlab zoo build` has stored them; until
then tiny stand-ins, trained here on 384 images (cached under .pytest_cache), take their
place, so the notebooks' logic is tested while the zoo trains. The kernels run with one
thread (OMP_NUM_THREADS=1): on a CPU shared with a training job, two threads made the
float64 power iterations of the Lipschitz estimates about 50x slower.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
papermill = pytest.importorskip("papermill")

from nbsetup import CONFIG, NOTEBOOKS, STEMS, defaults, with_models  # noqa: E402
from rqlab import report, zoo  # noqa: E402

CELL_TIMEOUT = 240  # seconds per cell: a hung kernel fails the test instead of blocking the suite
VALIDATION_CELL = 3  # 0 title, 1 parameters, 2 papermill's injected parameters, 3 the checks

pytestmark = pytest.mark.notebook


# ---- helpers (the fixtures kernel, smoke and tiny are in tests/conftest.py) -----------------

def execute(stem: str, params: dict, out: Path, monkeypatch) -> tuple[dict, object]:
    """Run the notebook into `out` (its output_dir); returns (results.json, executed notebook)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    out.mkdir(parents=True, exist_ok=True)
    executed = out / f"{stem}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(executed),
                               parameters={**params, "output_dir": str(out)}, kernel_name="python3",
                               language="python", cwd=str(NOTEBOOKS), progress_bar=False,
                               execution_timeout=CELL_TIMEOUT, extra_arguments=["--IPKernelApp.log_level=ERROR"])
    return json.loads((out / "results.json").read_text()), nbformat.read(executed, as_version=4)


def check_report_contract(nb, out: Path) -> None:
    """The batch report finds a main figure and key numbers."""
    tagged = [c for c in nb.cells if "main-figure" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and any("image/png" in o.get("data", {}) for o in tagged[0].outputs)
    assert report.main_figure(nb).startswith(b"\x89PNG")
    numbers, files, warnings = report.read_results(out)
    assert files == ["results.json"] and not warnings and numbers
    check_figures_name_the_machine(nb, json.loads((out / "results.json").read_text()))


def check_figures_name_the_machine(nb, results: dict) -> None:
    """Every figure of the notebook's study names the machine its numbers were measured on
    (CPU models differ between machines), redrawn here from results.json."""
    import importlib

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(nb.metadata["papermill"]["input_path"]).stem
    module = importlib.import_module(f"rqlab.studies.{STUDIES[stem]}")
    assert results["machine"] and ("cpu" in results["machine"] or "cuda" in results["machine"])
    plots = [getattr(module, k) for k in dir(module) if k.startswith("plot_")]
    assert plots
    for plot in plots:
        fig = plot(results)
        assert any(t.get_text() == f"measured on {results['machine']}" for t in fig.texts), plot.__name__
        plt.close(fig)


STUDIES = {"01_precision_transferability": "transferability", "02_lipschitz_error_amplification": "amplification",
           "03_bit_selection": "bit_selection", "04_odgq_training_curves": "odgq_curves",
           "05_double_win_quant": "double_win", "06_deployed_int8": "deployed"}


def unit(v) -> bool:
    return isinstance(v, (int, float)) and 0.0 <= v <= 1.0


# ---- the committed notebooks and the report config ----------------------------------------

@pytest.mark.parametrize("stem", STEMS)
def test_committed_notebook_is_clean_and_declares_its_parameters(stem):
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit notebooks without outputs"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [1], "one cell tagged parameters, right after the title"
    assert nb.cells[2].source.startswith("# Check every parameter"), "the checks come first after the parameters"
    names = defaults(stem)
    for common in ("dataset", "bits", "attack", "eps", "steps", "n_examples", "seed", "device", "output_dir",
                   "interactive"):
        assert common in names, f"{stem} does not declare {common}"
    assert names["interactive"] is True and names["output_dir"].startswith("../runs/")
    assert "=" not in "".join(line.partition("#")[2] for line in nb.cells[1].source.splitlines()), \
        "papermill cannot parse a parameter line whose comment holds '='"


@pytest.mark.parametrize("profile", ["smoke", "quick", "full"])
def test_default_report_config_plans_against_the_real_notebooks(profile):
    runs = report.plan(report.load_config(CONFIG), profile)
    assert {r.notebook for r in runs} == set(STEMS)
    assert all(r.params["interactive"] is False for r in runs)


# ---- each notebook at its smoke settings ----------------------------------------------------

def test_01_precision_transferability(kernel, smoke, tiny, tmp_path, monkeypatch):
    stem = STEMS[0]
    params, used = with_models(stem, {**smoke[stem], "interactive": True}, tiny)  # the explorer runs too
    res, nb = execute(stem, params, tmp_path, monkeypatch)
    check_report_contract(nb, tmp_path)
    bits = params["bits"]
    ((label, tm),) = res["models"].items()
    assert tm["spec"] == used["model"] and tm["n"] == params["n_examples"]
    assert tm["row_labels"] == [("fp" if b == 32 else str(b)) for b in bits] + ["eot"]
    assert tm["col_labels"] == [("fp" if b == 32 else str(b)) for b in bits] + ["rpi"]
    assert tm["eot_samples"] == params["eot"]
    m = tm["matrix"]
    assert len(m) == len(bits) + 1 and all(len(row) == len(bits) + 1 for row in m)
    assert all(unit(v) for row in m for v in row) and all(unit(v) for v in tm["clean_accuracy"])
    diag = [m[i][i] for i in range(len(bits))]
    assert res["diagonal_mean"][label] == pytest.approx(sum(diag) / len(diag))
    assert res["gap"][label] == pytest.approx(res["off_diagonal_mean"][label] - res["diagonal_mean"][label])
    assert res["verdict"][label] in ("poor transfer", "some transfer loss", "no clear gap", "transfer stronger")
    assert f"{100 * res['diagonal_mean'][label]:.1f}%" in res["reading"][label]  # text from the numbers
    lo, hi = res["gap_ci95"][label]
    assert lo < res["gap"][label] < hi
    widgets = [o for c in nb.cells for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "interactive=True displays the explorer"


def test_02_lipschitz_error_amplification(kernel, smoke, tiny, tmp_path, monkeypatch):
    stem = STEMS[1]
    params, _ = with_models(stem, smoke[stem], tiny)
    res, nb = execute(stem, params, tmp_path, monkeypatch)
    check_report_contract(nb, tmp_path)
    assert set(res["amplification"]) == {"FP", "vanilla", "DQ"}
    for name, a in res["amplification"].items():
        assert a["layers"][-1] == "logits" and len(a["layers"]) == len(a["amplification"]) >= 2
        assert all(v >= 0 for v in a["amplification"])
        rows = res["accuracy_vs_bits"][name]
        assert [r["bits"] for r in rows] == sorted(params["bits"])
        assert all(unit(r["robust_accuracy"]) for r in rows)
        lip = res["lipschitz"][name]
        prod = 1.0
        for layer in lip["layers"]:
            assert layer["lipschitz"] >= 0
            prod *= layer["lipschitz"]
        assert lip["bound"] == pytest.approx(prod) and lip["local_mean"] >= 0
        curve = res["accuracy_vs_eps"][name]   # at the model's stored precision, one clean accuracy for all eps
        assert [r["eps"] for r in curve] == sorted(params.get("eps_curve", [0.01, 0.02, 0.03, 0.05, 0.1]))
        assert len({r["clean_accuracy"] for r in curve}) == 1 and all(unit(r["robust_accuracy"]) for r in curve)
    betas = sorted({*params["betas"], params["beta"]})
    assert [r["beta"] for r in res["beta_sweep"]] == betas
    assert res["beta_row"]["beta"] == params["beta"]
    assert all(r["orthogonality"] >= 0 for r in res["beta_sweep"])
    dq = res["dq_vs_vanilla"]  # Defensive Quantization's claim at 4-bit activations (the smoke bits hold 4)
    at4 = {k: next(r["robust_accuracy"] for r in res["accuracy_vs_bits"][k] if r["bits"] == 4)
           for k in ("DQ", "vanilla")}
    assert dq["gain"] == pytest.approx(at4["DQ"] - at4["vanilla"]) and dq["ci95"][0] <= dq["gain"] <= dq["ci95"][1]
    assert dq["paired"] and dq["n"] == params["n_examples"]   # the same test examples: paired per example


def test_03_bit_selection(kernel, smoke, tiny, tmp_path, monkeypatch):
    stem = STEMS[2]
    params, _ = with_models(stem, smoke[stem], tiny)
    res, nb = execute(stem, params, tmp_path, monkeypatch)
    check_report_contract(nb, tmp_path)
    rows, budgets, options = res["allocations"], params["budgets"], set(params["bits"])
    assert res["budget_met"] is True and res["budgets"] == sorted(budgets)
    methods = params.get("methods", defaults(stem)["methods"])
    assert {"hessian", "margin"} <= set(methods), "the report's grid runs the two sensitivity baselines"
    assert {(r["budget"], r["method"]) for r in rows} == {(b, m) for b in budgets for m in methods}
    for r in rows:
        assert r["cost"] <= r["budget"] + 1e-9 and set(r["bits"].values()) <= options
    for b in budgets:  # the exact knapsack: no allocation at this budget has a lower objective
        at = [r for r in rows if r["budget"] == b]
        best = next(r for r in at if r["method"] == "lipschitz")
        assert all(best["objective"] <= r["objective"] + 1e-9 for r in at)
    table = res["sensitivity"]["table"]
    assert table and all(set(row) == {str(b) for b in options} for row in table.values())


def test_04_odgq_training_curves_live(kernel, smoke, tmp_path, monkeypatch):
    stem = STEMS[3]
    params = smoke[stem]
    assert params["live"] is True, "the smoke profile trains the four methods live"
    res, nb = execute(stem, params, tmp_path, monkeypatch)
    check_report_contract(nb, tmp_path)
    check_curves(res, params, live=True)


def check_curves(res, params, live: bool):
    methods = ["natural", "fgsm-rs", "pgd-at", "odgq"]
    assert res["source"] == ("live" if live else "zoo")
    for b in params["bits"]:
        curves = res["curves"][str(b)]
        assert list(curves) == methods
        for m, c in curves.items():
            n = len(c["epoch"])
            if live:
                assert c["epoch"] == list(range(1, params["epochs"] + 1))
            assert all(len(c[k]) == n for k in ("clean_accuracy", "robust_accuracy", "epoch_time_s",
                                                "cumulative_time_s"))
            assert all(unit(v) for v in c["clean_accuracy"] + c["robust_accuracy"])
            if live:  # the same test images for both
                assert all(r <= a + 1e-9 for r, a in zip(c["robust_accuracy"], c["clean_accuracy"]))
            t = c["cumulative_time_s"]
            assert all(e > 0 for e in c["epoch_time_s"]) and all(u <= v for u, v in zip(t, t[1:]))
            assert t[-1] == pytest.approx(sum(c["epoch_time_s"]))
        ratio = res["epoch_time_ratio"][str(b)]
        assert ratio["natural"] == pytest.approx(1.0) and all(v > 0 for v in ratio.values())
        # the controlled cost judges the claim: the notebook's methods timed on cost_n images
        cost = res["training_cost"][str(b)]
        assert (cost["n"], cost["reps"], cost["epochs"]) == (params["cost_n"], params["cost_reps"], 2)
        assert list(cost["ratio"]) == methods
        assert cost["ratio"]["natural"] == 1.0 and all(v > 0 for v in cost["ratio"].values())
        assert res["odgq_gain"][str(b)]["time_ratio"] == cost["ratio"]["odgq"]


def test_04_odgq_training_curves_from_the_zoo(kernel, tmp_path, monkeypatch):
    from rqlab.studies.odgq_curves import zoo_curve_models
    from rqlab.validate import RqlabError

    try:
        names = zoo_curve_models(4)
    except RqlabError as e:
        pytest.skip(f"zoo models not built yet: {e}")
    stem = STEMS[3]
    params = {"live": False, "bits": [4], "n_examples": 32, "steps": 3, "interactive": False, "cost_n": 64,
              "cost_reps": 1}
    res, nb = execute(stem, params, tmp_path, monkeypatch)
    check_report_contract(nb, tmp_path)
    check_curves(res, params, live=False)
    for m, name in names.items():
        assert res["curves"]["4"][m]["epoch"] == [r["epoch"] for r in zoo.card(name)["history"]]


def test_05_double_win_quant(kernel, smoke, tiny, tmp_path, monkeypatch):
    stem = STEMS[4]
    params, _ = with_models(stem, smoke[stem], tiny)
    res, nb = execute(stem, params, tmp_path, monkeypatch)
    check_report_contract(nb, tmp_path)
    protocols = ["paper", "eot_pgd", "expectation", "autoattack"]
    assert list(res["scores"]) == ["FP", "RPI", "RPI+RPT"]
    for cfg, by in res["scores"].items():
        assert list(by) == protocols
        for p, s in by.items():
            assert unit(s["robust_accuracy"]) and unit(s["robust_worst_accuracy"])
            assert s["passes"] == (1 if cfg == "FP" else params["passes"])
    assert res["scores"]["FP"]["eot_pgd"]["same_as"] == "paper"  # one precision: EOT is plain PGD
    bitops = res["bitops"]
    assert bitops["RPI"] < bitops["FP"] and bitops["RPI"] == pytest.approx(bitops["RPI+RPT"])
    assert res["aa_reduced"] is True and res["aa_n_iter"] == params["aa_n_iter"]
    for cfg in ("RPI", "RPI+RPT"):
        assert res["verdict"][cfg] in ("survives", "within noise", "reversed")
        strongest = min(res["robust_accuracy"][cfg].values())
        assert res["adaptive_gain"][cfg] == pytest.approx(strongest - min(res["robust_accuracy"]["FP"].values()))
        assert all(res["robust_worst_accuracy"][cfg][p] <= res["robust_accuracy"][cfg][p] + 1e-9 for p in protocols)
        assert res["robust_accuracy"][cfg]["paper"] <= res["clean_accuracy"][cfg] + 1e-9
    for cfg in ("RPI", "RPI+RPT"):  # the same-model control: the same weights at the set's largest precision
        ctl = res["same_model"][cfg]
        assert ctl["policy"] == str(max(params["bits"])) and list(ctl["scores"]) == protocols
        assert ctl["random"] == pytest.approx(min(res["robust_accuracy"][cfg].values()))
        assert ctl["fixed"] == pytest.approx(min(s["robust_accuracy"] for s in ctl["scores"].values()))
        assert ctl["gain"] == pytest.approx(ctl["random"] - ctl["fixed"])
        assert ctl["ci95"][0] < ctl["gain"] < ctl["ci95"][1]
    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "instead of the reference 100" in text, "a reduced AutoAttack is said so"


def test_06_deployed_int8(kernel, smoke, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    stem = STEMS[5]
    params = {**smoke[stem], "interactive": True}  # zoo models (committed in rqlab/zoo/store); the explorer runs too
    res, nb = execute(stem, params, tmp_path, monkeypatch)
    check_report_contract(nb, tmp_path)
    assert list(res["models"]) == params["model"] and res["square_queries"] == params["square_queries"]
    assert res["engine"]["format"] == "QDQ" and res["engine"]["calibration_images"] == params["calib_n"]
    for m in res["models"].values():
        assert m["n"] == params["n_examples"] and all(unit(v) for v in m["clean"].values())
        r = m["robust"]
        assert all(unit(v) for v in r.values())
        assert r["engine_worst"] <= min(r["transfer_fake_quant"], r["transfer_fp"], r["square"]) + 1e-9
        assert all(unit(a["flip_rate"]) for a in m["agreement"].values()) and "all_int8" in m["agreement"]
        assert f"{100 * r['engine_worst']:.1f}%" in res["reading"]  # text from the numbers
    assert "upper bound" in res["reading"]
    widgets = [o for c in nb.cells for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "interactive=True displays the explorer"


# ---- bad parameters stop in the first code cell ------------------------------------------------

BAD = [
    ("01_precision_transferability", {"model": "fmnist-no-such-model"}, "is unknown"),
    ("02_lipschitz_error_amplification", {"bits": [4, 12]}, "cannot run at [12]"),
    ("03_bit_selection", {"bits": [1, 4]}, "binary layers have no activation range"),
    ("04_odgq_training_curves", {"live": False, "bits": [2]}, "set live=True"),
    ("05_double_win_quant", {"model": "no/such/checkpoint.pt"}, "is not an existing checkpoint file"),
    ("06_deployed_int8", {"bits": [4, 8]}, "the engine is int8"),
]


@pytest.mark.parametrize("stem,bad,message", BAD, ids=[s[:2] for s, _, _ in BAD])
def test_bad_parameter_fails_in_the_first_code_cell(kernel, smoke, tiny, tmp_path, monkeypatch, stem, bad, message):
    params, _ = with_models(stem, smoke[stem], tiny)
    with pytest.raises(papermill.PapermillExecutionError) as info:
        execute(stem, {**params, **bad}, tmp_path, monkeypatch)
    e = info.value
    assert e.ename == "RqlabError" and message in e.evalue
    assert e.cell_index == VALIDATION_CELL
    assert not (tmp_path / "results.json").exists()
