"""Published numbers to compare with (the figures marked "paper" in METHODS).

All are CIFAR-10 results of Double-Win Quant (Fu et al., ICML 2021), PreActResNet-18,
eps 8/255, as quoted in METHODS section 2; rqlab's zoo is Fashion-MNIST (eps 0.1), so
compare shapes and gaps, not levels.

    >>> t = DWQ_TRANSFER                   # rows attack bits, columns inference bits
    >>> t["matrix"][1][0]                  # attacked at 4 bits, inferred at 3: 54.3
"""
from __future__ import annotations

# METHODS prints the paper's table with rows = inference bits, columns = attack bits.
_INFER_BY_ATTACK = [
    [24.4, 54.3, 54.2, 53.8, 53.9, 54.1],
    [77.1, 46.9, 64.4, 64.8, 64.2, 64.3],
    [76.3, 62.6, 48.7, 58.6, 58.0, 57.9],
    [76.4, 62.2, 59.1, 50.0, 55.2, 54.8],
    [76.2, 62.4, 59.0, 55.7, 50.7, 53.4],
    [76.3, 62.3, 58.9, 55.8, 53.6, 51.1],
]
_BITS = [3, 4, 5, 6, 7, 8]

# In rqlab's orientation (transfer_matrix): rows = attack precision, columns = inference.
DWQ_TRANSFER = {
    "source": "Double-Win Quant (Fu et al., ICML 2021), CIFAR-10, PGD-7 training at 4 bits, PGD-20 eps 8/255",
    "row_labels": [str(b) for b in _BITS],   # attack bits
    "col_labels": [str(b) for b in _BITS],   # inference bits
    "matrix": [[_INFER_BY_ATTACK[j][i] / 100 for j in range(6)] for i in range(6)],
    "mean": 0.587,                             # mean of the 36 cells, as published
}

DWQ_ROBUST = {
    "source": "Double-Win Quant, CIFAR-10 PreActResNet-18, robust accuracy (%)",
    "pgd20": {"PGD-7 AT": 51.17, "PGD-7 AT + RPI": 57.09, "PGD-7 AT + RPI + RPT": 65.15},
    "autoattack": {"PGD-7 AT": 47.18, "PGD-7 AT + RPI + RPT": 54.56},
    "gbitops": {"PGD-7 AT": 569.9, "PGD-7 AT + RPI": 21.2, "PGD-7 AT + RPI + RPT": 63.5},
    "protocol": "not adaptive: one random precision per attack, PGD stops on misclassified examples",
}

__all__ = ["DWQ_TRANSFER", "DWQ_ROBUST"]
