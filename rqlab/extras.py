"""Optional dependencies: `pip install rqlab` gives the library (torch, torchvision,
numpy, tqdm); the extras bring the rest, and a missing one is named when it is needed.

    extra        what it adds                                   for
    notebooks    jupyterlab, ipywidgets, matplotlib, seaborn    notebooks, explorers, plots
    report       papermill, nbconvert, nbformat, pyyaml         `rqlab report`
    autoattack   pyautoattack (AutoAttack's reference code)     attack "autoattack"
    deploy       onnx, onnxruntime                              rqlab.deploy (int8 engine), `rqlab deploy`
    test         pytest, hypothesis, import-linter, ...          the test suite

    >>> papermill = require("papermill", "report")   # the module, or an ImportError naming the extra
"""
from __future__ import annotations

import importlib

# the pip distribution behind an import name, where they differ
_DISTRIBUTIONS = {"yaml": "pyyaml", "jupyter_client": "jupyter-client"}


def require(module: str, extra: str):
    """Import `module` (e.g. "papermill", "matplotlib.pyplot"); if it is missing, raise an
    ImportError that says which rqlab extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name != top and not module.startswith(e.name):
            raise  # the module exists but one of its own imports failed: show that error
        dist = _DISTRIBUTIONS.get(top, top)
        raise ImportError(f"{module} is needed here but is not installed: pip install 'rqlab[{extra}]' "
                          f"(or pip install {dist}; the pinned environment is requirements.txt)") from e


__all__ = ["require"]
