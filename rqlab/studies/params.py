"""Checks of the studies' parameters (notebooks and scripts), run before any work starts: a model given as a
zoo name or a checkpoint path, precision lists the model can run at, test subsets.

    >>> spec = check_model_spec("fmnist-q4-pgd7-small")        # cheap: reads no weights
    >>> model = rqlab.load(spec, device="cpu")             # or "runs/x/checkpoint.pt"
    >>> check_bits_supported(model, [2, 4, 8, 32], label=spec)
    >>> x, y = load_test_subset("fashion-mnist", 500, seed=0)   # float (N, C, H, W) in [0, 1], (N,)

Every check raises `RqlabError` naming the parameter, the value and what is allowed, so
a notebook given a bad parameter stops in its first code cell, not deep inside an attack.

Which precisions a model "supports": b = 32 (FP) and b = 1 (sign activations, no range)
always; b in 2..16 where every quantized layer has an activation range for b (trained,
or set by `quant.calibrate`; the zoo stores ranges for 2..8). A model with switchable
batch norm (RPT) runs only at the precisions of its branches.
"""
from __future__ import annotations

from pathlib import Path

from ..validate import ALLOWED_BITS, FP_BITS, RqlabError, check_bits_set, check_float, check_int

from ..zoo import is_checkpoint_path


def check_model_spec(spec, field: str = "model") -> str:
    """`spec` must be a trained zoo model's name or an existing checkpoint file or run
    directory (`zoo.check_spec`).

    Reads only the zoo card (JSON), never the weights: cheap enough for a first cell.
    """
    from .. import zoo

    if not isinstance(spec, str) or not spec.strip():
        raise RqlabError(f"{field}={spec!r} must be a zoo model name (e.g. fmnist-q4-pgd7-small; see `rqlab zoo list`) "
                         "or the path of a checkpoint file")
    try:
        zoo.check_spec(spec.strip(), field)
    except RqlabError as e:
        raise RqlabError(str(e) if str(e).startswith(f"{field}=") else f"{field}: {e}") from None
    return spec.strip()


def model_label(spec: str) -> str:
    """A short name for plots: the zoo name, or the checkpoint's folder for DIR/checkpoint.pt."""
    if not is_checkpoint_path(spec):
        return spec
    p = Path(spec)
    return p.parent.name if p.stem == "checkpoint" and p.parent.name else p.stem


def check_model_specs(specs, field: str = "model") -> dict[str, str]:
    """One spec, a list of specs or a {label: spec} mapping -> {label: spec}, each checked."""
    if isinstance(specs, str):
        spec = check_model_spec(specs, field)
        return {model_label(spec): spec}
    if isinstance(specs, dict):
        if not specs:
            raise RqlabError(f"{field} is empty: give at least one model")
        return {str(k): check_model_spec(v, f"{field}[{k!r}]") for k, v in specs.items()}
    if not isinstance(specs, (list, tuple)) or not specs:
        raise RqlabError(f"{field}={specs!r} must be a zoo model name, a checkpoint path, or a non-empty list of them")
    out = {}
    for i, s in enumerate(specs):
        s = check_model_spec(s, f"{field}[{i}]")
        label = model_label(s)
        if label in out:
            raise RqlabError(f"{field} names {label!r} twice: give each model once")
        out[label] = s
    return out


def training_policy(spec: str):
    """The precision policy `spec` was trained at (zoo card or checkpoint), as a Policy."""
    from .. import checkpoint, quant, zoo

    checked = zoo.check_spec(check_model_spec(spec))
    if isinstance(checked, Path):  # a checkpoint file (a run directory's checkpoint.pt)
        return quant.policy_from_dict(checkpoint.load(checked).get("policy"))
    return quant.policy_from_dict(zoo.card(checked)["recipe"]["policy"])


def supported_bits(model) -> tuple[int, ...]:
    """Bit-widths b at which Fixed(b) (and Fixed(32, act_bits=b)) runs on `model` (module docstring)."""
    from .. import quant
    from ..quant.layers import SwitchableBatchNorm2d

    allowed = set(ALLOWED_BITS)
    for sbn in (m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)):
        allowed &= set(sbn.bits_set)
    ranged = set(range(2, 17))
    for _, layer in quant.quant_layers(model):
        ranged &= set(layer.act.calibrated_bits())
    return tuple(sorted(b for b in allowed if b in (1, FP_BITS) or b in ranged))


def check_bits_supported(model, bits, field: str = "bits", label: str = "the model") -> tuple[int, ...]:
    """`bits` (valid, no repeats) must all be supported by `model`; returns them sorted."""
    from ..quant.layers import SwitchableBatchNorm2d

    bits = check_bits_set(bits, field)
    ok = supported_bits(model)
    missing = [b for b in bits if b not in ok]
    if missing:
        sbn = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
        why = (f"it has switchable batch norm for {list(sbn[0].bits_set)} only" if sbn else
               "it has no activation ranges for them (call rqlab.quant.calibrate(model, batches, bits=...))")
        raise RqlabError(f"{field}={list(bits)}: {label} cannot run at {missing}: {why}; "
                         f"it runs at {list(ok)}" + (" (32 = FP)" if FP_BITS in ok else ""))
    return bits


def check_bits_list(bits, field: str = "bits", lo: int = 1, hi: int = FP_BITS) -> tuple[int, ...]:
    """A non-empty, duplicate-free list of bit-widths within [lo, hi] (and 1..16 or 32)."""
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = [bits]
    if not isinstance(bits, (list, tuple)):
        raise RqlabError(f"{field}={bits!r} must be a list of bit-widths, e.g. [2, 4, 8, 32]")
    out = check_bits_set(bits, field)
    bad = [b for b in out if not lo <= b <= hi]
    if bad:
        raise RqlabError(f"{field}={list(bits)} has {bad} outside {lo}..{hi}" + (" (32 = FP)" if hi == FP_BITS else ""))
    return out


def check_floats(values, field: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, allow_empty: bool = False) -> list[float]:
    """A list of finite numbers in range (a single number is read as a one-element list)."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise RqlabError(f"{field}={values!r} must be a list of numbers")
    if not values and not allow_empty:
        raise RqlabError(f"{field} is empty: give at least one number")
    return [check_float(v, f"{field}[{i}]", lo, hi, lo_open) for i, v in enumerate(values)]


def check_choices(values, field: str, allowed) -> list[str]:
    """A non-empty, duplicate-free list of strings out of `allowed`."""
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise RqlabError(f"{field}={values!r} must be a non-empty list out of {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise RqlabError(f"{field}: {v!r} is unknown: choose from {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise RqlabError(f"{field}={list(values)} repeats an entry: give each once")
    return list(values)


def check_dataset(name: str):
    """The dataset's info (shape, classes, sizes); RqlabError for an unknown name."""
    from .. import data

    return data.dataset_info(name)


def check_n_examples(n, dataset: str, split: str = "test", field: str = "n_examples") -> int:
    """An example count in 1..size of the split."""
    info = check_dataset(dataset)
    return check_int(n, field, 1, info.sizes[split])


def check_model_fits(model, dataset: str, label: str = "the model") -> None:
    """The model's input shape and class count must match the dataset's."""
    info = check_dataset(dataset)
    shape, classes = tuple(getattr(model, "input_shape", ())), getattr(model, "num_classes", None)
    if shape != tuple(info.input_shape) or classes != info.num_classes:
        raise RqlabError(f"{label} takes {shape} images with {classes} classes, but dataset={dataset!r} has "
                         f"{tuple(info.input_shape)} images with {info.num_classes} classes: pick a model trained "
                         "on that dataset")


def load_test_subset(dataset: str, n: int, seed: int = 0, device="cpu"):
    """The first `n` examples of the seeded test subset (`data.load(..., n, seed)`):
    x float (n, C, H, W) in [0, 1] and y int64 (n,), on `device`."""
    from .. import data

    ds = data.load(dataset, "test", n=check_n_examples(n, dataset), seed=seed)
    return ds.x.float().div(255).to(device), ds.y.to(device)


__all__ = ["is_checkpoint_path", "check_model_spec", "check_model_specs", "model_label",
           "training_policy", "supported_bits", "check_bits_supported", "check_bits_list", "check_floats",
           "check_choices", "check_dataset", "check_n_examples", "check_model_fits", "load_test_subset"]
