"""Samplers: MR Sampler (fast) and the reference baselines, all on the fused mr_step op."""

from .baselines import conditioned_model, euler_maruyama, pc_sample, posterior_sample, probability_flow_euler
from .mr_sampler import MRSampler, UnstableSolverWarning, sample
from .parameterization import convert, prediction_coefficients
from .static import StaticMRSampler
from .timesteps import get_timesteps

__all__ = [
    "MRSampler",
    "StaticMRSampler",
    "conditioned_model",
    "euler_maruyama",
    "pc_sample",
    "posterior_sample",
    "probability_flow_euler",
    "UnstableSolverWarning",
    "convert",
    "get_timesteps",
    "prediction_coefficients",
    "sample",
]
