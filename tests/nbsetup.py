"""What the notebook tests share: tests/test_notebooks.py runs the notebooks through
papermill, tests/test_browser.py in JupyterLab in a real browser. Both run them with the
smoke settings of reports/default.yaml and, where a zoo model is not built yet, with tiny
stand-ins trained here on 384 images (cached under .pytest_cache). The fixtures `kernel`,
`smoke` and `tiny` (tests/conftest.py) wrap these functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CONFIG = ROOT / "reports" / "default.yaml"
STEMS = ["01_precision_transferability", "02_lipschitz_error_amplification", "03_bit_selection",
         "04_odgq_training_curves", "05_double_win_quant", "06_deployed_int8"]
TINY = "notebook-tiny-v2"  # change to retrain the cached stand-ins

# The model parameters of each notebook and the stand-in that replaces a zoo model not built yet.
MODEL_ROLES = {
    "01_precision_transferability": {"model": "fp"},
    "02_lipschitz_error_amplification": {"model": "dq", "fp_model": "fp", "vanilla_model": "a4"},
    "03_bit_selection": {"model": "fp"},
    "05_double_win_quant": {"model": "rpt", "fp_model": "fp", "rpi_model": "fp"},
}


def check_kernel() -> None:
    """Skip the test when there is no usable python3 kernel (rqlab.report's check)."""
    from rqlab import report
    from rqlab.validate import RqlabError

    try:
        report.check_kernel()
    except RqlabError as e:
        pytest.skip(f"no usable python3 kernel: {e}")


def smoke_params() -> dict:
    """{stem: parameters of its first run} in the smoke profile of reports/default.yaml."""
    from rqlab import report

    runs = report.plan(report.load_config(CONFIG), "smoke")
    out = {}
    for r in runs:
        out.setdefault(r.notebook, dict(r.params))
    return out


def train_tiny(path: Path, role: str) -> Path:
    """A SmallCNN trained 2 epochs on 384 Fashion-MNIST images, activation ranges for 2..8
    (or its switchable-BN set), saved as an rqlab checkpoint."""
    import torch

    from rqlab import checkpoint, data, defenses, models, quant
    from rqlab.training import TrainConfig, fit, seed_everything
    from rqlab.validate import RqlabError

    sbn = (4, 5, 6, 7, 8) if role == "rpt" else None
    policy = {"fp": quant.Fixed(32), "a4": quant.Fixed(32, act_bits=4), "dq": quant.Fixed(32, act_bits=4),
              "rpt": quant.RandomPrecision(sbn or (4,))}[role]
    defense = {"fp": "natural", "a4": "natural", "dq": "dq", "rpt": "rpt"}[role]
    try:
        ds = data.load("fashion-mnist", "train", n=384, seed=0)
    except RqlabError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_everything(0)
        model = models.create("smallcnn", input_shape=ds.input_shape, mean=ds.mean, std=ds.std, sbn_bits=sbn)
        quant.apply(model, policy)
        hooks = defenses.build(defense, bits=sbn, **({"beta": 3e-3} if "beta" in defenses.get(defense).params else {}))
        fit(model, data.Loader(ds, 128, shuffle=True), TrainConfig(epochs=2, device="cpu"), hooks=hooks,
            progress=False, log=None)
        model.eval()
        x = ds.x.float().div(255)
        have = set.intersection(*(set(m.act.calibrated_bits()) for _, m in quant.quant_layers(model)))
        missing = sorted(set(sbn or range(2, 9)) - have)
        if missing:
            quant.calibrate(model, [x[:192], x[192:]], missing)
        quant.apply(model, policy)
    finally:
        torch.set_num_threads(threads)
    checkpoint.save(path, {"model": model.config.to_dict(), "state_dict": model.state_dict(),
                           "policy": policy.to_dict(), "hooks": {"name": hooks.name, "config": hooks.config()}})
    return path


def tiny_models(folder: Path):
    """get(role) -> the path of the stand-in checkpoint for `role`, trained on first use."""
    cache = {}

    def get(role: str) -> str:
        if role not in cache:
            path = folder / f"{TINY}-{role}.pt"
            cache[role] = str(path if path.is_file() else train_tiny(path, role))
        return cache[role]

    return get


def defaults(stem: str) -> dict:
    """The literal defaults of a notebook's parameters cell."""
    from rqlab import report

    src = report.notebook_parameters(NOTEBOOKS, stem)
    return {k: ast.literal_eval(v) for k, v in src.items()}


def with_models(stem: str, params: dict, tiny) -> tuple[dict, dict]:
    """params with every model parameter that names a zoo model not built yet replaced by a
    stand-in (tiny: the `tiny` fixture); returns (params, {name: what is used})."""
    from rqlab import zoo

    built = set(zoo.names(trained_only=True))
    base = defaults(stem)
    params, used = dict(params), {}
    for name, role in MODEL_ROLES.get(stem, {}).items():
        spec = params.get(name, base[name])
        params[name] = spec if spec in built else tiny(role)
        used[name] = params[name]
    return params, used
