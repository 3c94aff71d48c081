"""The report's index page (OUT/index.html): the papers' claims first (a table, then one
large figure per claim), then the environment and one row per run."""
from __future__ import annotations

import html
from urllib.parse import quote

from ..machine import devices_line
from .claims import who

_INDEX_NUMBERS = 12     # key numbers shown per row of index.html (summary.json has all)


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
.v-reproduced { color: #176f2c; font-weight: 600; }
.v-not-reproduced { color: #b00020; font-weight: 600; }
.v-inconclusive { color: #8a5a00; font-weight: 600; }
.v-not-run { color: #666; font-weight: 600; }
.v-context { color: #444; font-style: italic; }
figure.claim { margin: 1.5em 0; }
figure.claim img { max-width: 100%; border: 1px solid #ddd; }
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
    if summary.get("in_progress"):
        head.insert(0, ("status", "IN PROGRESS: a batch is running (or was killed); the rows below are the "
                                  "runs complete so far"))
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
{_claims_section(summary.get("claims") or [])}
{_standard_section(summary.get("standard_claims") or [])}
<h2>The runs</h2>
<table class="env">
{env_rows}
</table>
<table>
<thead><tr><th>run</th><th>figure</th><th>parameters</th><th>key numbers</th><th>files</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{_zoo_table(summary.get("zoo") or [])}
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
    if r.get("reused"):
        run += '<br><span class="small">reused: same parameters and rqlab source</span>'
    if r["error"]:
        run += f'<pre class="error">{e(r["error"])}</pre>'
        if r["traceback"]:
            run += f"<details><summary>traceback</summary><pre>{e(r['traceback'])}</pre></details>"
    if r.get("rerun_error"):
        run += f'<pre class="error">rerun failed: {e(r["rerun_error"])}</pre>'
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


def _zoo_table(rows: list[dict]) -> str:
    """The zoo's headline figures: the standard protocol's robust accuracy per model."""
    if not rows:
        return ""
    e = html.escape
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    body = []
    for r in rows:
        ci = f' <span class="small">[{pct(r["standard_ci95"][0])}, {pct(r["standard_ci95"][1])}], ' \
             f'n = {r["standard_n"]}, strongest {e(str(r["strongest"]))}</span>' if r["standard"] is not None else \
             ' <span class="small">not measured yet: rqlab zoo measure</span>'
        flags = "".join(f'<br><span class="failed small">{e(f)}</span>' for f in r["unreliable"])
        body.append(f'<tr><td class="kv">{e(r["name"])}</td><td>{e(r["summary"])}</td><td>{e(r["precision"])}</td>'
                    f'<td>{pct(r["clean_accuracy"])}</td><td><b>{pct(r["standard"])}</b>{ci}{flags}</td>'
                    f'<td>{pct(r["pgd20"])}</td></tr>')
    devices = devices_line(r["device"] for r in rows)
    return f"""<h2>The zoo: headline robust accuracy</h2>
<p class="small">Robust accuracy under the standard protocol (AutoAttack standard + PGD-20; for random
precisions the support ensemble + EOT-PGD + expectation; Square and BPDA for binary ones; worst case per
example; docs/protocol.md), from the zoo's cards, with PGD-20 beside it. Measured on
{e(devices or "-")}.</p>
<table>
<thead><tr><th>model</th><th>summary</th><th>precision</th><th>clean</th><th>standard protocol [95% CI]</th>
<th>PGD-20</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
"""


def _claims_section(rows: list[dict]) -> str:
    """The claims table (paper's figure, rqlab's figure with its interval, verdict, link to
    the run), then each claim's run's main figure, large."""
    if not rows:
        return ""
    e = html.escape
    body, figures = [], []
    for r in rows:
        cls = "v-" + r["verdict"].replace(" ", "-")
        ours = "-" if r["value"] is None else (
            f'{e(r["figure"])}<br><span class="small">95% interval [{100 * r["ci95"][0]:+.1f}, '
            f'{100 * r["ci95"][1]:+.1f}] points, n = {r["n"]}</span>')
        run = "-" if not r["run_id"] else f'<span class="kv">{e(r["run_id"])}</span>'
        if r["link"]:  # the run's HTML page (none when its export failed)
            run = f'<a class="kv" href="{quote(r["link"], safe="/=+")}">{e(r["run_id"])}</a>'
        body.append(f'<tr><td><b>({e(r["id"])})</b> {e(r["paper"])}<br><span class="small">{e(r["claim"])}</span>'
                    f'</td><td>{e(r["paper_figure"])}</td><td>{ours}</td><td><span class="{cls}">{e(r["verdict"])}'
                    f'</span><br><span class="small">{e(r["reason"] or "")}</span></td><td>{run}</td></tr>')
        if r["figure_file"]:  # the run's main figure, large, linked to the run's page
            src = quote(r["figure_file"], safe="/=+")
            img = f'<img src="{src}" alt="main figure of {e(r["run_id"])}">'
            figures.append(f'<figure class="claim" id="claim-{e(r["id"])}">'
                           + (f'<a href="{quote(r["link"], safe="/=+")}">{img}</a>' if r["link"] else img)
                           + f'<figcaption><b>({e(r["id"])})</b> {e(r["claim"])} <span class="{cls}">'
                             f'{e(r["verdict"])}</span>: {e(r["figure"] or "")}</figcaption></figure>')
    return f"""<h2>The papers' claims</h2>
<p class="small">Verdict: the 95% interval of the difference the claim says is positive lies above 0: reproduced;
below 0: not reproduced; across 0: inconclusive (rqlab/report/claims.py). rqlab's figures are Fashion-MNIST,
the papers' mostly CIFAR-10: compare directions and gaps, not levels.</p>
<table class="claims">
<thead><tr><th>claim</th><th>paper's figure</th><th>rqlab's figure</th><th>verdict</th><th>run</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
{chr(10).join(figures)}
"""


def _standard_section(rows: list[dict]) -> str:
    """Claims (a), (b) and (d) under the standard protocol: the zoo cards' records paired on the
    same images (standard.py), one row per comparison, with its verdict (or context)."""
    if not rows:
        return ""
    e = html.escape
    body = []
    for r in rows:
        verdict = r["verdict"] or "context"
        cls = "v-" + verdict.replace(" ", "-")
        diff = "-" if r["value"] is None else (
            f'<b>{100 * r["value"]:+.1f}</b> points<br><span class="small">95% interval [{100 * r["ci95"][0]:+.1f}, '
            f'{100 * r["ci95"][1]:+.1f}], n = {r["n"]}</span>')
        models = "-" if r["better"] is None else \
            f'<span class="kv">{e(who(r["better"], r.get("better_at")))}</span> minus ' \
            f'<span class="kv">{e(who(r["worse"], r.get("worse_at")))}</span>'
        flags = "".join(f'<br><span class="failed small">{e(f)}</span>' for f in r["flags"])
        body.append(f'<tr><td><b>({e(r["id"])})</b> {e(r["text"])}</td><td>{models}</td><td>{diff}{flags}</td>'
                    f'<td><span class="{cls}">{e(verdict)}</span><br><span class="small">{e(r["reason"] or "")}'
                    f'</span></td></tr>')
    return f"""<h2>Claims (a), (b) and (d) under the standard protocol</h2>
<p class="small">The zoo cards' standard-protocol records (AutoAttack and the adaptive attacks, worst case per
example; `rqlab zoo measure`) paired example by example on the same test images; the difference the claim
says is positive, its paired 95% interval and the verdict by the same rule (rqlab/report/standard.py).
Full-budget models where both are measured, else the -small pair.</p>
<table class="claims">
<thead><tr><th>comparison</th><th>models</th><th>difference</th><th>verdict</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
"""
