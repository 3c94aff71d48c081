"""Claims (a), (b) and (d) at full strength: the zoo cards' standard-protocol records paired on
the same test images (`standard_claims`, called by the batch; rows in summary.json
"standard_claims", a table of index.html and a section of docs/findings.md).

    >>> rows = standard_claims()        # one row per comparison, in PAIRS order
    >>> rows[0]["verdict"], rows[0]["value"], rows[0]["ci95"], rows[0]["better"]

The notebooks measure (a), (b) and (d) with their own attack (PGD-20 by default); a headline
figure is the standard protocol's (METHODS section 8). Each zoo card holds the standard
protocol's record, per example (`rqlab zoo measure`), on the first n images of the same
test subset, so two cards pair example by example on the first min(n) images: the
difference of the claim (e.g. DQ's robust accuracy minus vanilla quantization's) and its
paired 95% interval (`stats.paired_difference`), with the claims' verdict rule
(claims.verdict). Each comparison reads the full-budget models (issue 14) once both are
measured, else its -small pair where that pair is a fair one (same training budget), else
it is "not run" with what is missing. A flagged record (e.g. Square beating the
white-box attacks) makes the figure an upper bound: the row says so. Claim (a) is paired
twice: at the cards' eps (0.1, where every full-budget natural model is at 0%) and at
zoo.SMALL_EPS (the cards' records there, `rqlab zoo measure` for Recipe.extra_eps). Claim
(b) pairs a model with itself at another precision (Recipe.extra_precisions, zoo.B_CONTROLS):
the RPT model under random precision against the same weights at a fixed 8 bits, and RPI
alone on the 8-bit PGD-7 model against that model at its own 8 bits. One comparison per
claim is its `headline`: the claims table's figure where it is measured (claims.with_standard).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import zoo
from ..stats import paired_difference
from .claims import verdict, who


@dataclass(frozen=True)
class Pair:
    """One comparison: `better` minus `worse`, which the claim says is positive (a verdict),
    or a context row (verdict None: shown, not judged)."""
    id: str                        # the claim of claims.CLAIMS it belongs to
    text: str                      # the difference, in words
    better: str                    # full-budget zoo names
    worse: str
    small: bool = True             # whether the -small pair is a fair fallback (same budget)
    judged: bool = True            # False: context (e.g. ODG-Q against adversarial training)
    eps: float | None = None       # the cards' records at this eps (zoo.SMALL_EPS), else the headline's
    headline: bool = False         # the claims table's figure for its claim (claims.with_standard)
    better_at: str | None = None   # the card's record at this precision (Recipe.extra_precisions), else its first
    worse_at: str | None = None


_A = (  # claim (a): (text, better, worse, whether the -small pair is a fair fallback)
    ("DQ (beta 3e-3) is more robust than vanilla quantization (DQ minus vanilla, w32a4)",
     "fmnist-dq-natural", "fmnist-a4-natural", True),
    ("DQ at beta 1e-3 is more robust than vanilla quantization (DQ minus vanilla, w32a4)",
     "fmnist-dq-natural-beta1e-3", "fmnist-a4-natural", False),   # the beta sweep (no -small)
    ("DQ at beta 1e-2 is more robust than vanilla quantization (DQ minus vanilla, w32a4)",
     "fmnist-dq-natural-beta1e-2", "fmnist-a4-natural", False),
    ("Vanilla quantization is less robust than FP (FP minus vanilla w32a4)",
     "fmnist-fp-natural", "fmnist-a4-natural", False),   # -small FP saw 60k images, a4 6k
)

PAIRS = (
    *(Pair("a", text, better, worse, small=small) for text, better, worse, small in _A),
    # the same at a small eps, where natural models keep some accuracy (at 0.1 all are at 0%);
    # full budget only (the -small cards are not measured there)
    # the first (beta 3e-3, notebook 02's highlighted model) is the claims table's figure for (a)
    *(Pair("a", f"{text}, at eps {zoo.SMALL_EPS:g}", better, worse, small=False, eps=zoo.SMALL_EPS,
           headline=i == 0) for i, (text, better, worse, _) in enumerate(_A)),
    # claim (b): random precision against the same weights at a fixed precision (full budget only:
    # the -small cards are not measured at the other precision)
    Pair("b", "RPI+RPT: the RPT model under random precision 4..8 is more robust than the same weights at a fixed "
              "8 bits (random minus fixed)", "fmnist-rpt-pgd7", "fmnist-rpt-pgd7", small=False, worse_at="8",
         headline=True),
    Pair("b", "RPI alone: the 8-bit PGD-7 model under random precision 4..8 is more robust than at its own 8 bits "
              "(random minus fixed)", "fmnist-q8-pgd7", "fmnist-q8-pgd7", small=False, better_at="4-8"),
    Pair("b", "context: RPI+RPT against FP PGD-7 AT, the paper's comparison (RPI+RPT minus FP)",
         "fmnist-rpt-pgd7", "fmnist-fp-pgd7", small=False, judged=False),
    Pair("d", "ODG-Q is far above natural training at 4 bits (ODG-Q minus natural)",
         "fmnist-odgq-q4", "fmnist-q4-natural", headline=True),
    Pair("d", "ODG-Q is far above natural training, binary (ODG-Q minus natural)",
         "fmnist-odgq-bin", "fmnist-bin-natural"),
    Pair("d", "context: ODG-Q against FGSM-RS at 4 bits (ODG-Q minus FGSM-RS)",
         "fmnist-odgq-q4", "fmnist-q4-fgsm-rs", judged=False),
    Pair("d", "context: ODG-Q against PGD-7 AT at 4 bits (ODG-Q minus PGD-7 AT)",
         "fmnist-odgq-q4", "fmnist-q4-pgd7", judged=False),
    # binary: the adversarially trained controls have no -small recipe
    Pair("d", "context: ODG-Q against FGSM-RS, binary (ODG-Q minus FGSM-RS)",
         "fmnist-odgq-bin", "fmnist-bin-fgsm-rs", small=False, judged=False),
    Pair("d", "context: ODG-Q against PGD-7 AT, binary (ODG-Q minus PGD-7 AT)",
         "fmnist-odgq-bin", "fmnist-bin-pgd7", small=False, judged=False),
)


def _records(pair: Pair, record):
    """(better, worse, their records, budget) of the first candidate with both measured,
    else (None, the reason). record: (name, eps, precision) -> the card's standard Record or None."""
    candidates = [(pair.better, pair.worse, "full")]
    if pair.small:
        candidates.append((f"{pair.better}-small", f"{pair.worse}-small", "small"))
    missing = []
    for better, worse, budget in candidates:
        if better not in zoo.RECIPES or worse not in zoo.RECIPES:
            missing.append(f"{better} or {worse} is not a zoo recipe")
            continue
        sides = [(better, pair.better_at), (worse, pair.worse_at)]
        # the precision only where a side has one: `record` may take (name, eps) alone (pair_row)
        recs = [record(m, pair.eps, at) if at is not None else record(m, pair.eps) for m, at in sides]
        if all(recs):
            return (better, worse, recs[0], recs[1], budget), None
        built = zoo.names(trained_only=True)
        at = "" if pair.eps is None else f" at eps {pair.eps:g}"
        missing.append(", ".join(f"{who(m, p)} ({'not measured' + at if m in built else 'not built'})"
                                 for (m, p), r in zip(sides, recs) if r is None))
    why = "; ".join(missing)
    hint = "" if pair.small or pair.eps is not None else f" (no fair -small pair for {pair.better})"
    return None, f"Needs the standard protocol on both cards: {why}{hint}. `rqlab zoo build` / `rqlab zoo measure`."


def pair_row(pair: Pair, record=None) -> dict:
    """The row of one comparison (JSON values). record: (name, eps[, precision]) -> Record
    or None (default `zoo.standard_record`)."""
    row = {"id": pair.id, "text": pair.text, "judged": pair.judged, "eps": pair.eps, "headline": pair.headline,
           "better": None, "worse": None, "better_at": pair.better_at, "worse_at": pair.worse_at, "budget": None,
           "value": None, "ci95": None, "n": None, "robust": None, "verdict": "not run" if pair.judged else None,
           "flags": [], "reason": None}
    found, why = _records(pair, record or zoo.standard_record)
    if found is None:
        row["reason"] = why
        return row
    better, worse, rb, rw, budget = found
    n = min(rb.n, rw.n)  # the same first n images of the card's test subset
    diff, ci95 = paired_difference(rb.robust_scores()[:n], rw.robust_scores()[:n])
    b, w = who(better, pair.better_at), who(worse, pair.worse_at)
    flags = [f"{m}: {u}" for m, r in ((b, rb), (w, rw)) for u in r.unreliable]
    row.update(better=better, worse=worse, budget=budget, value=diff, ci95=list(ci95), n=n,
               robust={b: rb.robust_accuracy, w: rw.robust_accuracy}, flags=flags,
               verdict=verdict(ci95) if pair.judged else None)
    parts = [f"standard protocol on the same {n} images: {b} {100 * rb.robust_accuracy:.1f}% (n = {rb.n}), "
             f"{w} {100 * rw.robust_accuracy:.1f}% (n = {rw.n})"]
    if budget == "small":
        parts.append("the -small models (6,000 training images): the full-budget pair is not measured yet")
    if flags:
        parts.append("a flagged record: its figure is an upper bound, the difference is not exact")
    if max(rb.robust_scores()[:n]) == 0 and max(rw.robust_scores()[:n]) == 0:
        eps = rb.threat.get("eps")
        parts.append(f"both are at 0% at eps {eps:g}: a floor, where no difference can show; the claim needs "
                     "a smaller eps to be tested (the rows at eps "
                     f"{zoo.SMALL_EPS:g})" if eps is not None else "both are at 0%: a floor")
    row["reason"] = "; ".join(parts) + "."
    return row


def standard_claims() -> list[dict]:
    """Every comparison of PAIRS, in order (reads each zoo card's record once)."""
    record = functools.lru_cache(maxsize=None)(zoo.standard_record)
    return [pair_row(p, record) for p in PAIRS]


__all__ = ["Pair", "PAIRS", "pair_row", "standard_claims"]
