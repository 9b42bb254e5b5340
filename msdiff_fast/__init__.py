"""msdiff_fast: conditional score-based diffusion with fast exponential-integrator samplers."""

import torch as _torch

# The oldest torch the compatibility matrix (docs/install.md) checks; older ones fail further in
# with less helpful errors (no torch.library.custom_op before 2.4, triton < 3.2 before 2.6).
_MIN_TORCH = (2, 6)
if tuple(int(part) for part in _torch.__version__.split("+")[0].split(".")[:2]) < _MIN_TORCH:
    raise ImportError(f"msdiff_fast needs torch >= {_MIN_TORCH[0]}.{_MIN_TORCH[1]}, found torch {_torch.__version__} (pip install 'torch>=2.6')")

from . import ops, sde  # noqa: E402
from .ops import backends  # noqa: E402
from .samplers import MRSampler, euler_maruyama, pc_sample, posterior_sample, probability_flow_euler, sample  # noqa: E402

__version__ = "0.1.0"

__all__ = ["MRSampler", "backends", "euler_maruyama", "ops", "pc_sample", "posterior_sample", "probability_flow_euler", "sample", "sde"]
