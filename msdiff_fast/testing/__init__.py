"""Exact models for testing samplers and estimators without training."""

from .exact import ExactModel, FiniteData, GaussianData, GaussianMixture, reference_ode_solution
from .gaussian_conditional import GaussianInverseProblem, gaussian_kl, gaussian_w2

__all__ = [
    "ExactModel",
    "FiniteData",
    "GaussianData",
    "GaussianInverseProblem",
    "GaussianMixture",
    "gaussian_kl",
    "gaussian_w2",
    "reference_ode_solution",
]
