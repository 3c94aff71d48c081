"""Attacks by name. Adding an attack = one module with a function
`name(model, x, y, threat) -> x_adv` and an `OPTIONS` dict, plus one line in `_MODULES`.
A module may also define `check_options(options) -> options`, run when a ThreatModel is
built (validation that names the option; defaults it wants recorded filled in).
"""
from __future__ import annotations

import importlib
from typing import Callable

from ..validate import RqlabError

# name -> module (under rqlab.attacks) holding a function of the same name
_MODULES = {
    "fgsm": "fgsm", "pgd": "pgd", "cw": "cw", "eot_pgd": "eot_pgd", "expectation": "expectation",
    "transfer": "transfer", "autoattack": "autoattack", "square": "square", "bpda": "bpda",
}


def names() -> list[str]:
    """Registered attack names."""
    return list(_MODULES)


def canonical(name) -> str:
    """Registry name of `name` ("EOT-PGD" -> "eot_pgd"); RqlabError if unknown."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in _MODULES:
        raise RqlabError(f"attack={name!r} is unknown: choose one of {', '.join(names())}")
    return key


def _module(name: str):
    return importlib.import_module(f"rqlab.attacks.{_MODULES[canonical(name)]}")


def get(name) -> Callable:
    """The attack function `attack(model, x, y, threat) -> x_adv` registered as `name`."""
    key = canonical(name)
    return getattr(_module(key), key)


def options(name) -> dict:
    """Attack-specific options of `name` with their defaults."""
    return dict(getattr(_module(name), "OPTIONS", {}))


def check_options(name, options: dict) -> dict:
    """`options` as the attack's own `check_options` validates them (unchanged if none)."""
    check = getattr(_module(name), "check_options", None)
    return check(dict(options)) if check is not None else options
