"""The report's claims table (rqlab/report/claims.py), its place in index.html, the
findings page generated from summary.json (rqlab/report/findings.py), and a default grid
without repeated runs. Synthetic results.json files in tmp_path, built with the same
readings the studies use; no notebook runs.
"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rqlab.analysis import readings
from rqlab.report import claims as C
from rqlab.report.html import index_html
from rqlab.stats import diff_half_width

ROOT = Path(__file__).resolve().parents[1]


# ---- the verdict rule and the intervals behind it ---------------------------------------------

@pytest.mark.parametrize("ci, expected", [((0.01, 0.2), "reproduced"), ((-0.2, -0.01), "not reproduced"),
                                          ((-0.1, 0.1), "inconclusive"), ((0.0, 0.1), "inconclusive"),
                                          ((-0.1, 0.0), "inconclusive")])
def test_verdict_rule(ci, expected):
    assert C.verdict(ci) == expected


def test_difference_interval_is_the_stats_half_width():
    d = readings.difference(0.6, 0.5, 100)   # stats docstring: diff_half_width(0.6, 0.5, 100) = 0.137
    assert d["difference"] == pytest.approx(0.1)
    assert d["ci95"] == pytest.approx([0.1 - 0.1371, 0.1 + 0.1371], abs=1e-3)


def dq_results(dq: float, vanilla: float, n: int) -> dict:
    acc = {"DQ": [{"bits": 2, "clean_accuracy": 0.5, "robust_accuracy": 0.1},
                  {"bits": 4, "clean_accuracy": 0.8, "robust_accuracy": dq}],
           "vanilla": [{"bits": 2, "clean_accuracy": 0.5, "robust_accuracy": 0.3},
                       {"bits": 4, "clean_accuracy": 0.8, "robust_accuracy": vanilla}]}
    amp = {"DQ": {"layers": ["conv1", "logits"], "amplification": [0.2, 0.3]},
           "vanilla": {"layers": ["conv1", "logits"], "amplification": [0.2, 0.5]}}
    return {"dq_vs_vanilla": readings.dq_comparison(acc, amp, n, bits=4), "n_examples": n}


def double_win_results(random: float, fixed: float, n: int) -> dict:
    def scores(acc):
        return {"paper": {"robust_accuracy": acc + 0.05, "n": n}, "eot_pgd": {"robust_accuracy": acc, "n": n}}
    same = {label: {"policy": "8", **readings.same_model_gain(scores(random), scores(fixed))}
            for label in ("RPI", "RPI+RPT")}
    return {"same_model": same, "aa_reduced": True, "n_examples": n}


def transfer_results(diag: float, off: float, n: int, model: str = "fmnist-q4-pgd7-small") -> dict:
    tm = {"row_labels": ["4", "8"], "col_labels": ["4", "8"], "matrix": [[diag, off], [off, diag]]}
    r = readings.transfer_reading(tm, n=n)
    return {**{k: {model: r[k]} for k in ("diagonal_mean", "off_diagonal_mean", "gap", "gap_ci95")},
            "n_examples": n, "bits": [4, 8]}


def bit_selection_results(lipschitz: list, uniform: list, n: int) -> dict:
    budgets = [3.0, 4.0]
    rows = [{"budget": b, "method": m, "robust_accuracy": a} for m, accs in (("lipschitz", lipschitz),
                                                                           ("uniform", uniform))
            for b, a in zip(budgets, accs)]
    r = readings.allocation_reading(rows, n=n)
    return {"robust_accuracy": {"lipschitz": lipschitz, "uniform": uniform}, "budgets": budgets,
            "model": "fmnist-fp-pgd7-small", "n_examples": n, "lipschitz_wins": r["wins"],
            "lipschitz_gain_mean": r["gain_mean"], "lipschitz_gain_ci95": r["gain_mean_ci95"]}


def odgq_results(odgq: float, natural: float, ratio: float | None, n: int = 200) -> dict:
    curves = {"natural": {"robust_accuracy": [natural]}, "odgq": {"robust_accuracy": [odgq]}}
    r = readings.curves_reading(curves, {"natural": 1.0, "odgq": ratio}, n=n,
                                cost=None if ratio is None else {"natural": 1.0, "odgq": ratio})
    return {"bits": [4], "source": "zoo", "final_robust_accuracy": {"4": r["final_robust_accuracy"]},
            "odgq_gain": {"4": {"gain": r["robust_gain"], "ci95": r["robust_gain_ci95"], "n": n,
                                "time_ratio": ratio, "cheap": r["cheap"]}}}


def test_readings_give_the_intervals_the_claims_use():
    dq = dq_results(0.4, 0.2, 500)["dq_vs_vanilla"]
    h = diff_half_width(0.4, 0.2, 500)
    assert dq["gain"] == pytest.approx(0.2) and dq["ci95"] == pytest.approx([0.2 - h, 0.2 + h])
    assert dq["amplification_logits"] == {"DQ": 0.3, "vanilla": 0.5}
    assert readings.dq_comparison({"DQ": [], "vanilla": []}, {}, 10, bits=4) is None   # bits not measured
    assert dq["paired"] is False
    # rows with per-example outcomes on the same examples pair: DQ right wherever vanilla is, and on 2 more of 10
    acc = {"DQ": [{"bits": 4, "clean_accuracy": 0.8, "robust_accuracy": 0.5, "robust_per_example": [1] * 5 + [0] * 5}],
           "vanilla": [{"bits": 4, "clean_accuracy": 0.8, "robust_accuracy": 0.3,
                        "robust_per_example": [1] * 3 + [0] * 7}]}
    amp = {k: {"layers": ["logits"], "amplification": [0.5]} for k in acc}
    paired = readings.dq_comparison(acc, amp, 10, bits=4)
    assert paired["paired"] is True and paired["gain"] == pytest.approx(0.2) and paired["n"] == 10
    assert paired["ci95"][1] - paired["ci95"][0] < 2 * diff_half_width(0.5, 0.3, 10)

    same = double_win_results(0.3, 0.5, 200)["same_model"]["RPI+RPT"]
    assert (same["random_strongest"], same["fixed_strongest"]) == ("eot_pgd", "eot_pgd")  # the lower of each
    assert same["gain"] == pytest.approx(-0.2) and same["paper_gain"] == pytest.approx(-0.2)
    assert same["ci95"][1] < 0

    t = transfer_results(0.5, 0.7, 300)
    assert t["gap"]["fmnist-q4-pgd7-small"] == pytest.approx(0.2)
    h = diff_half_width(0.7, 0.5, 300)
    assert t["gap_ci95"]["fmnist-q4-pgd7-small"] == pytest.approx([0.2 - h, 0.2 + h])

    b = bit_selection_results([0.55, 0.65], [0.60, 0.60], 200)
    hs = [diff_half_width(0.55, 0.6, 200), diff_half_width(0.65, 0.6, 200)]
    assert b["lipschitz_gain_mean"] == pytest.approx(0.0)
    assert b["lipschitz_gain_ci95"] == pytest.approx([-sum(hs) / 2, sum(hs) / 2])

    o = odgq_results(0.5, 0.1, 3.0)["odgq_gain"]["4"]
    assert o["gain"] == pytest.approx(0.4) and o["ci95"][0] > 0 and o["cheap"] is False


# ---- a synthetic report folder ----------------------------------------------------------------

def run_row(run_id: str, notebook: str, status: str = "ok", params: dict | None = None) -> dict:
    stem = notebook
    files = {"notebook": f"{run_id}/{stem}.ipynb", "html": f"{run_id}/{stem}.html", "figure": f"{run_id}/figure.png"}
    return {"run_id": run_id, "notebook": notebook, "entry": "runs[0]", "status": status,
            "error": None if status == "ok" else "RuntimeError: boom", "traceback": None, "params": params or {},
            "grid": {}, "results": {}, "result_files": ["results.json"], "warnings": [], "files": files,
            "seconds": 1.0}


def make_report(out: Path, results: dict, extra_rows=()) -> list[dict]:
    """OUT/<run-id>/results.json for each {(run_id, notebook, params): results}; returns the rows."""
    rows = []
    for (run_id, notebook, params), res in results.items():
        (out / run_id).mkdir(parents=True)
        (out / run_id / "results.json").write_text(json.dumps(res))
        (out / run_id / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        rows.append(run_row(run_id, notebook, params=dict(params)))
    return rows + list(extra_rows)


def full_report(out: Path) -> list[dict]:
    return make_report(out, {
        ("02_lipschitz_error_amplification", "02_lipschitz_error_amplification", ()): dq_results(0.4, 0.2, 500),
        ("05_double_win_quant", "05_double_win_quant", ()): double_win_results(0.3, 0.5, 200),
        # two transfer runs: the claim reads the 4-bit model's, whatever the order
        ("01__model=fp", "01_precision_transferability", (("model", "fmnist-fp-pgd7-small"),)):
            transfer_results(0.5, 0.9, 200, "fmnist-fp-pgd7-small"),
        ("01__model=q4", "01_precision_transferability", (("model", "fmnist-q4-pgd7-small"),)):
            transfer_results(0.60, 0.61, 200),
        ("03_bit_selection", "03_bit_selection", ()): bit_selection_results([0.55, 0.65], [0.60, 0.60], 200),
        ("04_odgq_training_curves", "04_odgq_training_curves", ()): odgq_results(0.5, 0.1, 1.1),
    })


def test_claims_from_a_report(tmp_path):
    rows = C.claims_table(tmp_path, full_report(tmp_path))
    assert [r["id"] for r in rows] == ["a", "b", "t", "c", "d"]
    by = {r["id"]: r for r in rows}
    assert {k: r["verdict"] for k, r in by.items()} == {"a": "reproduced", "b": "not reproduced", "t": "inconclusive",
                                                        "c": "inconclusive", "d": "reproduced"}
    assert by["t"]["run_id"] == "01__model=q4" and by["t"]["value"] == pytest.approx(0.01)
    assert by["a"]["value"] == pytest.approx(0.2) and by["a"]["n"] == 500
    assert by["b"]["value"] == pytest.approx(-0.2) and by["b"]["details"]["RPI"]["gain"] == pytest.approx(-0.2)
    for r in rows:
        assert r["link"] == f"{r['run_id']}/{r['notebook']}.html" and r["figure_file"] == f"{r['run_id']}/figure.png"
        assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
        assert r["paper"] and r["claim"] and r["paper_figure"] and r["reason"]
    assert "+20.0 points" in by["a"]["reason"] and "+1.0 points" in by["t"]["figure"]
    json.dumps(rows)  # summary.json holds them


def test_odgq_too_slow_is_not_reproduced(tmp_path):
    rows = make_report(tmp_path, {("04", "04_odgq_training_curves", ()): odgq_results(0.5, 0.1, 3.0)})
    d = C.claims_table(tmp_path, rows)[-1]
    assert d["ci95"][0] > 0 and d["verdict"] == "not reproduced" and "3.00x" in d["reason"]


def test_odgq_reads_4_bits_and_gives_the_others_as_context(tmp_path):
    res = odgq_results(0.5, 0.1, 3.0)
    one = odgq_results(0.3, 0.1, 1.5)
    res["bits"] = [1, 4]   # as the study sorts them
    res["odgq_gain"]["1"] = one["odgq_gain"]["4"]
    res["final_robust_accuracy"]["1"] = one["final_robust_accuracy"]["4"]
    d = C.claims_table(tmp_path, make_report(tmp_path, {("04", "04_odgq_training_curves", ()): res}))[-1]
    assert d["details"]["bits"] == 4 and d["value"] == pytest.approx(0.4) and d["verdict"] == "not reproduced"
    assert "At 1 bit: +20.0 points over natural training" in d["reason"] and "1.50x" in d["reason"]


def test_odgq_without_a_controlled_cost_is_inconclusive(tmp_path):
    rows = make_report(tmp_path, {("04", "04_odgq_training_curves", ()): odgq_results(0.5, 0.1, None)})
    d = C.claims_table(tmp_path, rows)[-1]
    assert d["ci95"][0] > 0 and d["verdict"] == "inconclusive" and "no controlled measurement" in d["reason"]
    res = odgq_results(0.5, 0.1, 1.9)
    res["odgq_gain"]["4"].update(cheap=None, time_range=[1.5, 2.8])   # repetitions on both sides of 2x
    d = C.claims_table(tmp_path / "straddle", make_report(tmp_path / "straddle",
                                                          {("04", "04_odgq_training_curves", ()): res}))[-1]
    assert d["verdict"] == "inconclusive" and "1.50x to 2.80x" in d["reason"]


def test_missing_failed_and_outdated_runs(tmp_path):
    rows = make_report(tmp_path, {("02", "02_lipschitz_error_amplification", ()): {"n_examples": 200},
                                  ("04", "04_odgq_training_curves", ()): odgq_results(0.5, 0.1, 1.0)},
                       extra_rows=[run_row("05", "05_double_win_quant", status="failed")])
    by = {r["id"]: r for r in C.claims_table(tmp_path, rows)}
    assert by["t"]["verdict"] == "not run" and by["t"]["run_id"] is None and "--only" in by["t"]["reason"]
    assert by["c"]["verdict"] == "not run"
    assert by["b"]["verdict"] == "not run" and "failed" in by["b"]["reason"] and by["b"]["value"] is None
    assert by["a"]["verdict"] == "inconclusive" and "lacks" in by["a"]["reason"]   # an older results.json
    assert by["d"]["verdict"] == "reproduced"
    assert {r["id"] for r in C.claims_table(tmp_path, [])} == {"a", "b", "t", "c", "d"}
    assert all(r["verdict"] == "not run" for r in C.claims_table(tmp_path, []))


# ---- index.html ---------------------------------------------------------------------------------

def summary_of(out: Path, rows: list[dict]) -> dict:
    return {"format": "rqlab-report", "version": 1,
            "environment": {"rqlab": "0", "git_commit": "abc123", "device": "cpu", "torch": "2", "python": "3",
                            "platform": "linux", "cpu": "AMD EPYC 7B13"},
            "config": "reports/default.yaml", "profile": "quick", "only": None, "jobs": 1,
            "started": "2026-12-03T00:00:00+00:00", "wall_time_s": 12.0, "in_progress": False,
            "batch": [r["run_id"] for r in rows], "n_runs": len(rows), "n_failed": 0, "runs": rows,
            "zoo": [{"name": "fmnist-q8-pgd7-small", "summary": "PGD-7 at 8 bits", "precision": "8",
                     "clean_accuracy": 0.722, "standard": 0.596, "standard_ci95": [0.552, 0.638], "standard_n": 500,
                     "strongest": "apgd-t", "unreliable": [], "device": "cpu (AMD EPYC)", "pgd20": 0.618}],
            "claims": C.claims_table(out, rows)}


class Tables(HTMLParser):
    """The tables of a page, in order: for each, its class and the hrefs inside it; and
    the img src values outside tables, with the href of the link around each."""

    def __init__(self):
        super().__init__()
        self.tables, self.depth, self.images, self.href = [], 0, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.depth += 1
            if self.depth == 1:
                self.tables.append({"class": a.get("class"), "hrefs": []})
        elif tag == "a" and self.depth:
            self.tables[-1]["hrefs"].append(a["href"])
        elif tag == "a":
            self.href = a["href"]
        elif tag == "img" and not self.depth:
            self.images.append((a["src"], self.href))

    def handle_endtag(self, tag):
        if tag == "table":
            self.depth -= 1


def test_index_opens_with_the_claims_table(tmp_path):
    summary = summary_of(tmp_path, full_report(tmp_path))
    page = index_html(summary)
    parser = Tables()
    parser.feed(page)
    first = parser.tables[0]
    assert first["class"] == "claims"
    assert first["hrefs"] == [r["link"] for r in summary["claims"]]       # each claim links its run
    # then one large figure per claim, linked to its run's page
    assert parser.images == [(r["figure_file"], r["link"]) for r in summary["claims"]]
    assert page.index('class="claims"') < page.index('class="env"') < page.index("<th>run</th><th>figure</th>")
    for r in summary["claims"]:
        assert f'class="v-{r["verdict"].replace(" ", "-")}">{r["verdict"]}<' in page


def test_index_without_claims_still_renders(tmp_path):
    summary = summary_of(tmp_path, [])
    del summary["claims"]
    assert 'class="claims"' not in index_html(summary)


# ---- docs/findings.md from summary.json -----------------------------------------------------------

def test_findings_page_carries_the_summary_numbers(tmp_path):
    from rqlab.report import findings

    out = tmp_path / "reports" / "out"
    summary = summary_of(out, full_report(out))
    (out / "summary.json").write_text(json.dumps(summary))
    md = tmp_path / "docs" / "findings.md"
    md.parent.mkdir()
    assert findings.main([str(out / "summary.json"), str(md)]) == 0
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table) == len(summary["claims"]) == 5
    for r, line in zip(summary["claims"], table):
        assert f"**{r['verdict']}**" in line and f"({r['id']})" in line
        lo, hi = r["ci95"]
        assert f"[{100 * lo:+.1f}, {100 * hi:+.1f}] points, n = {r['n']}" in line
        assert r["figure"] in text and r["reason"] in text
        assert f"difference {100 * r['value']:+.1f} points" in text
        assert f"[`{r['run_id']}`](../reports/out/{r['link']})" in line     # relative to docs/
    assert "AMD EPYC 7B13" in text and "abc123" in text and "`quick`" in text
    assert "| fmnist-q8-pgd7-small | 8 | 72.2% | 59.6% [55.2%, 63.8%] | 500 |" in text
    # every percentage in the page is one of summary.json's numbers (or the paper's, quoted in it)
    quoted = json.dumps(summary)
    for m in set(re.findall(r"(\d+\.\d)%", text)):
        v = float(m) / 100
        assert any(abs(v - float(x)) < 6e-4 for x in re.findall(r"\d+\.\d+(?:e-?\d+)?", quoted)) \
            or f"{m}%" in quoted, m


def test_findings_refuses_what_is_not_a_summary(tmp_path):
    from rqlab.report import findings
    from rqlab.validate import RqlabError

    with pytest.raises(RqlabError, match="summary"):
        findings.findings_markdown({"format": "something else"})
    assert findings.main([str(tmp_path / "missing.json"), str(tmp_path / "f.md")]) == 2
    assert not (tmp_path / "f.md").exists()


def b_standard(fixed: list, rpi: list) -> dict:
    """A b_standard.json as scripts/findings.py --section B writes it, from per-example scores."""
    from rqlab.stats import paired_difference

    diff, ci = paired_difference(rpi, fixed)
    side = lambda v: {"clean": 0.8, "robust": sum(v) / len(v), "ci95": [0.5, 0.7], "strongest": "autoattack",  # noqa: E731
                      "unreliable": [], "device": "cpu (AMD EPYC 7B13)", "wall_time_s": 1500.0}
    return {"n": len(fixed), "passes": 5, "torch": "2.14.1", "seconds": 3600.0,
            "rows": [{"model": "fmnist-rpt-pgd7-small", "difference": diff, "difference_ci95": list(ci),
                      "fixed8": side(fixed), "rpi": side(rpi)}]}


def test_findings_page_adds_claim_b_under_the_standard_protocol(tmp_path):
    from rqlab.report import findings
    from rqlab.validate import RqlabError

    out = tmp_path / "reports" / "out"
    summary = summary_of(out, full_report(out))
    (out / "summary.json").write_text(json.dumps(summary))
    worse = b_standard([1, 1, 1, 0] * 25, [1, 0, 0, 0] * 25)        # RPI loses 50 points: not reproduced
    (tmp_path / "b.json").write_text(json.dumps(worse))
    md = tmp_path / "findings.md"
    assert findings.main([str(out / "summary.json"), str(md), "--standard-b", str(tmp_path / "b.json")]) == 0
    text = md.read_text()
    section = text[text.index("## (b) at full strength"):]
    assert section.index("**not reproduced**") < section.index(findings.NOTES.splitlines()[0])  # before the notes
    assert "| fmnist-rpt-pgd7-small | RPI 4..8 | 80.0% | 25.0% [50.0%, 70.0%] | autoattack | - | -50.0 [" in text
    assert "AMD EPYC 7B13" in section and "--section B --n 500" in section
    assert "50 min of measurement in all" in section  # the records' own times (resumed runs), not the last run's
    even = findings.standard_b_markdown(b_standard([1, 0] * 50, [0, 1] * 50))
    assert "**inconclusive**" in even
    with pytest.raises(RqlabError, match="standard_b"):
        findings.standard_b_markdown({"rows": [{}], "n": 1, "passes": 1})
    assert findings.main([str(out / "summary.json"), str(md), "--standard-b", str(tmp_path / "nope.json")]) == 2
    assert md.read_text() == text  # a failed run leaves the page as it was


def test_findings_page_shows_the_zoo_training_curves(tmp_path, monkeypatch):
    from rqlab import zoo
    from rqlab.report import findings, zoo_curves

    out = tmp_path / "reports" / "out"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(summary_of(out, full_report(out))))
    pgd = [0.6, 0.7, 0.7, 0.71, 0.71]                      # +1.0 point over the last 3 epochs
    rows = [{"epoch": e, "clean_accuracy": 0.8, "robust_accuracy": r} for e, r in enumerate(pgd, 1)]
    fake = {"fmnist-fp-pgd7": {"history": rows, "status": "built", "epochs": 5, "device": "cpu (X, 1 thread)",
                               "plateau": zoo.plateau(rows, tol=zoo.FULL_PLATEAU_TOL)}}
    monkeypatch.setattr(zoo_curves, "zoo_curves", lambda names=None, runs=None: fake)   # the cards, as drawn
    (tmp_path / "docs").mkdir()
    md, fig = tmp_path / "docs" / "findings.md", tmp_path / "docs" / "zoo_curves.png"
    assert findings.main([str(out / "summary.json"), str(md), "--curves", str(fig)]) == 0
    text = md.read_text()
    section = text[text.index("## The zoo's training curves"):text.index(findings.NOTES.splitlines()[0])]
    assert "![held-out training curves of the full-budget zoo](zoo_curves.png)" in section   # relative to the page
    assert "fmnist-fp-pgd7 +1.0" in section and fig.read_bytes()[:4] == b"\x89PNG"
    assert findings.main([str(out / "summary.json"), str(md), "--curves", str(tmp_path / "c.txt")]) == 2
    assert md.read_text() == text and not (tmp_path / "c.txt").exists()


def test_findings_page_links_the_hand_written_notes(tmp_path):
    from rqlab.report import findings

    out = tmp_path / "reports" / "out"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(summary_of(out, full_report(out))))
    (tmp_path / "docs").mkdir()
    md, notes = tmp_path / "docs" / "findings.md", tmp_path / "docs" / "findings-notes.md"
    assert findings.main([str(out / "summary.json"), str(md), "--notes", str(notes)]) == 2   # no such page
    assert not md.exists()
    notes.write_text("# notes\n")
    assert findings.main([str(out / "summary.json"), str(md), "--notes", str(notes)]) == 0
    text = md.read_text()
    assert text.index("[findings-notes.md](findings-notes.md)") < text.index("## The claims")


# ---- the default grid ---------------------------------------------------------------------------

# Parameters that only choose what a run highlights, with what the run computes instead:
# notebook 02 trains `betas` and `beta` (Params.sweep_betas); `beta` picks the one shown.
def effective(run) -> dict:
    params = dict(run.params)
    if run.notebook == "02_lipschitz_error_amplification":
        from rqlab.studies.amplification import Params

        d = Params.defaults()
        params["trained_betas"] = sorted({*params.pop("betas", d["betas"]), params.pop("beta", d["beta"])})
    return params


def repeated_runs(config_path) -> list:
    pytest.importorskip("nbformat")
    pytest.importorskip("yaml")
    from rqlab import report

    cfg = report.load_config(config_path, notebooks_dir=ROOT / "notebooks")
    repeats = []
    for profile in cfg.profiles:
        runs = report.plan(cfg, profile)
        for i, a in enumerate(runs):
            for b in runs[i + 1:]:
                if a.notebook == b.notebook and effective(a) == effective(b):
                    repeats.append((profile, a.run_id, b.run_id))
    return repeats


def test_the_default_grid_repeats_no_run():
    assert repeated_runs(ROOT / "reports" / "default.yaml") == []


def test_a_beta_grid_over_the_same_sweep_is_a_repeat(tmp_path):
    """What the check catches: notebook 02 gridded over beta values the sweep trains anyway."""
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((ROOT / "reports" / "default.yaml").read_text())
    entry = next(e for e in cfg["runs"] if e["notebook"] == "02_lipschitz_error_amplification")
    entry["params"].pop("beta", None)
    entry["grid"] = {"beta": [0.001, 0.003]}
    cfg["notebooks_dir"] = str(ROOT / "notebooks")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    repeats = repeated_runs(path)
    assert {p for p, _, _ in repeats} == {"quick", "findings", "full"}   # smoke sets betas [0.0]: the two runs differ there


def test_index_claim_rows_without_a_run_page(tmp_path):
    """Not run: no link; a run whose HTML export failed: its id, no link to a missing page."""
    rows = make_report(tmp_path, {("03", "03_bit_selection", ()): bit_selection_results([0.6, 0.6], [0.6, 0.6], 50)})
    rows[0]["files"]["html"] = None
    page = index_html(summary_of(tmp_path, rows))
    parser = Tables()
    parser.feed(page)
    assert parser.tables[0]["hrefs"] == [] and parser.images == [("03/figure.png", None)]
    assert '<span class="kv">03</span>' in page
    assert page.count('class="v-not-run"') == 4   # the other four claims: a table row each, no figure


@pytest.mark.parametrize("model", ["fmnist-q4-pgd7", "fmnist-q4-pgd7-small"])
def test_the_transfer_claim_reads_the_4_bit_model(tmp_path, model):
    rows = make_report(tmp_path, {
        ("fp", "01_precision_transferability", (("model", "fmnist-fp-pgd7"),)): transfer_results(0.5, 0.9, 200),
        ("q4", "01_precision_transferability", (("model", model),)): transfer_results(0.6, 0.61, 200)})
    t = next(r for r in C.claims_table(tmp_path, rows) if r["id"] == "t")
    assert t["run_id"] == "q4" and t["value"] == pytest.approx(0.01)
    rows[1]["status"] = "failed"   # a failed preferred run: the claim says so rather than read another model
    t = next(r for r in C.claims_table(tmp_path, rows) if r["id"] == "t")
    assert t["run_id"] == "q4" and t["verdict"] == "not run" and "failed" in t["reason"]


def test_bit_selection_claim_names_the_sensitivity_baselines_when_the_run_had_them():
    from rqlab.report.claims import _bit_selection

    res = bit_selection_results([0.55, 0.65], [0.60, 0.60], 200)
    assert "hessian" not in _bit_selection(res)["reason"]
    res["robust_accuracy"].update(hessian=[0.62, 0.60], margin=[0.58, 0.56])
    row = _bit_selection(res)
    assert row["details"]["baselines_minus_uniform"] == pytest.approx({"hessian": 0.01, "margin": -0.03})
    assert "hessian +1.0" in row["reason"] and "margin -3.0" in row["reason"]


def test_dq_claim_names_the_beta_sweep_and_its_source():
    from rqlab.report.claims import _dq

    res = dq_results(0.4, 0.2, 500)
    assert "Beta sweep" not in _dq(res)["reason"]
    res.update(beta_sweep=[{"beta": 0.0, "robust_accuracy": 0.2}, {"beta": 0.001, "robust_accuracy": 0.25},
                           {"beta": 0.01, "robust_accuracy": 0.3}], beta_source="models")
    row = _dq(res)
    assert "Beta sweep (trained models, 3 strengths), robust accuracy at w32a4: beta 0 20.0%, beta 0.001 25.0%, " \
           "beta 0.01 30.0%." in row["reason"]
    assert row["details"]["beta_sweep"] == {"0": 0.2, "0.001": 0.25, "0.01": 0.3}
    assert "trained live on a subset" in _dq({**res, "beta_source": "live"})["reason"]


def test_measured_on_names_each_machine_once_across_the_old_1_threads_spelling():
    from rqlab.report import findings

    row = dict(precision="4", clean_accuracy=0.8, standard=0.5, pgd20=0.6)
    rows = [dict(row, name=f"m{i}", device=d) for i, d in
            enumerate(["cpu (X, 1 threads)", "cpu (X, 1 thread)", "cpu (X, 2 threads)", None])]
    assert findings.zoo_markdown(rows).endswith("\n\nMeasured on cpu (X, 1 thread), cpu (X, 2 threads).")
    assert "Measured on cpu (X, 1 thread), cpu (X, 2 threads)." in " ".join(index_html_zoo(rows).split())


def index_html_zoo(rows: list) -> str:
    from rqlab.report import html

    return html._zoo_table([dict(r, summary="", standard_ci95=[0.4, 0.6], standard_n=500, strongest="autoattack",
                                 unreliable=[]) for r in rows])


# ---- claims (a) and (d) under the standard protocol: the cards' records, paired ----------------

def fake_record(model: str, robust: list, unreliable=()):
    from rqlab.record import Record

    n, acc = len(robust), sum(robust) / len(robust)
    return Record(model=model, policy={}, threat={}, n=n, passes=1, seed=0, clean_accuracy=1.0,
                  clean_ci95=(1.0, 1.0), clean_worst_accuracy=1.0, clean_worst_ci95=(1.0, 1.0),
                  robust_accuracy=acc, robust_ci95=(acc, acc), robust_worst_accuracy=acc,
                  robust_worst_ci95=(acc, acc), per_example={"clean": [1] * n, "robust": list(robust)},
                  protocol="standard", unreliable=tuple(unreliable))


def test_standard_claims_pair_the_committed_cards_example_by_example():
    """Each measured row is the mean of the per-example differences of the two cards'
    records (read here from the files themselves) on their common first n images."""
    from rqlab import zoo
    from rqlab.report.standard import PAIRS, standard_claims

    rows = standard_claims()
    assert [r["id"] for r in rows] == [p.id for p in PAIRS]
    measured = [r for r in rows if r["value"] is not None]
    if not measured:
        pytest.skip("no pair of the zoo is measured under the standard protocol")
    for r in measured:
        def robust(side):  # the entry at the side's precision (claim (b)'s same-model rows), else at eps
            c, at = zoo.card(r[side]), r[f"{side}_at"]
            entry = zoo.standard_precisions(c)[at] if at is not None else zoo.standard_entries(c)[r["eps"]]
            rec = json.loads((zoo.STORE / entry["record"]).read_text())
            pe = rec["per_example"]  # a random policy's: the share of its passes robust
            return [h / rec["passes"] for h in pe["robust_hits"]] if "robust_hits" in pe else pe["robust"]

        better, worse = robust("better"), robust("worse")
        n = min(len(better), len(worse))
        assert r["n"] == n
        assert r["value"] == pytest.approx(sum(a - b for a, b in zip(better[:n], worse[:n])) / n)
        assert r["ci95"][0] <= r["value"] <= r["ci95"][1] and r["verdict"] in (C.verdict(r["ci95"]), None)
        assert r["better"].endswith("-small") == r["worse"].endswith("-small") == (r["budget"] == "small")


def test_standard_claims_prefer_full_budget_pair_only_when_fair_fallback(monkeypatch):
    """Full-budget records win over the -small ones; unequal n pair on the first images;
    a pair without a fair -small fallback and without full records is 'not run', naming
    what is missing; a flagged record is named in the row."""
    from rqlab import zoo
    from rqlab.report import standard as S

    ones, zeros = [1] * 8, [0] * 8
    recs = {"fmnist-dq-natural": fake_record("dq", ones + zeros, ["black-box: Square"]),   # n 16: paired on 8
            "fmnist-a4-natural": fake_record("a4", zeros),
            "fmnist-dq-natural-small": fake_record("dq-small", zeros), "fmnist-a4-natural-small": fake_record("a4", ones),
            "fmnist-odgq-q4-small": fake_record("o", [1, 0] * 4), "fmnist-q4-natural-small": fake_record("n", [0, 1] * 4),
            "fmnist-fp-natural-small": fake_record("fp", ones)}
    monkeypatch.setattr(zoo, "standard_record", lambda name, eps=None, precision=None: recs.get(
        (name, precision) if precision else name if eps is None else (name, eps)))
    rows = S.standard_claims()
    row = lambda start: next(r for r in rows if r["text"].startswith(start))  # noqa: E731
    dq = row("DQ (beta 3e-3)")
    assert (dq["better"], dq["budget"], dq["n"], dq["value"], dq["verdict"]) == ("fmnist-dq-natural", "full", 8, 1.0,
                                                                                  "reproduced")
    assert dq["flags"] == ["fmnist-dq-natural: black-box: Square"] and "upper bound" in dq["reason"]
    fp = row("Vanilla quantization")   # fp-natural-small exists, but its budget is not a4-small's
    assert fp["verdict"] == "not run" and fp["value"] is None and "fmnist-fp-natural (" in fp["reason"]
    d4 = row("ODG-Q is far above natural training at 4 bits")
    assert d4["budget"] == "small" and d4["value"] == 0.0 and d4["verdict"] == "inconclusive"
    assert "-small models" in d4["reason"]
    floor = S.pair_row(S.PAIRS[0], {"fmnist-dq-natural": fake_record("dq", zeros),
                                    "fmnist-a4-natural": fake_record("a4", zeros)}.get)
    assert floor["verdict"] == "inconclusive" and "a floor" in floor["reason"]
    context = [r for r in rows if not r["judged"]]
    assert context and all(r["verdict"] is None for r in context)
    # claim (a) at the small eps reads the cards' records at that eps, full budget only
    small_eps = [r for r in rows if r["eps"] is not None]
    assert {r["eps"] for r in small_eps} == {zoo.SMALL_EPS} and {r["id"] for r in small_eps} == {"a"}
    assert all(r["verdict"] == "not run" and "-small" not in r["reason"] for r in small_eps)
    recs.update({("fmnist-dq-natural", zoo.SMALL_EPS): fake_record("dq", [1, 1, 0, 1]),
                 ("fmnist-a4-natural", zoo.SMALL_EPS): fake_record("a4", [0, 1, 0, 0])})
    at = S.standard_claims()[len(S._A)]
    assert at["text"].endswith(f"at eps {zoo.SMALL_EPS:g}") and (at["value"], at["n"]) == (0.5, 4)
    assert at["better"] == "fmnist-dq-natural" and at["budget"] == "full"
    # claim (b): a model against itself at another precision of its card (full budget only)
    rpt = row("RPI+RPT")
    assert rpt["verdict"] == "not run" and rpt["headline"] and "fmnist-rpt-pgd7-small" not in rpt["reason"]
    assert "fmnist-rpt-pgd7 (not built)" in rpt["reason"] or "fmnist-rpt-pgd7 (not measured)" in rpt["reason"]
    assert "fmnist-rpt-pgd7 at precision 8 (not" in rpt["reason"]
    recs.update({"fmnist-rpt-pgd7": fake_record("rpt", [1, 1, 1, 0]), ("fmnist-rpt-pgd7", "8"): fake_record("f", [1, 0, 1, 0]),
                 ("fmnist-q8-pgd7", "4-8"): fake_record("rpi", [0, 0, 1, 1]), "fmnist-q8-pgd7": fake_record("q8", [0, 0, 1, 1])})
    rows = S.standard_claims()
    rpt, rpi = row("RPI+RPT"), row("RPI alone")
    assert (rpt["better"], rpt["worse"], rpt["worse_at"], rpt["value"], rpt["n"]) == (
        "fmnist-rpt-pgd7", "fmnist-rpt-pgd7", "8", 0.25, 4)
    assert set(rpt["robust"]) == {"fmnist-rpt-pgd7", "fmnist-rpt-pgd7 at precision 8"}
    assert "fmnist-rpt-pgd7 at precision 8 50.0%" in rpt["reason"]
    assert (rpi["better_at"], rpi["value"], rpi["verdict"]) == ("4-8", 0.0, "inconclusive")
    from rqlab.report.claims import with_standard
    table_row = {"id": "b", "value": 0.1, "ci95": [0.0, 0.2], "verdict": "inconclusive", "run_id": "05",
                 "figure": "RPI+RPT ...", "reason": "notebook"}
    got = with_standard(table_row, rows)
    assert got["source"] == "standard" and got["value"] == 0.25
    assert got["figure"].startswith("fmnist-rpt-pgd7 minus fmnist-rpt-pgd7 at precision 8, standard protocol")


def test_standard_claims_in_findings_page_and_index():
    from rqlab.report.findings import standard_claims_markdown
    from rqlab.report.html import _standard_section

    row = {"id": "d", "text": "ODG-Q minus natural", "judged": True, "better": "a", "worse": "b", "budget": "full",
           "value": 0.168, "ci95": [0.135, 0.201], "n": 500, "robust": {}, "verdict": "reproduced", "flags": [],
           "reason": "same 500 images"}
    md = standard_claims_markdown([row, {**row, "judged": False, "verdict": None, "value": None, "better": None}])
    assert "| (d) | ODG-Q minus natural | a - b | +16.8 [+13.5, +20.1] | 500 | **reproduced** |" in md
    assert "| context |" in md
    page = _standard_section([row])
    assert 'class="v-reproduced"' in page and "+16.8" in page
    b = {**row, "id": "b", "better": "rpt", "worse": "rpt", "worse_at": "8"}    # claim (b): one model, two precisions
    assert "| rpt - rpt at precision 8 |" in standard_claims_markdown([b])
    assert '<span class="kv">rpt at precision 8</span>' in _standard_section([b])


def test_the_dq_claim_reads_the_small_eps_run(tmp_path):
    """Claim (a) is judged at zoo.SMALL_EPS where the report ran notebook 02 there too (at
    eps 0.1 the full-budget natural models are at the floor); its figure names the eps."""
    from rqlab import zoo

    small = dq_results(0.5, 0.3, 200) | {"threat": {"eps": zoo.SMALL_EPS}}
    default = dq_results(0.01, 0.01, 200) | {"threat": {"eps": 0.1}}
    rows = make_report(tmp_path, {
        ("e1", "02_lipschitz_error_amplification", (("eps", 0.1),)): default,
        ("e03", "02_lipschitz_error_amplification", (("eps", zoo.SMALL_EPS),)): small})
    a = next(r for r in C.claims_table(tmp_path, rows) if r["id"] == "a")
    assert a["run_id"] == "e03" and a["value"] == pytest.approx(0.2)
    assert f"eps {zoo.SMALL_EPS:g}" in a["figure"]
    rows = [r for r in rows if r["run_id"] == "e1"]  # without that run: the default one
    a = next(r for r in C.claims_table(tmp_path, rows) if r["id"] == "a")
    assert a["run_id"] == "e1" and "eps 0.1" in a["figure"]


def test_claims_table_headlines_the_standard_protocol_where_measured(tmp_path):
    """A claim whose standard-protocol comparison (marked headline) is measured takes its
    figure, interval and verdict from it, the notebook's figure kept in the reason; a verdict
    forced by ODG-Q's epoch time stands; unmeasured or non-headline rows change nothing."""
    rows = make_report(tmp_path, {
        ("02", "02_lipschitz_error_amplification", ()): dq_results(0.6, 0.4, 200),
        ("04", "04_odgq_training_curves", ()): odgq_results(0.5, 0.1, 3.0)})   # 3x natural: not cheap
    std = lambda id, value, ci, headline=True: {"id": id, "headline": headline, "value": value, "ci95": ci,  # noqa: E731
                                                "n": 500, "eps": 0.03 if id == "a" else None, "better": "x",
                                                "worse": "y", "verdict": C.verdict(ci), "reason": "paired."}
    plain = {r["id"]: r for r in C.claims_table(tmp_path, rows)}
    assert plain["a"]["source"] == "notebook" and plain["a"]["verdict"] == "reproduced"
    standard = [std("a", 0.9, [0.8, 1.0], headline=False), std("a", -0.05, [-0.08, -0.02]),
                std("d", 0.3, [0.2, 0.4])]
    by = {r["id"]: r for r in C.claims_table(tmp_path, rows, standard)}
    a = by["a"]
    assert (a["source"], a["value"], a["ci95"], a["n"], a["verdict"]) == ("standard", -0.05, [-0.08, -0.02], 500,
                                                                          "not reproduced")
    assert "eps 0.03" in a["figure"] and "+20.0 points" in a["reason"] and "reproduced" in a["reason"]
    assert by["d"]["source"] == "standard" and by["d"]["verdict"] == "not reproduced"   # the epoch time
    assert by["b"]["source"] is None and by["b"]["verdict"] == "not run"
    # an unmeasured cost leaves a robust gain inconclusive, but not a standard-protocol loss
    nocost = make_report(tmp_path / "nocost", {("04", "04_odgq_training_curves", ()): odgq_results(0.5, 0.1, None)})
    d = lambda value, ci: next(r for r in C.claims_table(tmp_path / "nocost", nocost, [std("d", value, ci)])  # noqa: E731
                               if r["id"] == "d")
    assert d(0.3, [0.2, 0.4])["verdict"] == "inconclusive" and "not judged" in d(0.3, [0.2, 0.4])["reason"]
    assert d(-0.3, [-0.4, -0.2])["verdict"] == "not reproduced"
    unmeasured = [{**std("a", 0.1, [0.0, 0.2]), "value": None}]
    assert C.claims_table(tmp_path, rows, unmeasured)[0]["source"] == "notebook"
