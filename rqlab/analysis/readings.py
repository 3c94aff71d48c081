"""Plain-text readings of measured numbers: every sentence is generated from the numbers
it states, with the sampling noise of the measurement beside it, so a notebook never
prints a conclusion its data do not carry.

    >>> r = transfer_reading(tm, n=500)     # diagonal vs off-diagonal of a transfer matrix
    >>> print(r["text"]); r["gap"]
    >>> gains_reading(scores, baseline="FP", n=500)["text"]     # which gains survive adaptive attacks

Noise: a 95% half-width of 1.96 sqrt(p (1 - p) / n) per accuracy; for a difference of two
accuracies measured on the same n examples the half-widths are combined as for
independent samples (conservative for positively correlated outcomes).
"""
from __future__ import annotations


from ..stats import diff_half_width, half_width, paired_difference
from ..validate import RqlabError, check_int


def pct(v: float) -> str:
    """0.631 -> '63.1%'."""
    return f"{100 * v:.1f}%"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def difference(p: float, q: float, n: int) -> dict:
    """p - q for two accuracies measured on n examples each, with its 95% interval
    (`stats.diff_half_width`): {"difference", "ci95": [lo, hi], "n"}."""
    n = check_int(n, "n", 1)
    h = diff_half_width(p, q, n)
    return {"difference": p - q, "ci95": [p - q - h, p - q + h], "n": n}


# ---- 01: precision transferability ----------------------------------------------------

def transfer_cells(tm: dict) -> tuple[list[float], list[float]]:
    """(diagonal cells, off-diagonal cells) of the square block of a transfer matrix: rows
    and columns that name the same fixed precision ("eot" row and "rpi" column excluded)."""
    common = [lab for lab in tm["row_labels"] if lab in tm["col_labels"]]
    if len(common) < 2:
        raise RqlabError("a transfer reading needs at least two precisions both attacked and evaluated")
    ri = {lab: i for i, lab in enumerate(tm["row_labels"])}
    ci = {lab: j for j, lab in enumerate(tm["col_labels"])}
    diag = [tm["matrix"][ri[a]][ci[a]] for a in common]
    off = [tm["matrix"][ri[a]][ci[b]] for a in common for b in common if a != b]
    return diag, off


def transfer_reading(tm: dict, n: int | None = None, paper: dict | None = None) -> dict:
    """Diagonal (attacked and evaluated at the same precision) against off-diagonal
    (transferred) robust accuracy of `transfer_matrix`'s result.

    n: examples per cell (for the noise statement). paper: a matrix in the same format to
    quote beside it (e.g. `paper.DWQ_TRANSFER`). Returns {"diagonal_mean",
    "off_diagonal_mean", "gap" (off - diagonal, fraction), "cell_half_width", "gap_ci95"
    (95% interval of the gap, each mean's noise taken as one cell's: conservative),
    "eot_mean", "rpi_mean", "verdict", "text"}.
    """
    diag, off = transfer_cells(tm)
    d, o = _mean(diag), _mean(off)
    gap = o - d
    out = {"diagonal_mean": d, "off_diagonal_mean": o, "gap": gap, "cell_half_width": None, "gap_ci95": None,
           "eot_mean": None, "rpi_mean": None}
    lines = [f"Diagonal (attack and inference at the same precision): mean robust accuracy {pct(d)} over "
             f"{len(diag)} cells. Off-diagonal (attack transferred to another precision): mean {pct(o)} over "
             f"{len(off)} cells, {abs(100 * gap):.1f} points {'higher' if gap >= 0 else 'lower'}."]
    if n is not None:
        n = check_int(n, "n", 1)
        h = half_width(0.5 * (d + o), n)
        out["cell_half_width"] = h
        out["gap_ci95"] = difference(o, d, n)["ci95"]  # conservative: each mean counted as one cell of n
        if gap > 2 * h:
            verdict = "poor transfer"
            lines.append(f"With {n} examples a cell's 95% interval is about ±{100 * h:.1f} points, so the gap is "
                         "well beyond the noise: attacks made at one precision transfer poorly to others, "
                         "as Double-Win Quant reports.")
        elif gap > h:
            verdict = "some transfer loss"
            lines.append(f"With {n} examples a cell's 95% interval is about ±{100 * h:.1f} points: the gap exceeds "
                         "one interval but not two, so the transfer loss is modest at this sample size.")
        elif gap >= -h:
            verdict = "no clear gap"
            lines.append(f"With {n} examples a cell's 95% interval is about ±{100 * h:.1f} points: the gap is "
                         "within the noise, so these numbers do not show poor transfer across precisions.")
        else:
            verdict = "transfer stronger"
            lines.append(f"With {n} examples a cell's 95% interval is about ±{100 * h:.1f} points: transferred "
                         "attacks are clearly *stronger* than same-precision ones, a sign that the white-box "
                         "attack is weakened at some precisions (e.g. masked gradients); check those rows.")
        out["verdict"] = verdict
    else:
        out["verdict"] = None
    labels = tm["row_labels"]
    if "eot" in labels:
        i = labels.index("eot")
        fixed = [j for j, c in enumerate(tm["col_labels"]) if c != "rpi"]
        out["eot_mean"] = _mean(tm["matrix"][i][j] for j in fixed)
        lines.append(f"EOT-PGD over the whole precision set leaves {pct(out['eot_mean'])} on average across the "
                     f"fixed inference precisions (diagonal: {pct(d)}): "
                     + ("one attack averaged over the set is about as strong as the matched white-box attacks."
                        if n is not None and abs(out["eot_mean"] - d) <= out["cell_half_width"] else
                        "weaker than the matched white-box attacks." if out["eot_mean"] > d else
                        "stronger than the matched white-box attacks."))
    if "rpi" in tm["col_labels"]:
        j = tm["col_labels"].index("rpi")
        rows = [i for i, r in enumerate(labels) if r != "eot"]
        out["rpi_mean"] = _mean(tm["matrix"][i][j] for i in rows)
        line = f"Under random precision inference the fixed-precision attacks leave {pct(out['rpi_mean'])} on average"
        if "eot" in labels:
            line += f", the EOT attack {pct(tm['matrix'][labels.index('eot')][j])}"
        lines.append(line + ".")
    if paper is not None:
        pd, po = (_mean(c) for c in transfer_cells(paper))
        lines.append(f"For comparison, the paper's CIFAR-10 table: diagonal {pct(pd)}, off-diagonal {pct(po)} "
                     f"(gap {100 * (po - pd):.1f} points).")
    out["text"] = " ".join(lines)
    return out


# ---- 05: which gains survive adaptive attacks -------------------------------------------

def gains_reading(scores: dict, baseline: str, n: int, paper_protocol: str = "paper") -> dict:
    """Gains of each configuration over `baseline` under the paper's protocol and under the
    strongest attack measured (the lowest mean accuracy over every protocol, the paper's
    included).

    scores: {config: {protocol: {"robust_accuracy": acc, "robust_worst_accuracy": acc}}} (fractions; worst: correct
    in every stochastic pass). n: examples per score. Returns {"configs": {config:
    {"paper_gain", "adaptive_gain", "worst_gain", "strongest", "half_width",
    "paper_gain_clear", "verdict"}}, "text"}; verdict (of the adaptive gain) "survives" |
    "within noise" | "reversed"; paper_gain_clear: the paper-protocol gain exceeds its noise.
    """
    if baseline not in scores:
        raise RqlabError(f"baseline={baseline!r} has no scores: configs are {list(scores)}")
    n = check_int(n, "n", 1)

    def strongest(cfg):
        proto = min(scores[cfg], key=lambda p: scores[cfg][p]["robust_accuracy"])
        return proto, scores[cfg][proto]["robust_accuracy"], min(s["robust_worst_accuracy"] for s in scores[cfg].values())

    b_proto, b_mean, b_worst = strongest(baseline)
    b_paper = scores[baseline][paper_protocol]["robust_accuracy"]
    out, lines = {}, [f"{baseline}: {pct(b_paper)} under the paper's protocol, {pct(b_mean)} under its strongest "
                      f"attack ({b_proto})."]
    for cfg in scores:
        if cfg == baseline:
            continue
        proto, mean, worst = strongest(cfg)
        paper_gain = scores[cfg][paper_protocol]["robust_accuracy"] - b_paper
        gain, worst_gain = mean - b_mean, worst - b_worst
        h = diff_half_width(mean, b_mean, n)
        h_paper = diff_half_width(scores[cfg][paper_protocol]["robust_accuracy"], b_paper, n)
        verdict = "survives" if gain > h else "within noise" if gain >= -h else "reversed"
        out[cfg] = {"paper_gain": paper_gain, "adaptive_gain": gain, "worst_gain": worst_gain, "strongest": proto,
                    "half_width": h, "paper_gain_clear": paper_gain > h_paper, "verdict": verdict}
        line = (f"{cfg}: {paper_gain * 100:+.1f} points over {baseline} under the paper's protocol (95% noise "
                f"±{100 * h_paper:.1f}); under the strongest attack ({proto}, {pct(mean)}) {gain * 100:+.1f} points "
                f"(±{100 * h:.1f}); worst case over the stochastic passes {worst_gain * 100:+.1f} points.")
        if paper_gain > h_paper:
            line += {"survives": f" The gain survives the adaptive attacks ({gain / paper_gain:.0%} of it remains).",
                     "within noise": " The gain does not survive the adaptive attacks: what remains is within "
                                     "the noise.",
                     "reversed": f" Under adaptive attacks it is worse than {baseline}: the gain was an artefact "
                                 "of the non-adaptive evaluation."}[verdict]
        else:
            line += {"survives": " No clear gain under the paper's protocol, yet one beyond the noise under the "
                                 "strongest attack.",
                     "within noise": " No clear gain under either evaluation at this sample size.",
                     "reversed": f" No clear gain under the paper's protocol, and worse than {baseline} under "
                                 "adaptive attacks."}[verdict]
        lines.append(line)
    return {"configs": out, "text": " ".join(lines)}


def same_model_gain(random_scores: dict, fixed_scores: dict) -> dict:
    """The same weights under a random precision against a fixed one (the same-model
    control of RPI and RPT): the gain of the random policy's robust accuracy under its
    strongest attack over the fixed policy's under its own strongest attack.

    random_scores, fixed_scores: {protocol: {"robust_accuracy", "n", ...}}
    (`adaptive.evaluate_protocols`). Returns {"random", "fixed" (accuracies),
    "random_strongest", "fixed_strongest" (protocols), "gain", "ci95", "n" (the smaller n
    of the two records), "paper_gain" (under the paper's protocol)}.
    """
    def strongest(scores):
        proto = min(scores, key=lambda p: scores[p]["robust_accuracy"])
        return proto, scores[proto]

    (rp, r), (fp, f) = strongest(random_scores), strongest(fixed_scores)
    d = difference(r["robust_accuracy"], f["robust_accuracy"], min(r["n"], f["n"]))
    return {"random": r["robust_accuracy"], "fixed": f["robust_accuracy"], "random_strongest": rp,
            "fixed_strongest": fp, "gain": d["difference"], "ci95": d["ci95"], "n": d["n"],
            "paper_gain": random_scores["paper"]["robust_accuracy"] - fixed_scores["paper"]["robust_accuracy"]}


def dq_comparison(acc: dict, amp: dict, n: int, bits: int, dq: str = "DQ", vanilla: str = "vanilla") -> dict | None:
    """DQ against vanilla quantization at `bits` activation bits (Defensive Quantization's
    claim): robust accuracy difference with its 95% interval, and the error amplification
    at the logits of both. acc: {label: `sweeps.accuracy_vs_bits` rows}; amp:
    `sweeps.amplification` output. Rows with robust_per_example (the same test examples)
    are paired (`stats.paired_difference`, "paired": True); without them (older results) the
    interval is that of two independent accuracies. None when `bits` was not measured."""
    row = lambda label: next((r for r in acc[label] if r["bits"] == bits), None)  # noqa: E731
    a, b = row(dq), row(vanilla)
    if a is None or b is None:
        return None
    pa, pb = a.get("robust_per_example"), b.get("robust_per_example")
    paired = bool(pa) and bool(pb) and len(pa) == len(pb)
    if paired:
        gain, ci95 = paired_difference(pa, pb)
        d = {"difference": gain, "ci95": list(ci95), "n": len(pa)}
    else:
        d = difference(a["robust_accuracy"], b["robust_accuracy"], n)
    return {"bits": bits, "dq": a["robust_accuracy"], "vanilla": b["robust_accuracy"],
            "dq_clean": a["clean_accuracy"], "vanilla_clean": b["clean_accuracy"], "gain": d["difference"],
            "ci95": d["ci95"], "n": d["n"], "paired": paired,
            "amplification_logits": {dq: amp[dq]["amplification"][-1], vanilla: amp[vanilla]["amplification"][-1]}}


# ---- 03: allocations against budget -------------------------------------------------------

def allocation_reading(rows: list[dict], n: int, method: str = "lipschitz", against: str = "uniform") -> dict:
    """Does `method` beat `against` at equal budget? rows: `bitselect.compare_allocations`
    rows. Returns {"budgets", "gains" (robust, per budget), "gain_mean", "gain_mean_ci95",
    "gain_ci95" (per budget), "paired", "wins", "losses", "ties", "text"}.

    Rows with "robust_per_example" (the same test examples for every row) are paired: per
    budget, the interval of the mean per-example difference (`stats.paired_difference`;
    `against`'s rows averaged per example, e.g. random's seeds); for the mean over budgets,
    each example's difference averaged over the budgets, then paired. Without them (older
    results) each interval is that of two independent accuracies, and the mean's is the mean
    of the per-budget half-widths (the budgets share their test images: no 1/sqrt(k))."""
    n = check_int(n, "n", 1)
    by = {}
    for r in rows:
        by.setdefault(r["budget"], {}).setdefault(r["method"], []).append(r)
    budgets = sorted(b for b, m in by.items() if method in m and against in m)
    if not budgets:
        raise RqlabError(f"no budget has both {method!r} and {against!r} rows")
    paired = all(r.get("robust_per_example") is not None for b in budgets for r in by[b][method] + by[b][against])
    gains, cis, per_example, wins, losses = [], [], [], 0, 0
    for b in budgets:
        if paired:
            a = [float(v) for v in by[b][method][0]["robust_per_example"]]
            u = [_mean(vs) for vs in zip(*(r["robust_per_example"] for r in by[b][against]))]
            g, ci = paired_difference(a, u)
            per_example.append([x - y for x, y in zip(a, u)])
        else:
            a, u = by[b][method][0]["robust_accuracy"], _mean(r["robust_accuracy"] for r in by[b][against])
            g, h = a - u, diff_half_width(a, u, n)
            ci = (g - h, g + h)
        gains.append(g)
        cis.append([ci[0], ci[1]])
        wins += ci[0] > 0
        losses += ci[1] < 0
    ties = len(budgets) - wins - losses
    noise = "paired on the same" if paired else "the 95% noise of"
    text = (f"At {len(budgets)} budget(s), the {method} allocation's robust accuracy minus the {against} one's: "
            + ", ".join(f"{b:g}: {100 * g:+.1f}" for b, g in zip(budgets, gains))
            + f" points (mean {100 * _mean(gains):+.1f}). Beyond {noise} {n} examples it wins at {wins}, "
              f"loses at {losses} and ties at {ties}: "
            + ("the claim that it beats uniform at equal budget holds here." if wins and not losses else
               "the claim that it beats uniform at equal budget is not supported here." if not wins else
               "the evidence is mixed."))
    if paired:
        g, ci = paired_difference([_mean(d) for d in zip(*per_example)], [0.0] * len(per_example[0]))
        mean_ci = [ci[0], ci[1]]
    else:
        g, h = _mean(gains), _mean((hi - lo) / 2 for lo, hi in cis)
        mean_ci = [g - h, g + h]
    return {"budgets": budgets, "gains": gains, "gain_ci95": cis, "gain_mean": g, "gain_mean_ci95": mean_ci,
            "paired": paired, "wins": wins, "losses": losses, "ties": ties, "text": text}


# ---- 04: training curves --------------------------------------------------------------------

CHEAP_RATIO = 2.0   # an epoch time "close to natural training's": at most this many times it

def curves_reading(curves: dict, ratios: dict, n: int, subject: str = "odgq", reference: str = "natural",
                   costly: str = "pgd-at", labels: dict | None = None, cost: dict | None = None,
                   cost_source: str = "", cost_range: dict | None = None) -> dict:
    """Final-epoch robust accuracy of `subject` against `reference` and `costly`, and their
    cost. ratios: the curves' own epoch-time ratios (what the figure shows); cost: the
    controlled ones (`analysis.cost.training_cost`'s "ratio", described by `cost_source`),
    which alone judge whether the subject is cheap: the curves' runs may have trained under
    different loads. Without `cost`, "cheap" is None (not judged). cost_range: {method: [lo,
    hi]}, the per-repetition ratios' range (`training_cost`'s "ratio_range"): the subject is
    judged cheap only when all of them are within the bound, not cheap when none is, and
    not judged (None) when they straddle it.
    Returns {"final_robust_accuracy", "ratios", "cost_ratios", "robust_gain",
    "robust_gain_ci95", "cheap" (subject's controlled epoch time <= CHEAP_RATIO x the
    reference's, or None), "text"}."""
    labels = labels or {}
    name = lambda m: labels.get(m, m)  # noqa: E731
    final = {m: c["robust_accuracy"][-1] for m, c in curves.items()}
    parts = [f"{name(m)} {pct(v)}" for m, v in final.items()]
    text = f"Robust accuracy after the last epoch: {', '.join(parts)}."
    if cost:
        text += (f" Epoch time over {name(reference)}'s ({cost_source or 'controlled'}): "
                 + ", ".join(f"{name(m)} {r:.2f}x" for m, r in cost.items() if m != reference) + ".")
    gain = gain_ci = cheap = None
    if subject in final and reference in final:
        gain = final[subject] - final[reference]
        h = diff_half_width(final[subject], final[reference], n)
        gain_ci = [gain - h, gain + h]
        text += f" {name(subject)} is {100 * gain:+.1f} points over {name(reference)} (95% noise ±{100 * h:.1f})"
        if costly in final:
            text += f"; {name(costly)} reaches {pct(final[costly])} ({100 * (final[subject] - final[costly]):+.1f} " \
                    f"points for {name(subject)})"
        text += "."
        timed = bool(cost) and subject in cost
        if timed:
            lo, hi = (cost_range or {}).get(subject) or (cost[subject], cost[subject])
            cheap = True if hi <= CHEAP_RATIO else False if lo > CHEAP_RATIO else None
        if gain <= h:
            text += " The claim (robust accuracy far above natural training at a cost close to it) does not hold " \
                    "here: the robust gain is within the noise."
        elif not timed:
            text += " The cost half of the claim is not judged: no controlled epoch-time measurement."
        elif cheap is None:
            text += (f" The cost half of the claim is not judged: the repetitions put {name(subject)} at {lo:.2f}x to "
                     f"{hi:.2f}x natural training's epoch time, on both sides of the {CHEAP_RATIO:g}x bound (time "
                     f"more images or repetitions).")
        elif cheap:
            text += " The claim (robust accuracy far above natural training at a cost close to it) holds here."
        else:
            text += (f" The claim does not hold here: its epoch time is {cost[subject]:.2f}x natural training's "
                     f"(close means at most {CHEAP_RATIO:g}x).")
    return {"final_robust_accuracy": final, "ratios": dict(ratios), "cost_ratios": dict(cost) if cost else None,
            "robust_gain": gain, "robust_gain_ci95": gain_ci, "cheap": cheap, "text": text}


# ---- 02: error amplification and beta -------------------------------------------------------

def amplification_reading(amp: dict) -> dict:
    """Growth of D_l from the first layer to the logits for each model, and which model
    amplifies most at the logits. amp: `sweeps.amplification` output."""
    growth, lines = {}, []
    for name, a in amp.items():
        first, last = a["amplification"][0], a["amplification"][-1]
        growth[name] = last / first if first > 0 else float("inf")
        lines.append(f"{name}: D grows from {first:.3f} at {a['layers'][0]} to {last:.3f} at the logits "
                     f"({growth[name]:.1f}x).")
    logits = {name: a["amplification"][-1] for name, a in amp.items()}
    hi, lo = max(logits, key=logits.get), min(logits, key=logits.get)
    lines.append(f"At the logits {hi} has the largest relative error ({logits[hi]:.3f}) and {lo} the smallest "
                 f"({logits[lo]:.3f}).")
    return {"growth": growth, "logits": logits, "text": " ".join(lines)}


def beta_reading(rows: list[dict], n: int) -> dict:
    """How the orthogonality penalty, the Lipschitz bound and robust accuracy move with
    beta (`sweeps.beta_sweep` rows, sorted by beta here)."""
    n = check_int(n, "n", 1)
    rows = sorted(rows, key=lambda r: r["beta"])
    if len(rows) < 2:
        return {"text": f"Only one beta ({rows[0]['beta']:g}) was trained: nothing to compare.",
                "best": rows[0]["beta"]}
    lo, hi = rows[0], rows[-1]

    def trend(key):
        vals = [r[key] for r in rows]
        if all(b <= a for a, b in zip(vals, vals[1:])):
            return "falls monotonically"
        if all(b >= a for a, b in zip(vals, vals[1:])):
            return "rises monotonically"
        return "is not monotonic"

    best = max(rows, key=lambda r: r["robust_accuracy"])
    h = diff_half_width(best["robust_accuracy"], lo["robust_accuracy"], n)
    text = (f"From beta={lo['beta']:g} to {hi['beta']:g} the orthogonality penalty {trend('orthogonality')} "
            f"({lo['orthogonality']:.3g} to {hi['orthogonality']:.3g}) and the network Lipschitz bound "
            f"{trend('bound')} ({lo['bound']:.3g} to {hi['bound']:.3g}). Robust accuracy is highest at "
            f"beta={best['beta']:g} ({pct(best['robust_accuracy'])}; beta={lo['beta']:g}: "
            f"{pct(lo['robust_accuracy'])}, 95% noise of the difference ±{100 * h:.1f} points)"
            + (", a gain beyond the noise." if best["robust_accuracy"] - lo["robust_accuracy"] > h else
               ", a difference within the noise.") + " These models are trained briefly on a small subset: the "
            "trend of the penalty and the bound is the robust part of this reading.")
    return {"text": text, "best": best["beta"]}


__all__ = ["pct", "half_width", "diff_half_width", "difference", "transfer_cells", "transfer_reading",
           "gains_reading", "same_model_gain", "dq_comparison", "allocation_reading", "CHEAP_RATIO", "curves_reading",
           "amplification_reading", "beta_reading"]
