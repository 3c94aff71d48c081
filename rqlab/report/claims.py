"""The report's opening table: each paper's claim, the figure rqlab measured for it with its
95% interval, and a verdict (`claims_table`, called by the batch; rows in summary.json "claims").

    >>> rows = claims_table(out, summary["runs"])     # one row per claim, in CLAIMS order
    >>> rows[0]["verdict"], rows[0]["value"], rows[0]["ci95"], rows[0]["link"]

Verdict rule (`verdict`): the claim is turned into a difference that it says is positive
(e.g. DQ's robust accuracy minus vanilla quantization's). With the 95% interval [lo, hi] of
that difference: lo > 0 is "reproduced", hi < 0 "not reproduced", an interval containing 0
"inconclusive". A claim whose run is not in the report (e.g. `--only`) or failed is
"not run". ODG-Q's claim has a second condition (an epoch time close to natural
training's, at most `readings.CHEAP_RATIO` times it, as notebook 04 measures it under
control, `analysis.cost`): failing it is "not reproduced"; not measuring it, or
repetitions on both sides of the bound, leave a robust gain "inconclusive".

Each claim reads the full results.json of one run (OUT/<run-id>/results.json, written by
its study in rqlab.studies), chosen by notebook and, where a notebook runs several times,
by a parameter (`Claim.prefer`: a regular expression per parameter). The intervals are
computed by the studies (rqlab.analysis.readings), not here; this module only picks and
words them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import zoo
from ..analysis import paper
from ..analysis.readings import CHEAP_RATIO, transfer_cells

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")


def verdict(ci95) -> str:
    """The verdict of a difference the claim says is positive, from its 95% interval."""
    lo, hi = ci95
    return "reproduced" if lo > 0 else "not reproduced" if hi < 0 else "inconclusive"


def pts(v: float) -> str:
    """0.031 -> '+3.1 points'."""
    return f"{100 * v:+.1f} points"


def who(name: str, precision: str | None = None) -> str:
    """A side of a standard-protocol comparison (standard.py): the zoo model, and the
    precision of its card's record when it is not the card's first (claim (b)'s controls)."""
    return name if precision is None else f"{name} at precision {precision}"


def interval(ci95) -> str:
    return f"[{100 * ci95[0]:+.1f}, {100 * ci95[1]:+.1f}]"


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


# ---- each claim: what it reads from its run's results.json -------------------------------

def _dq(res: dict) -> dict:
    c = res["dq_vs_vanilla"]
    if c is None:
        raise KeyError("dq_vs_vanilla (the run's bits leave out the compared activation precision)")
    amp = c["amplification_logits"]
    lower = amp["DQ"] < amp["vanilla"]
    sweep = res.get("beta_sweep") or []
    how = "trained models" if res.get("beta_source") == "models" else "trained live on a subset"
    sweep_text = (f" Beta sweep ({how}, {len(sweep)} strengths), robust accuracy at w32a4: "
                  + ", ".join(f"beta {r['beta']:g} {pct(r['robust_accuracy'])}" for r in sweep) + ".") if sweep else ""
    eps = (res.get("threat") or {}).get("eps")
    at = f", eps {eps:g}" if eps is not None else ""
    return {"value": c["gain"], "ci95": c["ci95"], "n": c["n"],
            "figure": f"DQ {pct(c['dq'])} vs vanilla {pct(c['vanilla'])} robust accuracy at a{c['bits']}{at}: "
                      f"{pts(c['gain'])}",
            "reason": f"At {c['bits']}-bit activations{at} DQ's robust accuracy minus vanilla quantization's is "
                      f"{pts(c['gain'])}, 95% interval {interval(c['ci95'])} (n = {c['n']}"
                      f"{', paired on the same examples' if c.get('paired') else ''}); the relative error at "
                      f"the logits is {amp['DQ']:.3f} for DQ and {amp['vanilla']:.3f} for vanilla "
                      f"({'lower' if lower else 'not lower'} for DQ)." + sweep_text,
            "details": {"bits": c["bits"], "dq": c["dq"], "vanilla": c["vanilla"], "dq_clean": c["dq_clean"],
                        "vanilla_clean": c["vanilla_clean"], "amplification_logits": amp,
                        "beta_sweep": {f"{r['beta']:g}": r["robust_accuracy"] for r in sweep}}}


def _double_win(res: dict) -> dict:
    ctl = res["same_model"]
    rpt, rpi = ctl["RPI+RPT"], ctl["RPI"]
    return {"value": rpt["gain"], "ci95": rpt["ci95"], "n": rpt["n"],
            "figure": f"RPI+RPT {pct(rpt['random'])} vs the same model at {rpt['policy']} bits {pct(rpt['fixed'])}: "
                      f"{pts(rpt['gain'])}",
            "reason": f"Under its strongest attack ({rpt['random_strongest']}) the RPT model with random precision "
                      f"keeps {pct(rpt['random'])}, the same weights at a fixed {rpt['policy']} bits "
                      f"{pct(rpt['fixed'])} ({rpt['fixed_strongest']}): {pts(rpt['gain'])}, 95% interval "
                      f"{interval(rpt['ci95'])} (n = {rpt['n']}); RPI alone on a fixed-precision model: "
                      f"{pts(rpi['gain'])} {interval(rpi['ci95'])}.",
            "details": {"RPI+RPT": {k: rpt[k] for k in ("random", "fixed", "random_strongest", "fixed_strongest",
                                                        "gain", "ci95", "n", "paper_gain", "policy")},
                        "RPI": {k: rpi[k] for k in ("random", "fixed", "random_strongest", "fixed_strongest",
                                                    "gain", "ci95", "n", "paper_gain", "policy")},
                        "aa_reduced": res.get("aa_reduced")}}


def _transfer(res: dict) -> dict:
    label = next(iter(res["gap"]))
    gap, ci = res["gap"][label], res["gap_ci95"][label]
    d, o = res["diagonal_mean"][label], res["off_diagonal_mean"][label]
    return {"value": gap, "ci95": ci, "n": res["n_examples"],
            "figure": f"off-diagonal {pct(o)} vs diagonal {pct(d)}: {pts(gap)}",
            "reason": f"On {label}, attacks transferred to another precision leave {pct(o)} on average, attacks at "
                      f"the evaluated precision {pct(d)}: a gap of {pts(gap)}, 95% interval {interval(ci)} "
                      f"(n = {res['n_examples']} per cell, bits {res['bits']}).",
            "details": {"model": label, "diagonal_mean": d, "off_diagonal_mean": o, "bits": res["bits"]}}


def _bit_selection(res: dict) -> dict:
    g, ci = res["lipschitz_gain_mean"], res["lipschitz_gain_ci95"]
    if g is None:
        raise KeyError("lipschitz_gain_mean (the run compared no lipschitz and uniform allocations)")
    acc = res["robust_accuracy"]
    gains = [a - u for a, u in zip(acc["lipschitz"], acc["uniform"])]
    # the other sensitivity baselines (issue 14: HAWQ-v2 Hessian trace, margin at x_adv), where the run had them
    others = {m: sum(a - u for a, u in zip(acc[m], acc["uniform"])) / len(acc[m])
              for m in ("hessian", "margin") if m in acc}
    others_text = (" Beside it, mean over budgets minus uniform: " + ", ".join(f"{m} {pts(v)}" for m, v in others.items())
                   + ".") if others else ""
    return {"value": g, "ci95": ci, "n": res["n_examples"],
            "figure": f"Lipschitz minus uniform robust accuracy, mean over {len(res['budgets'])} budgets: {pts(g)}",
            "reason": f"At budgets {res['budgets']} (average weight bits) on {res['model']}, the Lipschitz-guided "
                      f"allocation's robust accuracy minus uniform bits' is "
                      + ", ".join(f"{100 * x:+.1f}" for x in gains)
                      + f" points: mean {pts(g)}, 95% interval {interval(ci)} (n = {res['n_examples']}"
                      + (", paired on the same examples" if res.get("lipschitz_gain_paired") else "") + "); "
                        f"it wins beyond the noise at {res['lipschitz_wins']} budget(s)." + others_text,
            "details": {"model": res["model"], "budgets": res["budgets"], "gains": gains,
                        "wins": res["lipschitz_wins"], "baselines_minus_uniform": others}}


ODGQ_BITS = "4"   # the claims table's precision for ODG-Q (the standard headline pair's); others: context


def _odgq(res: dict) -> dict:
    gains = res["odgq_gain"]
    bits = ODGQ_BITS if ODGQ_BITS in gains else str(res["bits"][0])
    c = gains[bits]
    final = res["final_robust_accuracy"][bits]
    ratio = c.get("time_ratio")
    cost = (f"{ratio:.2f}x natural training's epoch time ({c.get('time_source') or 'controlled'}; 'close' means at "
            f"most {CHEAP_RATIO:g}x)" if ratio is not None else "an epoch time not measured (cost_n=0)")
    out = {"value": c["gain"], "ci95": c["ci95"], "n": c["n"],
           "figure": f"ODG-Q {pct(final['odgq'])} vs natural {pct(final['natural'])} robust accuracy at {bits} bits: "
                     f"{pts(c['gain'])}" + (f", epoch time {ratio:.2f}x natural" if ratio is not None else ""),
           "reason": f"At {bits} bits ODG-Q's final robust accuracy minus natural training's is {pts(c['gain'])}, "
                     f"95% interval {interval(c['ci95'])} (n = {c['n']}, {res['source']} curves), at {cost}"
                     + (f"; PGD-7 AT reaches {pct(final['pgd-at'])}" if "pgd-at" in final else "") + "."
                     + "".join(f" At {b} bit{'s' if b != '1' else ''}: {pts(o['gain'])} over natural training, "
                               f"95% interval {interval(o['ci95'])}"
                               + (f", at {o['time_ratio']:.2f}x its epoch time" if o.get("time_ratio") else "") + "."
                               for b, o in gains.items() if b != bits),
           "details": {"bits": int(bits), "final_robust_accuracy": final, "time_ratio": ratio,
                       "time_source": c.get("time_source"), "source": res["source"]}}
    if c["cheap"] is False:
        out["verdict"] = "not reproduced"
    elif c["cheap"] is None and c["ci95"][0] > 0:
        out["verdict"] = "inconclusive"
        span = c.get("time_range")
        out["reason"] += (" The cost half of the claim is not judged: " + (
            f"the repetitions put ODG-Q at {span[0]:.2f}x to {span[1]:.2f}x, on both sides of the bound."
            if ratio is not None and span else "no controlled measurement."))
    return out


# ---- the claims --------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """One claim of a paper and where rqlab measures it."""
    id: str
    paper: str
    claim: str
    paper_figure: str
    notebook: str
    read: Callable[[dict], dict]                 # results.json -> {"value", "ci95", "n", "figure", "reason", ...}
    prefer: dict = field(default_factory=dict)   # {param: regex} of the run to use among several


def _paper_transfer() -> str:
    diag, off = (sum(c) / len(c) for c in transfer_cells(paper.DWQ_TRANSFER))
    return (f"off-diagonal {100 * off:.1f}% vs diagonal {100 * diag:.1f}%: {100 * (off - diag):+.1f} points "
            "(CIFAR-10, 4-bit PGD-7 model, 3..8 bits)")


def _paper_rpt() -> str:
    r = paper.DWQ_ROBUST
    a, b = r["pgd20"]["PGD-7 AT + RPI + RPT"], r["pgd20"]["PGD-7 AT"]
    return (f"RPI+RPT {a}% vs PGD-7 AT {b}% under PGD-20: {a - b:+.1f} points; AutoAttack "
            f"{r['autoattack']['PGD-7 AT + RPI + RPT']}% vs {r['autoattack']['PGD-7 AT']}% (CIFAR-10, not adaptive)")


CLAIMS = (
    Claim("a", "Defensive Quantization (Lin, Gan, Han, ICLR 2019)",
          "At low activation bits, DQ's robust accuracy is above vanilla quantization's, and it amplifies the "
          "adversarial error less.",
          "qualitative (the paper's opening figure; METHODS section 3 quotes no number)",
          "02_lipschitz_error_amplification", _dq,
          # at the small eps where natural models are off the 0% floor (docs/methods.md, zoo.SMALL_EPS)
          {"eps": re.escape(f"{zoo.SMALL_EPS:g}")}),
    Claim("b", "Double-Win Quant (Fu et al., ICML 2021)",
          "Random precision inference and training (RPI+RPT) raise robust accuracy over a fixed-precision model; "
          "here against the same weights at a fixed precision, under adaptive attacks.",
          _paper_rpt(), "05_double_win_quant", _double_win),
    Claim("t", "Double-Win Quant (Fu et al., ICML 2021)",
          "Adversarial examples transfer poorly across precisions: attacks at the evaluated precision (diagonal) "
          "leave less robust accuracy than attacks made at another one (off-diagonal).",
          _paper_transfer(), "01_precision_transferability", _transfer,
          {"model": r"fmnist-q4-pgd7(-small)?"}),   # the paper's model: PGD-7 at 4 bits (full or -small zoo)
    Claim("c", "Layer-wise adversarial-aware quantization (Song, Ranjan, Li, arXiv 2110.12308)",
          "A Lipschitz-guided per-layer bit allocation beats uniform bits at equal budget.",
          "qualitative (the paper's body was not available; METHODS section 4)",
          "03_bit_selection", _bit_selection),
    Claim("d", "ODG-Q (Tao, Wong, arXiv 2210.08701)",
          "ODG-Q's robust accuracy is far above natural training's, at an epoch time close to natural training's.",
          "qualitative (abstract: cost similar to natural training; PGD-7 AT costs about 8x; METHODS section 5)",
          "04_odgq_training_curves", _odgq),
)


def _pick(claim: Claim, runs: list[dict]) -> dict | None:
    """The run of the claim: among the rows of its notebook, one with the preferred
    parameters (ok runs first), else the first ok one, else the first."""
    rows = [r for r in runs if r.get("notebook") == claim.notebook]
    rows.sort(key=lambda r: r.get("status") != "ok")
    preferred = [r for r in rows if all(re.fullmatch(v, str(r.get("params", {}).get(k))) for k, v in
                                        claim.prefer.items())]
    return (preferred or rows or [None])[0]


def claim_row(claim: Claim, out, run: dict | None) -> dict:
    """One row of the claims table (JSON values) for `claim`, measured by `run` (a row of
    summary.json's "runs", or None when the report has no run of its notebook)."""
    row = {"id": claim.id, "paper": claim.paper, "claim": claim.claim, "paper_figure": claim.paper_figure,
           "notebook": claim.notebook, "run_id": None, "link": None, "figure_file": None, "value": None,
           "ci95": None, "n": None, "figure": None, "verdict": "not run", "reason": None, "details": {}}
    if run is None:
        row["reason"] = f"The report has no run of {claim.notebook} (e.g. --only left it out)."
        return row
    files = run.get("files") or {}
    row.update(run_id=run["run_id"], link=files.get("html"), figure_file=files.get("figure"))
    if run.get("status") != "ok":
        row["reason"] = f"The run {run['run_id']} failed: {run.get('error')}"
        return row
    try:
        res = json.loads((Path(out) / run["run_id"] / "results.json").read_text())
        got = claim.read(res)
    except (OSError, ValueError) as e:
        row.update(verdict="inconclusive", reason=f"{run['run_id']}/results.json is unreadable: {e}")
        return row
    except (KeyError, TypeError, IndexError) as e:
        row.update(verdict="inconclusive", reason=f"{run['run_id']}/results.json lacks {e}: rerun it with this "
                                                  "rqlab (`rqlab report --only ...`)")
        return row
    row.update({k: got[k] for k in ("value", "ci95", "n", "figure", "reason", "details")})
    row["verdict"] = got.get("verdict") or verdict(got["ci95"])
    row["condition_failed"] = got.get("verdict") is not None   # e.g. ODG-Q's epoch time: not a matter of interval
    return row


def with_standard(row: dict, standard_rows) -> dict:
    """The claims-table row `row` with the standard protocol's figure where one is measured:
    the comparison of `standard_rows` (summary.json "standard_claims", standard.py) marked
    as this claim's headline gives the figure, interval, n and verdict (a headline is the
    standard protocol's, not the notebook's single attack); the notebook's figure stays in
    the reason. A verdict the notebook forced by a condition other than the interval (ODG-Q's
    epoch time: "not reproduced" when too slow, "inconclusive" when not judged) caps the
    standard protocol's: the lower of the two in not reproduced < inconclusive < reproduced.
    Rows whose run is missing or failed (no figure: the claim's other conditions unread), or
    without a measured headline comparison, are returned as they are."""
    s = next((r for r in standard_rows or () if r["id"] == row["id"] and r.get("headline") and r["value"] is not None),
             None)
    if s is None or row["value"] is None:
        return {**row, "source": "notebook" if row["value"] is not None else None}
    eps = f" at eps {s['eps']:g}" if s.get("eps") is not None else ""
    notebook = (f" The notebook ({row['run_id']}, its own attack): {row['figure']}, 95% interval "
                f"{interval(row['ci95'])}, {row['verdict']}.")
    forced = row["verdict"] if row.get("condition_failed") else None
    rank = ("not reproduced", "inconclusive", "reproduced").index
    return {**row, "value": s["value"], "ci95": s["ci95"], "n": s["n"], "source": "standard",
            "verdict": min(forced, s["verdict"], key=rank) if forced else s["verdict"],
            "figure": f"{who(s['better'], s.get('better_at'))} minus {who(s['worse'], s.get('worse_at'))}{eps}, "
                      f"standard protocol: {pts(s['value'])}",
            "reason": f"Under the standard protocol (the zoo cards' records, paired): {s['reason']}" + notebook
                      + (f" {row['reason']}" if forced else "")}


def claims_table(out, runs: list[dict], standard_rows=()) -> list[dict]:
    """The claims table of a report in folder `out` whose runs are `runs` (summary.json's
    "runs" rows): one row per claim of CLAIMS, in that order; where `standard_rows`
    (summary.json "standard_claims") hold a measured headline comparison for a claim, its
    figure and verdict are the standard protocol's (`with_standard`)."""
    return [with_standard(claim_row(c, out, _pick(c, runs)), standard_rows) for c in CLAIMS]


__all__ = ["VERDICTS", "CLAIMS", "Claim", "verdict", "who", "claim_row", "with_standard", "claims_table"]
