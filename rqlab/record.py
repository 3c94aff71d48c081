"""The evaluation record: one frozen, versioned type for every measured accuracy.

    >>> rec = rqlab.evaluate(model, test_set, threat)          # a Record
    >>> rec.robust_accuracy, rec.robust_ci95                    # (0.62, (0.577, 0.661))
    >>> Record.from_json(rec.to_json()) == rec                  # JSON round trip
    >>> rec["robust_accuracy"]                                  # read by key too (fields, then extra)

Naming, the same in records, training histories, zoo cards, sweeps and studies:
`clean_accuracy`, `robust_accuracy` (mean over forward passes), `*_worst_accuracy`
(correct in every pass), `*_ci95` (Wilson 95% intervals, `rqlab.stats`), and
`per_example` outcomes. Random defenses are scored over `passes` forward passes
(METHODS section 6). `protocol` says which protocol made the record ("quick": the one
threat given; "standard": METHODS section 8; "engine": a deployed engine,
`rqlab.deploy`); `sanity` holds the METHODS section 6 checks; `extra`
holds the provenance (versions, device, wall time, checkpoint checksum, data).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from .validate import RqlabError

RECORD_FORMAT = "rqlab-record"
RECORD_VERSION = 1
PROTOCOLS = ("quick", "standard")               # what rqlab.evaluate runs
RECORD_PROTOCOLS = PROTOCOLS + ("engine",)      # engine: rqlab.deploy.evaluate_engine (an ONNX Runtime engine)


@dataclass(frozen=True)
class Record:
    """Clean and robust accuracy of one model at one precision policy under one threat.

    model: a name; policy, threat: their to_dict(); n: examples; passes: forward passes
    per example; seed: the evaluation's seed. per_example: {"clean": [0/1] * n,
    "robust": [0/1] * n} (1 = correct in every pass), plus "clean_hits"/"robust_hits"
    (passes correct, per example) when passes > 1.
    attacks: a protocol's attacks, one dict each ({"name", "robust_accuracy", ...}; the
    record's robust figures are then the worst case over them, per example).
    unreliable: the reasons, if any, not to trust the robust figure (e.g. a black-box
    attack beats the white-box ones; common zero gradients; a random forward with no
    adaptive attack); () when none was found.
    """

    model: str
    policy: dict
    threat: dict
    n: int
    passes: int
    seed: int
    clean_accuracy: float
    clean_ci95: tuple[float, float]
    clean_worst_accuracy: float
    clean_worst_ci95: tuple[float, float]
    robust_accuracy: float
    robust_ci95: tuple[float, float]
    robust_worst_accuracy: float
    robust_worst_ci95: tuple[float, float]
    per_example: dict = field(default_factory=dict)
    protocol: str = "quick"
    attacks: tuple = ()
    unreliable: tuple = ()
    sanity: tuple | None = None
    extra: dict = field(default_factory=dict)
    version: int = RECORD_VERSION

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.protocol not in RECORD_PROTOCOLS:
            raise RqlabError(f"protocol={self.protocol!r} is unknown: choose one of {', '.join(RECORD_PROTOCOLS)}")
        for kind in ("clean", "robust"):
            for suffix in ("", "_worst"):
                acc = getattr(self, f"{kind}{suffix}_accuracy")
                if not (isinstance(acc, (int, float)) and math.isfinite(acc) and 0 <= acc <= 1):
                    raise RqlabError(f"{kind}{suffix}_accuracy={acc!r} must be a fraction in [0, 1]")
                set_(f"{kind}{suffix}_ci95", tuple(float(v) for v in getattr(self, f"{kind}{suffix}_ci95")))
        for key in ("clean", "robust"):
            outcomes = self.per_example.get(key)
            if outcomes is not None and len(outcomes) != self.n:
                raise RqlabError(f"per_example[{key!r}] has {len(outcomes)} entries for n={self.n} examples")
        if self.sanity is not None:
            set_("sanity", tuple(self.sanity))
        set_("attacks", tuple(self.attacks))
        set_("unreliable", tuple(str(r) for r in self.unreliable))

    def __getitem__(self, key: str):
        """rec["robust_accuracy"]: a field, else an entry of `extra` (KeyError otherwise)."""
        if key in _FIELDS:
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def with_extra(self, **extra) -> "Record":
        """A copy with provenance added to `extra` (e.g. checkpoint_sha256, data)."""
        return replace(self, extra={**self.extra, **extra})

    def robust_scores(self) -> list[float]:
        """Per-example robust score, for pairing two records of the same examples
        (`stats.paired_difference`): 1/0, or the share of passes robust under a random policy."""
        pe = self.per_example
        if "robust_hits" in pe:
            return [h / self.passes for h in pe["robust_hits"]]
        if "robust" not in pe:
            raise RqlabError(f"the record of {self.model!r} keeps no per-example outcomes: re-measure it")
        return [float(v) for v in pe["robust"]]

    @property
    def failed_checks(self) -> list[str]:
        """Names of the failed sanity checks (empty when none ran or all passed)."""
        return [c["check"] for c in self.sanity or () if not c.get("passed", True)]

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return {"format": RECORD_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        if not isinstance(d, dict):
            raise RqlabError(f"a record must be a dict, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", RECORD_FORMAT)
        if fmt != RECORD_FORMAT or d.get("version", RECORD_VERSION) != RECORD_VERSION:
            raise RqlabError(f"record format={fmt!r} version={d.get('version')!r}: this rqlab reads "
                             f"{RECORD_FORMAT!r} version {RECORD_VERSION}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise RqlabError(f"record has unknown fields {unknown}; known: {sorted(_FIELDS)}")
        return cls(**d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise RqlabError(f"record is not valid JSON: {e}") from None


_FIELDS = tuple(f.name for f in fields(Record))

__all__ = ["Record", "RECORD_FORMAT", "RECORD_VERSION", "PROTOCOLS", "RECORD_PROTOCOLS"]
