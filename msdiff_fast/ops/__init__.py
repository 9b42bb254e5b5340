"""Fused ops with a pure-PyTorch reference backend and compiled ones where built."""

from . import compiled, triton_kernels  # noqa: F401  (register their backends)
from .dispatch import BACKENDS, backends
from .mr_step import mr_step
from .noise_inject import noise_inject
from .noise_policy import stored_noise
from .philox import philox_normal
from .weighted_score_loss import weighted_score_loss

__all__ = ["BACKENDS", "backends", "mr_step", "noise_inject", "philox_normal", "stored_noise", "weighted_score_loss"]
