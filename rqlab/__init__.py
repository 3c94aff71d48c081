"""rqlab: adversarial robustness of quantized neural networks.

The library's front door (imported lazily, so `import rqlab` stays light):

    >>> spec = rqlab.RunSpec(policy="4", defense="pgd-at", train=rqlab.TrainConfig(epochs=4))
    >>> model, history = rqlab.train(spec, out="runs/q4-pgd7")   # one way to train
    >>> model = rqlab.load("fmnist-q4-pgd7-small")                      # one way to load: zoo name or path
    >>> record = rqlab.evaluate(model, test_set, threat)          # one way to evaluate
"""

__version__ = "0.1.0"

_EXPORTS = {"RunSpec": "experiment", "TrainConfig": "training", "train": "experiment", "load": "zoo",
            "evaluate": "evaluation"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"rqlab.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rqlab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
