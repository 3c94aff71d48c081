"""Analyses: transferability across precisions, error amplification, Lipschitz
estimates (METHODS sections 2 and 3).

    >>> from rqlab.analysis import transfer_matrix, error_amplification, spectral_norm
"""
from .amplification import error_amplification
from .lipschitz import local_lipschitz, network_bound, reshaped_bound, spectral_norm
from .transfer import transfer_matrix

__all__ = ["transfer_matrix", "error_amplification", "spectral_norm", "reshaped_bound", "network_bound",
           "local_lipschitz"]
