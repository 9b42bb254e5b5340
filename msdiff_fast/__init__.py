"""msdiff_fast: conditional score-based diffusion with fast exponential-integrator samplers.

``import msdiff_fast`` loads the kernels (``ops``), the SDEs and the samplers; the other
subpackages load on first use (``msdiff_fast.models.unet_preset(...)`` works without importing
``msdiff_fast.models`` first), so the import stays quick.
"""

import importlib as _importlib

import torch as _torch

# The oldest torch the compatibility matrix (docs/install.md) checks; older ones fail further in
# with less helpful errors (no torch.library.custom_op before 2.4, triton < 3.2 before 2.6).
_MIN_TORCH = (2, 6)
if tuple(int(part) for part in _torch.__version__.split("+")[0].split(".")[:2]) < _MIN_TORCH:
    raise ImportError(
        f"msdiff_fast needs torch >= {_MIN_TORCH[0]}.{_MIN_TORCH[1]}, found torch {_torch.__version__} (pip install 'torch>=2.6')"
    )

from . import ops, sde  # noqa: E402
from .ops import backends  # noqa: E402
from .samplers import MRSampler, euler_maruyama, pc_sample, posterior_sample, probability_flow_euler, sample  # noqa: E402

__version__ = "0.1.0"

# loaded by ``__getattr__`` when first named
_LAZY_SUBMODULES = (
    "compat",
    "demo",
    "distributed",
    "errors",
    "estimators",
    "inception",
    "metrics",
    "models",
    "outputs",
    "reports",
    "restoration",
    "testing",
    "tiling",
    "training",
)

__all__ = [
    "MRSampler",
    "backends",
    "euler_maruyama",
    "ops",
    "pc_sample",
    "posterior_sample",
    "probability_flow_euler",
    "sample",
    "sde",
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
