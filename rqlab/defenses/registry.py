"""The defense registry: a defense is a name, its settings with their defaults, and a
function that builds its training hooks. A new defense is one file that registers itself:

    >>> @register("my-at", params={"eps": 0.1, "steps": 10}, summary="my adversarial training")
    ... def my_at(eps, steps, seed, bits):
    ...     return MyHooks(eps, steps, seed)

and one import line in `rqlab/defenses/__init__.py`. `build("my-at", eps=0.05)` then
fills the other settings with their defaults and rejects unknown ones; `rqlab train
--defense my-at` and `RunSpec(defense="my-at")` take it from there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..training import Hooks
from ..validate import RqlabError, check_choice


@dataclass(frozen=True)
class Defense:
    """A registered defense.

    name: its canonical name. params: {setting: default} (JSON-like values), the
    settings `build` accepts besides `bits` and `seed`. factory(**params, seed, bits)
    -> Hooks. trains_over_set: it trains over a precision set (RPT): the policy must
    be a random set, and the model gets a switchable-BN branch per precision.
    """

    name: str
    factory: Callable[..., Hooks]
    params: dict = field(default_factory=dict)
    trains_over_set: bool = False
    summary: str = ""


_REGISTRY: dict[str, Defense] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, params: dict | None = None, summary: str = "", trains_over_set: bool = False,
             aliases: tuple[str, ...] = ()):
    """Decorator: register `factory` under `name` (see the module docstring)."""
    def decorate(factory):
        if name in _REGISTRY:
            raise RqlabError(f"defense {name!r} is registered twice")
        _REGISTRY[name] = Defense(name, factory, dict(params or {}), trains_over_set, summary)
        for alias in aliases:
            _ALIASES[alias] = name
        return factory
    return decorate


def names() -> tuple[str, ...]:
    """Registered defense names, in registration order."""
    return tuple(_REGISTRY)


def canonical(name: str) -> str:
    """The registered name for `name` or one of its aliases (case and spaces ignored)."""
    key = str(name).strip().lower()
    return check_choice(_ALIASES.get(key, key), "defense", names())


def get(name: str) -> Defense:
    return _REGISTRY[canonical(name)]


def needs_bits_set(name: str) -> bool:
    """True for defenses that train over a precision set (RPT; switchable BN)."""
    return get(name).trains_over_set


def resolve_params(name: str, params: dict | None = None) -> dict:
    """The defense's full settings: `params` over its defaults; an unknown key is an error."""
    d = get(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(d.params))
    if unknown:
        allowed = ", ".join(d.params) or "none"
        raise RqlabError(f"defense {d.name!r} has no setting {', '.join(unknown)}: its settings are {allowed}")
    return {**d.params, **params}


def build(name: str, bits=None, seed: int = 0, **params) -> Hooks:
    """The training hooks of defense `name` with `params` over its defaults.

    bits: the precision set of defenses that train over one (required there; ignored by
    the others). seed: the defense's own randomness (random starts, precision draws).
    """
    d = get(name)
    if d.trains_over_set and (not bits or len(tuple(bits)) < 2):
        raise RqlabError(f"defense={d.name!r} trains over a precision set: give bits such as 4-8 (got {bits!r})")
    return d.factory(seed=seed, bits=bits, **resolve_params(d.name, params))
