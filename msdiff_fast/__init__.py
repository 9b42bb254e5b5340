"""msdiff_fast: conditional score-based diffusion with fast exponential-integrator samplers."""

from . import ops, sde
from .ops import backends
from .samplers import MRSampler, euler_maruyama, pc_sample, posterior_sample, probability_flow_euler, sample

__version__ = "0.1.0"

__all__ = ["MRSampler", "backends", "euler_maruyama", "ops", "pc_sample", "posterior_sample", "probability_flow_euler", "sample", "sde"]
