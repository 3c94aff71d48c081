"""Precision control: who runs at how many bits (METHODS section 1).

Three policies, one way to apply them:

    >>> apply(model, Fixed(4))                       # whole model at 4 bits
    >>> apply(model, Fixed(32, act_bits=4))          # FP weights, 4-bit activations
    >>> apply(model, PerLayer({"conv2": 3, "fc1": 6}))  # mixed precision
    >>> apply(model, RandomPrecision((4, 5, 6, 7, 8), seed=0))  # a new draw every forward
    >>> with using(model, Fixed(8)):                 # restores the previous state on exit,
    ...     logits = model(x)                        # even when the body raises
    >>> support = [Fixed(4), Fixed(8)]
    >>> with switching(model, support) as switch:  # switch many times, cheaply
    ...     switch(support[0]); logits = model(x)

Layers flagged `keep_fp` (first conv, last linear by default) stay at full precision
under every policy. Switchable batch norms follow the policy's precision.
`parse_policy("4-8")` reads the command-line spelling. Policies serialise themselves:
`policy_from_dict(p.to_dict()) == p` (JSON-safe, as stored in checkpoints and records).
"""
from __future__ import annotations

import contextlib
import random
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Mapping, Sequence, Union

import torch.nn as nn

from ..validate import FP_BITS, RqlabError, check_bits, check_bits_set, check_int
from .layers import QUANT_LAYERS, SwitchableBatchNorm2d

_POLICY_ATTR = "_rqlab_policy"
_HOOK_ATTR = "_rqlab_random_hook"


def _fields(d, cls, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    """The entries of a policy dict `d` for `cls`, checked: a dict of kind `cls.KIND`,
    the required keys present, no key outside required + optional."""
    if not isinstance(d, Mapping):
        raise RqlabError(f"a {cls.__name__} policy must be a dict, got {type(d).__name__}")
    kind = d.get("kind", cls.KIND)
    if kind != cls.KIND:
        raise RqlabError(f"policy kind={kind!r} cannot be read by {cls.__name__}: expected kind={cls.KIND!r}")
    allowed = ("kind",) + required + optional
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise RqlabError(f"{cls.KIND} policy has unknown fields {unknown}: allowed fields are {list(allowed)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise RqlabError(f"{cls.KIND} policy lacks the fields {missing}: it needs {list(required)}")
    return {k: v for k, v in d.items() if k != "kind"}


@dataclass(frozen=True)
class Fixed:
    """One precision for the whole model: weights at `bits`, inputs at `act_bits` (default `bits`)."""

    KIND: ClassVar[str] = "fixed"

    bits: int = FP_BITS
    act_bits: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits, "bits"))
        if self.act_bits is not None:
            act = check_bits(self.act_bits, "act_bits")  # act_bits == bits is the same policy as None
            object.__setattr__(self, "act_bits", None if act == self.bits else act)

    @property
    def a_bits(self) -> int:
        return self.bits if self.act_bits is None else self.act_bits

    def support(self) -> tuple[int, ...]:
        return (self.bits,)

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "bits": self.bits, "act_bits": self.a_bits}

    @classmethod
    def from_dict(cls, d: dict) -> "Fixed":
        """Inverse of `to_dict`: {"kind": "fixed", "bits": b, "act_bits": a (optional)}."""
        f = _fields(d, cls, ("bits",), ("act_bits",))
        return cls(f["bits"], f.get("act_bits"))

    def __str__(self) -> str:
        name = "fp" if self.bits == FP_BITS else f"{self.bits}"
        return name if self.act_bits in (None, self.bits) else f"w{self.bits}a{self.act_bits}"


@dataclass(frozen=True)
class PerLayer:
    """Mixed precision: {layer name: bits}; layers not named get `default`.

    Names are those of `quant_layers(model)` (e.g. "conv2", "layer1.0.conv1").
    A value may be an int (weights and inputs) or a pair (w_bits, a_bits).
    """

    KIND: ClassVar[str] = "per_layer"

    bits: Mapping[str, object]
    default: int = FP_BITS

    def __post_init__(self):
        if not isinstance(self.bits, Mapping):
            raise RqlabError(f"bits must be a mapping {{layer name: bits}}, got {type(self.bits).__name__}")
        bits = {}
        for name, b in self.bits.items():
            if not isinstance(name, str):
                raise RqlabError(f"bits has the layer name {name!r}: layer names are strings such as 'conv2'")
            if isinstance(b, (tuple, list)):
                if len(b) != 2:
                    raise RqlabError(f"bits[{name!r}]={list(b)} must be one bit-width or a pair (w_bits, a_bits)")
                w, a = (check_bits(v, f"bits[{name!r}]") for v in b)
                bits[name] = w if w == a else (w, a)  # an equal pair is the same as one int
            else:
                bits[name] = check_bits(b, f"bits[{name!r}]")
        object.__setattr__(self, "default", check_bits(self.default, "default"))
        object.__setattr__(self, "bits", bits)

    def layer_bits(self, name: str) -> tuple[int, int]:
        b = self.bits.get(name, self.default)
        return b if isinstance(b, tuple) else (b, b)

    def support(self) -> tuple[int, ...]:
        return (self.default,)

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "bits": {k: self.layer_bits(k) for k in self.bits}, "default": self.default}

    @classmethod
    def from_dict(cls, d: dict) -> "PerLayer":
        """Inverse of `to_dict`: {"kind": "per_layer", "bits": {layer: b or [w, a]},
        "default": b (optional, 32)}."""
        f = _fields(d, cls, ("bits",), ("default",))
        return cls(f["bits"], f.get("default", FP_BITS))

    def __str__(self) -> str:
        return "per-layer(" + ", ".join(f"{k}={v}" for k, v in self.bits.items()) + ")"


@dataclass
class RandomPrecision:
    """Random precision inference (Double-Win Quant): each forward batch draws b
    uniformly from `choices`, from a generator seeded with `seed`.

    Equality compares `choices` and `seed`, not how far the generator has drawn."""

    KIND: ClassVar[str] = "random"

    choices: tuple[int, ...]
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.choices = check_bits_set(self.choices, "choices")
        self.seed = check_int(self.seed, "seed")
        self._rng = random.Random(self.seed)

    def draw(self) -> int:
        return self._rng.choice(self.choices)

    def support(self) -> tuple[int, ...]:
        return self.choices

    def get_state(self):
        return self._rng.getstate()

    def set_state(self, state) -> None:
        self._rng.setstate(state)

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "choices": list(self.choices), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "RandomPrecision":
        """Inverse of `to_dict`: {"kind": "random", "choices": [b, ...], "seed": s (optional, 0)}.
        The generator starts at the seed (its state is saved apart: `get_state`)."""
        f = _fields(d, cls, ("choices",), ("seed",))
        if not isinstance(f["choices"], (list, tuple)):
            raise RqlabError(f"random policy choices={f['choices']!r} must be a list of bit-widths such as [4, 6, 8]")
        return cls(tuple(f["choices"]), f.get("seed", 0))

    def __str__(self) -> str:
        c = self.choices
        if c == tuple(range(c[0], c[-1] + 1)):
            return f"random({c[0]}-{c[-1]})"
        return "random(" + ",".join(map(str, c)) + ")"


Policy = Union[Fixed, PerLayer, RandomPrecision]
POLICY_KINDS = {cls.KIND: cls for cls in (Fixed, PerLayer, RandomPrecision)}


def policy_from_dict(d: dict | None) -> Policy:
    """Inverse of `Policy.to_dict()`, dispatching on d["kind"] ("fixed", "per_layer",
    "random"); None -> Fixed(32). Unknown kinds and fields raise RqlabError."""
    if d is None:
        return Fixed(FP_BITS)
    if not isinstance(d, Mapping):
        raise RqlabError(f"a policy dict is expected (from Policy.to_dict()), got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in POLICY_KINDS:
        raise RqlabError(f"policy kind={kind!r} is unknown: allowed kinds are {', '.join(POLICY_KINDS)}")
    return POLICY_KINDS[kind].from_dict(d)


def quant_layers(model: nn.Module, include_fp: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every QuantConv2d/QuantLinear, in module order.

    Layers flagged keep_fp are left out unless include_fp.
    """
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QUANT_LAYERS) and (include_fp or not m.keep_fp)]


def _sbns(model: nn.Module) -> list[SwitchableBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]


def _set_all(model: nn.Module, w_bits: int, a_bits: int) -> None:
    for _, layer in quant_layers(model):
        layer.w_bits, layer.a_bits = w_bits, a_bits
    for sbn in _sbns(model):
        sbn.bits = w_bits


def _check_sbn(model: nn.Module, bits) -> None:
    for sbn in _sbns(model):
        missing = [b for b in bits if b not in sbn.bits_set]
        if missing:
            raise RqlabError(
                f"bits {missing} have no switchable batch-norm branch: this model was built with "
                f"sbn_bits={list(sbn.bits_set)}")


def apply(model: nn.Module, policy: Policy) -> nn.Module:
    """Set the model's precision policy (replacing the previous one). Returns the model."""
    if isinstance(policy, int):
        policy = Fixed(policy)
    if not isinstance(policy, (Fixed, PerLayer, RandomPrecision)):
        raise RqlabError(f"policy={policy!r} is not a precision policy: use Fixed, PerLayer or RandomPrecision")
    _check_sbn(model, policy.support())
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        object.__setattr__(model, _HOOK_ATTR, None)
    if isinstance(policy, Fixed):
        _set_all(model, policy.bits, policy.a_bits)
    elif isinstance(policy, PerLayer):
        layers = dict(quant_layers(model))
        unknown = sorted(set(policy.bits) - set(layers))
        if unknown:
            fp = [n for n, m in quant_layers(model, include_fp=True) if m.keep_fp]
            raise RqlabError(
                f"per-layer bits name {unknown}, which are not quantizable layers of this model; "
                f"quantizable layers: {list(layers)}" + (f" (kept at FP: {fp})" if fp else ""))
        for name, layer in layers.items():
            layer.w_bits, layer.a_bits = policy.layer_bits(name)
        for sbn in _sbns(model):
            sbn.bits = policy.default
    else:
        def draw(module, args):
            b = policy.draw()
            _set_all(module, b, b)

        object.__setattr__(model, _HOOK_ATTR, model.register_forward_pre_hook(draw))
        _set_all(model, policy.choices[-1], policy.choices[-1])
    object.__setattr__(model, _POLICY_ATTR, policy)
    return model


def current(model: nn.Module) -> Policy:
    """The policy last applied to `model` (Fixed(32) if none)."""
    return getattr(model, _POLICY_ATTR, None) or Fixed(FP_BITS)


def _snapshot(model: nn.Module):
    return ([(m, m.w_bits, m.a_bits) for _, m in quant_layers(model)],
            [(s, s.bits) for s in _sbns(model)], getattr(model, _POLICY_ATTR, None))


def _restore(model: nn.Module, snap) -> None:
    layers, sbns, policy = snap
    apply(model, policy or Fixed(FP_BITS))
    for m, w, a in layers:
        m.w_bits, m.a_bits = w, a
    for s, b in sbns:
        s.bits = b
    if policy is None:
        object.__setattr__(model, _POLICY_ATTR, None)


@contextlib.contextmanager
def using(model: nn.Module, policy: Policy) -> Iterator[nn.Module]:
    """Apply `policy` inside the block; restore the exact previous state on exit."""
    snap = _snapshot(model)
    try:
        apply(model, policy)
        yield model
    finally:
        _restore(model, snap)


@contextlib.contextmanager
def switching(model: nn.Module, policies: Sequence[Policy]) -> Iterator[Callable[[Policy], None]]:
    """Switch `model` between a few non-random policies many times, cheaply (EOT and
    expectation attacks switch precision for every gradient sample).

    Each policy is applied once on entry and the precision it gives every quantized
    layer and switchable BN is recorded; `switch(p)`, for p one of the *same objects*,
    sets them back from the record: the state `apply(model, p)` gives, without walking
    the module tree (`using` walks it several times: milliseconds per call on a
    ResNet). Call `switch` before the first forward. Inside the block the model's own
    random policy (its forward hook) is off; on exit the exact previous state returns.
    """
    snap = _snapshot(model)
    try:
        records = {}
        for p in policies:
            if isinstance(p, RandomPrecision):
                raise RqlabError(f"switching takes non-random policies, got {p}: use Fixed(b) for each b of it")
            apply(model, p)
            records[id(p)] = ([(m, m.w_bits, m.a_bits) for _, m in quant_layers(model)],
                              [(s, s.bits) for s in _sbns(model)])

        def switch(p: Policy) -> None:
            layers, sbns = records[id(p)]
            for m, w, a in layers:
                m.w_bits, m.a_bits = w, a
            for s, b in sbns:
                s.bits = b

        yield switch
    finally:
        _restore(model, snap)


_RANGE = re.compile(r"^(\d+)-(\d+)$")
_WA = re.compile(r"^w(\d+|fp)a(\d+|fp)$")


def parse_policy(text: str, seed: int = 0) -> Policy:
    """Read a policy from its command-line spelling.

    "fp" or "32" -> Fixed(32); "4" -> Fixed(4); "w32a4" -> Fixed(32, act_bits=4);
    "4-8" -> RandomPrecision((4, ..., 8)); "4,6,8" -> RandomPrecision((4, 6, 8)).
    """
    s = str(text).strip().lower()

    def num(t: str) -> int:
        return FP_BITS if t == "fp" else int(t)

    try:
        if s == "fp" or s.isdigit():
            return Fixed(num(s))
        if m := _WA.match(s):
            return Fixed(num(m.group(1)), act_bits=num(m.group(2)))
        if m := _RANGE.match(s):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo >= hi:
                raise RqlabError("a range is written LOW-HIGH with LOW < HIGH")
            return RandomPrecision(tuple(range(lo, hi + 1)), seed=seed)
        if "," in s:
            return RandomPrecision(tuple(num(t) for t in s.split(",")), seed=seed)
    except RqlabError as e:
        raise RqlabError(f"bits={text!r} is not a valid precision policy: {e}") from None
    except ValueError:
        pass
    raise RqlabError(
        f"bits={text!r} is not a precision: use fp, a bit-width (1..16, 32), w<bits>a<bits>, "
        "a range such as 4-8, or a list such as 4,6,8")
