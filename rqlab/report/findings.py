"""docs/findings.md, generated from a finished report's summary.json, so the document and
the report cannot disagree: the claims table with verdicts, one section per claim (its
figures, interval and reason), the zoo's headline table, the machine and the report's
profile and commit. Every number comes from summary.json; the text around them is fixed.

    python -m rqlab.report.findings reports/findings/summary.json docs/findings.md \
        --curves docs/zoo_curves.png --notes docs/findings-notes.md

(tests/test_findings_page.py holds docs/findings.md to reports/findings/summary.json.)
`--standard-b` (optional): claim (b) again from `scripts/findings.py --section B` (the
standard protocol, each random-precision model against the same weights at a fixed 8 bits),
a section of its own, for a report whose profile cuts AutoAttack (the quick one); the
findings profile's summary holds claim (b) under the standard protocol already
("standard_claims", from the zoo's cards).

    >>> text = findings_markdown(json.load(open("reports/out/summary.json")), links_from="reports/out")
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from ..machine import devices_line
from ..validate import RqlabError
from ..zoo import FULL_PLATEAU_TOL
from .batch import SUMMARY_FORMAT
from .claims import verdict, who

# Explanation that holds whatever the numbers are (methods notes of the hand-written page).
NOTES = """## How to read these numbers

- rqlab's zoo is Fashion-MNIST with a small CNN, trained on CPUs; the papers' figures are
  mostly CIFAR-10 with PreActResNet-18. Compare the direction and the size of a gap, not
  accuracy levels.
- Robust accuracy is measured white-box on the first N images of the seeded test subset
  (N = n in each row), linf; the threat model of each run is in its results.json.
- An interval is the 95% interval of the difference the claim says is positive, from the
  binomial noise of both accuracies (combined as for independent samples, which is
  conservative for the same test images); the bit-selection interval is paired (each test
  example's difference, averaged over the budgets; runs before per-example outcomes were
  kept average the per-budget half-widths), and the transfer one treats each mean as one
  cell of N images.
- Verdict: interval above 0, reproduced; below 0, not reproduced; across 0, inconclusive;
  a claim whose run is missing from the report (e.g. `--only`) or failed is "not run".
  ODG-Q must also train at a cost close to natural training's: notebook 04 times each
  method's epoch on the same images under control, and every repetition must be within
  the bound in its row; if none is, the claim is not reproduced; if the repetitions fall on
  both sides, it is inconclusive.
- Where rqlab had to construct a method (the Lipschitz sensitivity of bit selection, the
  ODG-Q algorithm), the verdict is on rqlab's construction: docs/methods.md says which.
- A robust accuracy measured with gradient attacks is an upper bound; the zoo's headline
  (the standard protocol: AutoAttack and adaptive attacks, worst case per example) is the
  figure to quote for a model, and binary networks can mask gradients (docs/protocol.md).
"""


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v) -> str:
    if isinstance(v, float):
        return format(v, ".4g")
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _details(details: dict, depth: int = 0) -> list[str]:
    """A claim's details as a bullet list, a nested dict as a nested list (two levels; deeper
    ones inline)."""
    lines = []
    for k, v in details.items():
        if isinstance(v, dict) and v and depth < 1:
            lines += [f"{'  ' * depth}- {k}:", *_details(v, depth + 1)]
        else:
            lines.append(f"{'  ' * depth}- {k}: {_fmt(v)}")
    return lines


def _interval(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}] points"


def _link(r: dict, links_from) -> str:
    if not r.get("run_id"):
        return "-"
    if not r.get("link") or links_from is None:
        return f"`{r['run_id']}`"
    return f"[`{r['run_id']}`]({_rel(links_from, r['link'])})"


def _rel(base: str, target: str) -> str:
    return Path(base, target).as_posix()


def _run_time(summary: dict) -> str:
    """The runs' own compute time (a reused run counts the time it took when it ran) beside
    the last batch's wall time (nearly 0 when every run was reused)."""
    runs = summary.get("runs") or []
    reused = sum(1 for r in runs if r.get("reused"))
    total = sum(r.get("seconds") or 0.0 for r in runs)
    text = f"the runs took {total / 60:.0f} min" if runs else "no runs"
    if reused:
        text += f" ({reused} reused from earlier batches of the same source)"
    return text + f"; this batch {summary['wall_time_s']:.0f} s"


def findings_markdown(summary: dict, links_from=None) -> str:
    """The findings page from a summary.json (dict). links_from: the report folder as seen
    from the page's folder (links to the runs go through it); None: run ids without links."""
    if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT:
        raise RqlabError(f"not a report summary (format {SUMMARY_FORMAT!r} expected): pass OUT/summary.json")
    if "claims" not in summary:
        raise RqlabError("the summary has no claims: it was written by an older rqlab; rerun `rqlab report`")
    env, rows = summary["environment"], summary["claims"]
    lines = ["# What the report shows: the papers' claims against rqlab's measurements", "",
             "Generated by `python -m rqlab.report.findings OUT/summary.json docs/findings.md [--curves "
             "docs/zoo_curves.png] [--notes docs/findings-notes.md]` from the report's summary.json; do not "
             "edit by hand: rerun `rqlab report`, then this command.", "",
             f"- report: profile `{summary['profile']}`, config `{summary['config']}`, last batch started "
             f"{summary['started']}, {summary['n_runs']} runs ({summary['n_failed']} failed), "
             + _run_time(summary)
             + (" (IN PROGRESS: the batch had not finished)" if summary.get("in_progress") else ""),
             f"- rqlab {env.get('rqlab')}, commit `{env.get('git_commit') or 'unknown'}`",
             f"- machine: {env.get('cpu') or 'CPU not recorded'}; device {env.get('device')}; torch "
             f"{env.get('torch')}; Python {env.get('python')}", "",
             "## The claims", "",
             "| | paper | claim | paper's figure | rqlab's figure | 95% interval | verdict | run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, ci = ("-", "-") if r["value"] is None else (_cell(r["figure"]), _interval(r) + f", n = {r['n']}")
        lines.append(f"| ({r['id']}) | {_cell(r['paper'])} | {_cell(r['claim'])} | {_cell(r['paper_figure'])} | "
                     f"{ours} | {ci} | **{r['verdict']}** | {_link(r, links_from)} |")
    for r in rows:
        lines += ["", f"## ({r['id']}) {r['paper']}", "", r["claim"], "",
                  f"**{r['verdict'].capitalize()}.** {r['reason'] or ''}", "",
                  f"- paper: {r['paper_figure']}"]
        if r["value"] is not None:
            lines.append(f"- rqlab: {r['figure']}; difference {100 * r['value']:+.1f} points, 95% interval "
                         f"{_interval(r)}, n = {r['n']}")
        lines += _details(r.get("details") or {})
        lines.append(f"- run: {_link(r, links_from)} (notebook {r['notebook']})")
        if r.get("figure_file") and links_from is not None:
            lines += ["", f"![main figure of {r['run_id']}]({_rel(links_from, r['figure_file'])})"]
    if summary.get("standard_claims"):
        lines += ["", standard_claims_markdown(summary["standard_claims"])]
    zoo = summary.get("zoo") or []
    if zoo:
        lines += ["", "## The zoo: headline robust accuracy", "", zoo_markdown(zoo)]
    lines += ["", NOTES]
    return "\n".join(lines)


def zoo_markdown(zoo: list[dict]) -> str:
    """The zoo's headline table from `rqlab.zoo.headlines()` rows (summary.json's "zoo")."""
    lines = ["The standard protocol's robust accuracy per model, from the zoo's cards (`rqlab zoo measure`), "
             "PGD-20 beside it.", "",
             "| model | precision | clean | standard protocol [95% CI] | n | strongest | PGD-20 | flags |",
             "|---|---|---|---|---|---|---|---|"]
    for z in zoo:
        ci = (f" [{_pct(z['standard_ci95'][0])}, {_pct(z['standard_ci95'][1])}]"
              if z.get("standard_ci95") else "")
        lines.append(f"| {z['name']} | {z['precision']} | {_pct(z['clean_accuracy'])} | "
                     f"{_pct(z['standard'])}{ci} | {z.get('standard_n') or '-'} | {z.get('strongest') or '-'} | "
                     f"{_pct(z['pgd20'])} | {_cell('; '.join(z.get('unreliable') or [])) or '-'} |")
    devices = devices_line(z.get("device") for z in zoo)
    if devices:
        lines += ["", f"Measured on {devices}."]
    return "\n".join(lines)


def standard_claims_markdown(rows: list[dict]) -> str:
    """Claims (a), (b) and (d) under the standard protocol (summary.json's "standard_claims",
    rqlab.report.standard): the zoo cards' records paired on the same images."""
    lines = ["## (a), (b) and (d) at full strength: the standard protocol, paired on the same images", "",
             "Each zoo card's standard-protocol record (AutoAttack and the adaptive attacks, worst case per example; "
             "`rqlab zoo measure`), paired example by example with the other model's on the same first n test "
             "images; the difference the claim says is positive, its paired 95% interval, and the verdict by the "
             "claims' rule (context rows are shown, not judged). Full-budget models where both are measured, "
             "else the -small pair (rqlab/report/standard.py).", "",
             "| | comparison | models | difference [95% CI] | n | verdict | reason |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        models = "-" if r["better"] is None else (f"{who(r['better'], r.get('better_at'))} - "
                                                  f"{who(r['worse'], r.get('worse_at'))}")
        diff = "-" if r["value"] is None else (f"{100 * r['value']:+.1f} [{100 * r['ci95'][0]:+.1f}, "
                                              f"{100 * r['ci95'][1]:+.1f}]")
        v = f"**{r['verdict']}**" if r["verdict"] else "context"
        flags = f" Flags: {'; '.join(r['flags'])}" if r["flags"] else ""
        lines.append(f"| ({r['id']}) | {_cell(r['text'])} | {models} | {diff} | {r['n'] or '-'} | {v} | "
                     f"{_cell((r['reason'] or '') + flags)} |")
    return "\n".join(lines)


def standard_b_markdown(b: dict) -> str:
    """Claim (b) under the standard protocol (the `b_standard.json` of `scripts/findings.py
    --section B`): per model, the same weights at a fixed 8 bits and under random precision
    inference on the same test images, each example's worst case over the protocol's
    attacks; the verdict by the claims' rule on the paired difference RPI - fixed."""
    try:
        rows, n, passes = b["rows"], b["n"], b["passes"]
        lines = ["## (b) at full strength: the standard protocol, same model at a fixed precision", "",
                 f"The standard protocol (reference AutoAttack, 100 iterations, Square 5,000 queries; for random "
                 f"precision the ensemble attack, EOT-PGD and the expectation attack, scored under the random "
                 f"policy over {passes} passes) on the same {n} test images for both precisions of each model. "
                 "Difference: RPI minus fixed, per example (paired), 95% interval; verdict by the claims' rule.", "",
                 "| model | precision | clean | standard protocol [95% CI] | strongest | flags | "
                 "RPI - fixed [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|"]
        devices, measured_s = set(), 0.0
        for r in rows:
            for key, prec in (("fixed8", "8 bits (fixed)"), ("rpi", "RPI 4..8")):
                v = r[key]
                devices.add(v.get("device"))
                measured_s += v.get("wall_time_s") or 0.0
                diff = (f"{100 * r['difference']:+.1f} [{100 * r['difference_ci95'][0]:+.1f}, "
                        f"{100 * r['difference_ci95'][1]:+.1f}]") if key == "rpi" else ""
                lines.append(f"| {r['model']} | {prec} | {_pct(v['clean'])} | {_pct(v['robust'])} "
                             f"[{_pct(v['ci95'][0])}, {_pct(v['ci95'][1])}] | {v['strongest']} | "
                             f"{_cell('; '.join(v['unreliable'])) or '-'} | {diff} | "
                             f"{'**' + verdict(r['difference_ci95']) + '**' if key == 'rpi' else ''} |")
    except (KeyError, TypeError, IndexError) as e:
        raise RqlabError(f"standard_b: not a b_standard.json of scripts/findings.py --section B (missing {e})") from e
    lines += ["", f"Measured on {devices_line(devices) or 'an unrecorded machine'}"
              + (f", torch {b['torch']}" if b.get("torch") else "")
              + (f", {measured_s / 60:.0f} min of measurement in all (each record's wall time, summed over "
                 "the sessions that resumed it)" if measured_s else
                 f", {b['seconds'] / 60:.0f} min" if b.get("seconds") else "")
              + ". Re-measure: `.venv/bin/python scripts/findings.py --section B --n 500`."]
    return "\n".join(lines)


def _read_json(path: Path, field: str, hint: str) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise RqlabError(f"{field}={path}: cannot read it ({e.strerror}): {hint}") from e
    except ValueError as e:
        raise RqlabError(f"{field}={path} is not JSON: {e}") from e


def curves_markdown(figure: Path, page_dir: Path, curves: dict) -> str:
    """The zoo's training curves (`rqlab.report.zoo_curves`, drawn into `figure`): the
    figure, and each built model's gain over its last epochs (the plateau check)."""
    rel = os.path.relpath(figure.resolve(), page_dir.resolve())
    gains = ", ".join(f"{n} {100 * c['plateau']['gain']:+.1f}" for n, c in curves.items()
                      if c["plateau"]["gain"] is not None)
    return "\n".join(["## The zoo's training curves", "",
                      "Held-out clean and PGD-20 accuracy per epoch of the full-budget models, from their cards; "
                      "a model is committed once its judged curve (clean for natural and DQ training, PGD-20 for "
                      f"adversarial) gains at most {100 * FULL_PLATEAU_TOL:.0f} points over its last 3 epochs. "
                      f"Gains in points: {gains or 'none built'}. "
                      f"Redraw: `rqlab zoo curves --built-only --out {figure.as_posix()}`.", "",
                      f"![held-out training curves of the full-budget zoo]({Path(rel).as_posix()})"])


def notes_link(name: str, rel: str) -> str:
    """The line under the page's header that links the hand-written notes page (`--notes`)."""
    return (f"\nDiscussion beyond these numbers (what the verdicts rest on, analyses measured by hand): "
            f"[{name}]({rel}).\n")


def write_findings(summary_path, md_path, standard_b=None, curves=None, notes=None) -> Path:
    """Read OUT/summary.json (and `standard_b`, a b_standard.json, if given), write the
    findings page (atomically); links to the runs are relative to the page's folder.
    curves: a figure path (.png/.svg) to draw the full-budget zoo's training curves into
    (from the cards), shown after the zoo's table. notes: a hand-written page of discussion
    (e.g. docs/findings-notes.md), linked under the header; it must exist."""
    from . import zoo_curves

    summary_path, md_path = Path(summary_path), Path(md_path)
    summary = _read_json(summary_path, "summary", "run `rqlab report` first")
    extra = standard_b_markdown(_read_json(Path(standard_b), "standard_b",
                                           "run `scripts/findings.py --section B` first")) if standard_b else None
    links = os.path.relpath(summary_path.resolve().parent, md_path.resolve().parent)
    text = findings_markdown(summary, links_from=links)
    if notes:
        if not Path(notes).is_file():
            raise RqlabError(f"notes={notes}: no such page; give the hand-written notes page (e.g. "
                             "docs/findings-notes.md) or leave --notes out")
        rel = Path(os.path.relpath(Path(notes).resolve(), md_path.resolve().parent)).as_posix()
        head, sep, rest = text.partition("\n## The claims\n")
        text = head + notes_link(Path(notes).name, rel) + sep + rest
    if curves:
        drawn = zoo_curves.zoo_curves()
        figure = zoo_curves.write_figure(drawn, curves)
        extra = "\n\n".join(s for s in (extra, curves_markdown(figure, md_path.parent, drawn)) if s)
    if extra:
        head, sep, notes = text.rpartition("\n" + NOTES)
        text = head + "\n" + extra + "\n" + sep + notes if sep else text + "\n\n" + extra
    return atomic_write_bytes(md_path, text.encode())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rqlab.report.findings",
                                description="Write docs/findings.md from a report's summary.json.")
    p.add_argument("summary", help="OUT/summary.json of a finished `rqlab report`")
    p.add_argument("markdown", help="the page to write, e.g. docs/findings.md")
    p.add_argument("--standard-b", metavar="PATH", default=None,
                   help="docs/findings/b_standard.json (scripts/findings.py --section B): claim (b) under the "
                        "standard protocol, as a section of its own")
    p.add_argument("--curves", metavar="PATH", default=None,
                   help="draw the full-budget zoo's training curves into PATH (e.g. docs/zoo_curves.png) and "
                        "show them on the page")
    p.add_argument("--notes", metavar="PATH", default=None,
                   help="a hand-written notes page (e.g. docs/findings-notes.md) to link under the header")
    args = p.parse_args(argv)
    try:
        path = write_findings(args.summary, args.markdown, standard_b=args.standard_b, curves=args.curves,
                              notes=args.notes)
    except RqlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"findings: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["NOTES", "findings_markdown", "notes_link", "standard_claims_markdown", "standard_b_markdown", "zoo_markdown",
           "curves_markdown", "write_findings", "main"]
