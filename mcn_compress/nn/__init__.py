"""The MCN layer, its sign estimator and the M-Filter initialisation."""

from mcn_compress.nn.init import fit_binary_approximation, latent_from_fit
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.nn.sign import hard_sign, ste_sign

__all__ = [
    "MCConv2d",
    "fit_binary_approximation",
    "hard_sign",
    "latent_from_fit",
    "ste_sign",
]
