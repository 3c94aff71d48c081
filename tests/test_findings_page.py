"""docs/findings.md is generated from the committed findings report (issue 14: "the document
and the report cannot disagree"): the page must be what `python -m rqlab.report.findings`
writes from reports/findings/summary.json, apart from the sections it adds around it (the
notes link and the zoo's curves, drawn from the cards)."""
import json
from pathlib import Path

import pytest

from rqlab.report.findings import NOTES, findings_markdown, notes_link

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "reports" / "findings" / "summary.json"
PAGE = ROOT / "docs" / "findings.md"
REGENERATE = ("regenerate it: .venv/bin/python -m rqlab.report.findings reports/findings/summary.json "
              "docs/findings.md --curves docs/zoo_curves.png --notes docs/findings-notes.md")


@pytest.fixture(scope="module")
def summary():
    if not SUMMARY.is_file():
        pytest.skip("no committed findings report (reports/findings/summary.json)")
    return json.loads(SUMMARY.read_text())


def test_findings_page_is_generated_from_the_committed_report(summary):
    expected = findings_markdown(summary, links_from="../reports/findings")
    head, sep, tail = expected.rpartition("\n" + NOTES)
    assert sep, "the generated page ends with its notes on how to read the numbers"
    page = PAGE.read_text()
    link = notes_link("findings-notes.md", "findings-notes.md")
    assert link in page, "the page links the hand-written notes (--notes docs/findings-notes.md)"
    page = page.replace(link, "", 1)
    assert page.startswith(head), f"docs/findings.md differs from reports/findings/summary.json: {REGENERATE}"
    assert page.endswith(sep + tail), f"docs/findings.md's closing notes differ: {REGENERATE}"


def test_the_committed_report_judges_every_claim(summary):
    """The findings report is complete: every claim has a verdict from a finished run, and
    every run in it finished ok."""
    assert summary["n_failed"] == 0 and not summary.get("in_progress")
    verdicts = {c["id"]: c["verdict"] for c in summary["claims"]}
    assert set(verdicts) == {"a", "b", "t", "c", "d"}
    assert all(v in ("reproduced", "not reproduced", "inconclusive") for v in verdicts.values()), verdicts
    for c in summary["claims"]:
        lo, hi = c["ci95"]
        assert lo <= c["value"] <= hi, c["id"]
        assert (ROOT / "reports" / "findings" / c["link"]).is_file(), c["link"]


def test_the_page_header_counts_the_runs_own_time_not_the_reusing_batch():
    from rqlab.report.findings import _run_time

    summary = {"wall_time_s": 2.0, "runs": [{"seconds": 600.0, "reused": True}, {"seconds": 300.0, "reused": False}]}
    assert _run_time(summary) == "the runs took 15 min (1 reused from earlier batches of the same source); this batch 2 s"
    assert _run_time({"wall_time_s": 0.0, "runs": []}) == "no runs; this batch 0 s"


def test_a_claims_nested_details_read_as_a_nested_list():
    from rqlab.report.findings import _details

    assert _details({"bits": 4, "RPI": {"random": 0.7504, "ci95": [0.1, 0.2], "deep": {"x": 1}}}) == [
        "- bits: 4", "- RPI:", "  - random: 0.7504", "  - ci95: [0.1, 0.2]", "  - deep: {x: 1}"]
