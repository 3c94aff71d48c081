"""Analyses: transferability across precisions, error amplification, Lipschitz
estimates (METHODS sections 2 and 3).

    >>> from rqlab.analysis import transfer_matrix, error_amplification, spectral_norm

Modules the studies (`rqlab.studies`, one per notebook) build on (imported by name, e.g.
`from rqlab.analysis import sweeps`):
    sweeps     accuracy against bits and eps, batched transfer matrices, amplification
               and Lipschitz tables of several models, DQ's beta trained live (rqlab.train)
    curves     training curves from training histories, epoch-time ratios
    adaptive   the paper's protocol against adaptive attacks for random precision
    readings   plain-text readings generated from measured numbers, with their noise
    paper      published numbers to compare with
"""
from .amplification import error_amplification
from ..models.lipschitz import local_lipschitz, network_bound, reshaped_bound, spectral_norm
from .transfer import transfer_matrix

__all__ = ["transfer_matrix", "error_amplification", "spectral_norm", "reshaped_bound", "network_bound",
           "local_lipschitz"]
