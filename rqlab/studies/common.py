"""What the studies share: the base of their `Params`, the loaded inputs, the results
record and writing it.

A notebook runs a study in four calls (the cells hold no other logic):

    >>> params = study.Params.from_namespace(globals())   # the parameters cell's names, validated
    >>> inputs = study.load_inputs(params)                 # models and test images, checked against params
    >>> results = study.run(params, inputs)                # a dict of JSON numbers (+ .models)
    >>> write_results(params, results)                     # output_dir/results.json, atomically

`Params.from_namespace` picks the dataclass's fields out of a namespace (a notebook's
`globals()`, where papermill has injected its values), so the parameters cell stays a
plain list of `name = value` lines that papermill and `rqlab report` read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import check_output_dir
from ..validate import RqlabError, check_choice, check_float, check_int
from . import params as P

ATTACKS = ("pgd", "fgsm", "cw")   # the white-box attacks a notebook's `attack` may name
EXPLORER_N = 64                   # test examples an explorer recomputes on


class StudyParams:
    """Base of the studies' frozen `Params` dataclasses.

    Subclasses declare the notebook's parameters as fields (same names and defaults as
    its parameters cell) and call `self._check_common()` first in `__post_init__`; checked
    values are stored normalised (e.g. bits as a sorted tuple) with `self._set`.
    """

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The parameter names, in the order of the parameters cell."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict:
        """{name: default} of every field (lists as tuples)."""
        out = {}
        for f in dataclasses.fields(cls):
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return out

    @classmethod
    def from_namespace(cls, namespace: dict):
        """The Params of the fields' names found in `namespace` (e.g. a notebook's
        `globals()`); names it lacks keep their defaults, other names are ignored."""
        return cls(**{k: namespace[k] for k in cls.fields() if k in namespace})

    def to_dict(self) -> dict:
        """The parameters as JSON values (tuples as lists)."""
        return {k: _jsonable(getattr(self, k)) for k in self.fields()}

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass: store the normalised value

    def _check_common(self) -> None:
        """The parameters every notebook declares."""
        from ..training import resolve_device

        P.check_dataset(self.dataset)
        check_choice(self.attack, "attack", list(ATTACKS))
        self._set("eps", check_float(self.eps, "eps", 0.0, 1.0, lo_open=True))
        self._set("steps", check_int(self.steps, "steps", 1))
        self._set("n_examples", P.check_n_examples(self.n_examples, self.dataset))
        self._set("seed", check_int(self.seed, "seed", 0))
        resolve_device(self.device)
        if not isinstance(self.output_dir, (str, Path)) or not str(self.output_dir).strip():
            raise RqlabError(f"output_dir={self.output_dir!r} must be a folder path (results.json goes there)")
        check_output_dir(self.output_dir, "output_dir")  # before the notebook's work, not at its end
        check_bool(self.interactive, "interactive")

    @property
    def torch_device(self):
        """`device` resolved ("auto": cuda when available, else cpu)."""
        from ..training import resolve_device

        return resolve_device(self.device)

    def threat(self):
        """The white-box attack of the parameters: ThreatModel(attack, eps, steps, seed)."""
        from ..attacks import ThreatModel

        return ThreatModel(self.attack, eps=self.eps, steps=self.steps, seed=self.seed)


def check_bool(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise RqlabError(f"{field}={value!r} must be True or False")
    return value


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


@dataclass
class Inputs:
    """What a study works on, loaded and checked against its parameters.

    models: {label: model in eval mode, on device}; specs: {label: zoo name or checkpoint
    path}; x: float (N, C, H, W) in [0, 1] and y: int64 (N,), the first n_examples of the
    seeded test subset, on device.
    """

    models: dict
    specs: dict
    x: object
    y: object
    device: object


def load_inputs(params: StudyParams, specs: dict) -> Inputs:
    """Load every model of `specs` ({label: spec}) with `rqlab.load`, check that it fits
    the dataset, and load the test subset."""
    from ..zoo import load

    device = params.torch_device
    models = {}
    for label, spec in specs.items():
        models[label] = load(spec, device=device)
        P.check_model_fits(models[label], params.dataset, f"{label} model ({spec})")
    x, y = P.load_test_subset(params.dataset, params.n_examples, params.seed, device)
    return Inputs(models, dict(specs), x, y, device)


class Results(dict):
    """A study's measured numbers: a plain dict of JSON values (results.json holds it as
    is), with `.models`, the models it used or trained, and `.objects`, other things the
    explorers reuse (e.g. bit selection's Sensitivity); neither is ever written."""

    def __init__(self, *args, models: dict | None = None, objects: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.models = dict(models or {})
        self.objects = dict(objects or {})


def machine(device) -> str:
    """The machine a study's numbers are measured on, for results["machine"] and the line
    under each figure: "cpu (AMD EPYC, 2 threads)" (CPU models vary between machines)."""
    import torch

    from ..machine import device_name

    return device_name(torch.device(device))


def finish(fig, results: dict):
    """A study figure's layout, with the machine its numbers were measured on named under it
    (results["machine"]; figures are compared across machines, whose speeds differ)."""
    where = results.get("machine")
    if where:
        fig.text(0.995, 0.005, f"measured on {where}", ha="right", va="bottom", fontsize=7, color="0.35")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    return fig


def write_results(params: StudyParams, results: dict, name: str = "results.json") -> Path:
    """Write `results` as JSON into params.output_dir (atomically); returns the path."""
    from ..checkpoint import save_json

    return save_json(Path(params.output_dir) / name, dict(results))


def explorer(params: StudyParams, pool: dict, x, y, threat=None, policy=None, passes: int = 1, bits=None,
             title: str = "", start_bits=None):
    """The ipywidgets explorer (`rqlab.explore.Explorer`) over the models of `pool` on the
    first EXPLORER_N examples, eps from 0 to 3 eps; None when params.interactive is False."""
    if not params.interactive:
        return None
    from ..explore import Explorer, robustness_probe

    k = min(EXPLORER_N, len(x))
    threat = threat or params.threat()
    probe = robustness_probe(pool, x[:k], y[:k], threat, policy=policy, passes=passes)
    title = title.format(k=k) if title else f"white-box {threat.attack}-{threat.steps}, {k} examples"
    return Explorer(probe, models=list(pool), bits=list(bits if bits is not None else params.bits),
                    eps=(0.0, min(1.0, 3 * params.eps), params.eps), title=title, start_bits=start_bits)


__all__ = ["ATTACKS", "EXPLORER_N", "StudyParams", "Inputs", "load_inputs", "Results", "write_results", "explorer",
           "check_bool"]
