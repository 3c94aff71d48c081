"""The one evaluation record: frozen, versioned, a JSON round trip, clear errors."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rqlab.record import Record
from rqlab.stats import diff_half_width, half_width, wilson_interval
from rqlab.validate import RqlabError


@st.composite
def records(draw):
    n = draw(st.integers(1, 50))
    passes = draw(st.integers(1, 4))
    clean_hits = draw(st.lists(st.integers(0, passes), min_size=n, max_size=n))
    robust_hits = [min(c, draw(st.integers(0, passes))) for c in clean_hits]

    def acc(hits):
        mean, worst = sum(hits) / passes, sum(h == passes for h in hits)
        return mean / n, wilson_interval(mean, n), worst / n, wilson_interval(worst, n)

    c, r = acc(clean_hits), acc(robust_hits)
    per_example = {"clean": [int(h == passes) for h in clean_hits], "robust": [int(h == passes) for h in robust_hits]}
    if passes > 1:
        per_example.update(clean_hits=clean_hits, robust_hits=robust_hits)
    sanity = draw(st.one_of(st.none(), st.lists(st.fixed_dictionaries(
        {"check": st.sampled_from(["eps_monotone", "large_eps", "zero_gradient"]), "passed": st.booleans(),
         "detail": st.text(max_size=20)}), max_size=3)))
    return Record(model=draw(st.text(min_size=1, max_size=12)), policy={"kind": "fixed", "bits": 4, "act_bits": 4},
                  threat={"attack": "pgd", "eps": draw(st.floats(0, 1)), "steps": 20}, n=n, passes=passes,
                  seed=draw(st.integers(0, 10**6)), clean_accuracy=c[0], clean_ci95=c[1], clean_worst_accuracy=c[2],
                  clean_worst_ci95=c[3], robust_accuracy=r[0], robust_ci95=r[1], robust_worst_accuracy=r[2],
                  robust_worst_ci95=r[3], per_example=per_example, protocol=draw(st.sampled_from(["quick", "standard"])),
                  attacks=draw(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["apgd-ce", "square", "pgd"]),
                                                               "robust_accuracy": st.floats(0, 1)}), max_size=3)),
                  unreliable=draw(st.lists(st.text(max_size=30), max_size=2)),
                  sanity=sanity, extra={"device": "cpu", "wall_time_s": draw(st.floats(0, 1e4))})


@settings(max_examples=80, deadline=None)
@given(records())
def test_record_json_round_trip(rec):
    text = rec.to_json()
    back = Record.from_json(text)
    assert back == rec and back.to_dict() == rec.to_dict()
    d = json.loads(text)
    assert d["format"] == "rqlab-record" and d["version"] == 1
    assert rec["device"] == "cpu" and rec["robust_accuracy"] == rec.robust_accuracy  # fields, then extra
    assert rec.failed_checks == [c["check"] for c in rec.sanity or () if not c["passed"]]


def base(**changes):
    rec = dict(model="m", policy={}, threat={}, n=2, passes=1, seed=0, clean_accuracy=0.5, clean_ci95=(0.1, 0.9),
               clean_worst_accuracy=0.5, clean_worst_ci95=(0.1, 0.9), robust_accuracy=0.0, robust_ci95=(0.0, 0.8),
               robust_worst_accuracy=0.0, robust_worst_ci95=(0.0, 0.8), per_example={"clean": [1, 0], "robust": [0, 0]})
    return {**rec, **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(robust_accuracy=1.5), r"robust_accuracy=1.5 must be a fraction in \[0, 1\]"),
    (dict(clean_accuracy=float("nan")), "clean_accuracy=nan"),
    (dict(protocol="strong"), "protocol='strong' is unknown: choose one of quick, standard"),
    (dict(per_example={"clean": [1], "robust": [0, 0]}), r"per_example\['clean'\] has 1 entries for n=2"),
])
def test_bad_records_name_the_field(changes, message):
    with pytest.raises(RqlabError, match=message):
        Record(**base(**changes))


def test_records_are_frozen_and_versioned():
    rec = Record(**base())
    with pytest.raises(AttributeError):
        rec.robust_accuracy = 1.0
    assert rec.with_extra(data="fashion-mnist")["data"] == "fashion-mnist" and "data" not in rec.extra
    with pytest.raises(RqlabError, match="version 1"):
        Record.from_dict({**rec.to_dict(), "version": 2})
    with pytest.raises(RqlabError, match=r"unknown fields \['robust'\]"):
        Record.from_dict({**rec.to_dict(), "robust": 0.1})
    with pytest.raises(KeyError):
        rec["no_such_key"]


def test_stats_known_values():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert half_width(0.5, 100) == pytest.approx(0.098)
    assert diff_half_width(0.5, 0.5, 100) == pytest.approx(0.098 * 2 ** 0.5)
    assert wilson_interval(2.5, 10)[0] < 0.25 < wilson_interval(2.5, 10)[1]  # fractional hits (mean over passes)


def test_robust_scores_per_example_for_pairing():
    """1/0 outcomes for one pass; the share of passes robust for a random policy; a record
    without per-example outcomes cannot be paired (a clear error, not an empty list)."""
    rec = Record(**base(n=3, per_example={"clean": [1, 1, 0], "robust": [1, 0, 0]}))
    assert rec.robust_scores() == [1.0, 0.0, 0.0]
    rec = Record(**base(n=2, passes=4, per_example={"clean": [1, 1], "robust": [0, 1], "robust_hits": [2, 4]}))
    assert rec.robust_scores() == [0.5, 1.0]
    with pytest.raises(RqlabError, match="keeps no per-example outcomes"):
        Record(**base(per_example={})).robust_scores()
