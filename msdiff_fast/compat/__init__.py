"""Drop-in adapters: existing networks and existing sampler code on top of msdiff_fast's samplers.

- ``IRSDESampler`` / ``irsde_model``: fast sampling for IR-SDE and DA-CLIP checkpoints
  (Algolzw/image-restoration-sde, Algolzw/daclip-uir). Their ConditionalUNet is called as
  ``net(x_t, mu, t, **context)``, forms its input cat(x_t - mu, mu) itself, predicts the noise
  eps and was trained on integer t in 1..T; the schedule is rebuilt exactly by
  ``MRSDE.from_irsde``.
- ``from_k_diffusion`` / ``to_k_diffusion``: k-diffusion denoisers ``D(x, sigma)`` (the denoised
  image, x = x0 + sigma * eps) as msdiff models and back.
- ``DropInMRSampler``: the constructor and ``sampling`` method of the official MR Sampler code's
  ``MRSampler`` class (grrrute/mr-sampler, utils/sampler.py), running on ``msdiff_fast.MRSampler``.
"""

from .irsde import IntegerTimeWarning, IRSDESampler, irsde_model
from .k_diffusion import KDiffusionDenoiser, from_k_diffusion, to_k_diffusion
from .official_mr_sampler import DropInMRSampler

__all__ = [
    "DropInMRSampler",
    "IRSDESampler",
    "IntegerTimeWarning",
    "KDiffusionDenoiser",
    "from_k_diffusion",
    "irsde_model",
    "to_k_diffusion",
]
