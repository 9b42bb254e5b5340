"""Conditional score estimators (CDE, CDiffE, CMDE, VS-CMDE) and mean-reverting diffusion losses.

Every estimator turns a clean pair (x0, y0) into one training loss in two fused passes:
``ops.noise_inject`` writes the network input cat(x_t, y_t) straight into one buffer, and
``ops.weighted_score_loss`` regenerates the same noise from (seed, offset) to form the weighted
loss and its gradient, so the noise is never stored, except where ``ops.stored_noise`` finds
reading it back faster (the CPU): then it is drawn once and both ops read it, the same values
bit for bit. The math is ../shared/reference/cmde.md
sections 1-2 and mr_sampler.md sections 1-2.

Score parameterisation s = NN / sigma per component, so the network predicts -z for x (and y);
with the maximum-likelihood weighting Lambda = diag(g_x^2, g_y^2) and the 1 / (D_x + D_y)
normalisation the per-sample loss is

    w_x ||NN_x + z_x||^2 + w_y ||NN_y + z_y||^2,   w = g(t)^2 / sigma(t)^2 / (D_x + D_y),

a constant 2 ln(sigma_max / sigma_min) / (D_x + D_y) for a geometric VE SDE. With ``sigma_data``
the x part is preconditioned as in EDM (Karras et al. 2022) instead; see ``_ConditionalEstimator``.
CDE has no y term
and normalises by D_x (see ``CDE``). Randomness: from ``generator`` each ``loss`` call draws, in
this order, u = torch.rand(global_batch, dtype=float64) (t = t_eps + (T - t_eps) u, one t per
sample shared by x and y) and the Philox seed int(torch.randint(0, 2**62, (1,))). Sample b's
noise sits at stream positions (offset_samples + b) * D_noise + j, D_noise the noise elements per
sample (the network input's D_x + D_y when y diffuses; D_x when it does not), so ranks of a
data-parallel job that share the generator state and pass offset_samples = rank * local_batch,
global_batch = world * local_batch reproduce exactly the noise and t's of one process.
"""

from typing import Sequence

from .base import Estimator
from .conditional import CDE, CMDE, VSCMDE, CDiffE, CleanConditionSDE, CMDEOptions, VEOptions, VSCMDEOptions, vs_sigma_y_max
from .mean_reverting import MeanReverting, MROptions

__all__ = [
    "CDE",
    "CDiffE",
    "CMDE",
    "CMDEOptions",
    "ESTIMATORS",
    "CleanConditionSDE",
    "Estimator",
    "MROptions",
    "MeanReverting",
    "VEOptions",
    "VSCMDE",
    "VSCMDEOptions",
    "make_estimator",
    "vs_sigma_y_max",
]


ESTIMATORS = {"cde": CDE, "cdiffe": CDiffE, "cmde": CMDE, "vscmde": VSCMDE, "mr": MeanReverting}


def make_estimator(name: str, x_shape: Sequence[int], y_shape: Sequence[int], **overrides) -> Estimator:
    """``ESTIMATORS[name].for_images(x_shape, y_shape, **overrides)``; names as in ``unet_preset``."""
    if name not in ESTIMATORS:
        raise ValueError(f"name: expected one of {sorted(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name].for_images(x_shape, y_shape, **overrides)
