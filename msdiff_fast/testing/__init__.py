"""Exact models for testing samplers without training."""

from .exact import ExactModel, FiniteData, GaussianData, reference_ode_solution

__all__ = ["ExactModel", "FiniteData", "GaussianData", "reference_ode_solution"]
