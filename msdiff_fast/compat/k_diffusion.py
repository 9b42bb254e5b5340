"""k-diffusion denoisers ``D(x, sigma)`` (the denoised image, x = x0 + sigma * eps) as msdiff
models (``from_k_diffusion``) and msdiff models as k-diffusion denoisers (``to_k_diffusion``)."""

from typing import Callable, Mapping, Optional, Union

import torch

from ..samplers.parameterization import KINDS, check_kind, convert
from ..sde import LinearSDE, as_time, check_sde
from .calls import check_network_output, time_for


class _KDiffusionModel:
    def __init__(self, denoiser, sde: LinearSDE, cond_key: Optional[str], extra_args: Mapping):
        self.denoiser, self.sde, self.cond_key, self.extra_args = denoiser, sde, cond_key, dict(extra_args)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        t64 = as_time(t).to(x_t.device)
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        # k-diffusion's variable: x / alpha = x0 + (sigma / alpha) eps, with sigma_k = sigma / alpha = exp(-lam)
        alpha = self.sde.alpha(t64).expand(x_t.shape[0]).reshape(shape).to(x_t.dtype)
        sigma_k = (self.sde.sigma(t64) / self.sde.alpha(t64)).expand(x_t.shape[0]).to(x_t.dtype)
        kwargs = dict(self.extra_args)
        if self.cond_key is not None and c is not None:
            kwargs[self.cond_key] = c
        return check_network_output(self.denoiser(x_t / alpha, sigma_k, **kwargs), x_t, "denoiser")


def from_k_diffusion(denoiser: Callable, sde: LinearSDE, cond_key: Optional[str] = None, **extra_args) -> Callable:
    """A k-diffusion denoiser ``D(x, sigma, **extra_args)`` (returns the denoised image) as an msdiff
    model(x_t, t, c) with model_output="data".

    For a VESDE, D is called at sigma = sde.sigma(t) on x_t itself; for a VP-type SDE at
    sigma = sigma(t) / alpha(t) on x_t / alpha(t) (k-diffusion's scaling). ``cond_key``: the keyword
    under which the sampler's condition c is passed (e.g. "cond"); extra_args: fixed keywords.

    Example::

        sde = VESDE(sigma_min=0.002, sigma_max=80.0)
        model = from_k_diffusion(k_denoiser, sde)
        x0 = MRSampler(sde, 10, solver="ode", order=2, model_output="data").sample(model, shape=(4, 3, 64, 64))
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable D(x, sigma), got {type(denoiser).__name__}")
    check_sde(sde)
    if sde.mean_reverting:
        raise ValueError(f"sde: expected a VE or VP-type SDE (k-diffusion denoisers have no mean-reverting form), got {sde!r}")
    if cond_key is not None and not isinstance(cond_key, str):
        raise TypeError(f"cond_key: expected a keyword name (str) or None, got {type(cond_key).__name__}")
    return _KDiffusionModel(denoiser, sde, cond_key, extra_args)


class KDiffusionDenoiser:
    """An msdiff model as a k-diffusion denoiser: ``denoiser(x, sigma, cond=None) -> x0``.

    sigma ([B] or a scalar) is k-diffusion's noise level sigma / alpha = exp(-lam); it is mapped to
    t = sde.t_of_lam(-log sigma) and the model is called on alpha(t) * x. ``sigma_min`` /
    ``sigma_max`` are the levels at t = 0 and t = T (k-diffusion's ``get_sigmas_karras`` takes them);
    where the level at t = 0 is 0 (VP, sub-VP), sigma_min is the level at the SDE's ``t_end`` (or
    ``t_lambda_floor``), where its own samplers stop: a grid ending at sigma 0 would ask for t = 0,
    whose log-SNR is infinite.
    """

    def __init__(self, model: Callable, sde: LinearSDE, model_output: str, cond: Optional[torch.Tensor]):
        self.model, self.sde, self.model_output, self.cond = model, sde, model_output, cond
        self.sigma_min = next(
            level for level in (float(sde.sigma(t) / sde.alpha(t)) for t in (0.0, sde.t_end, sde.t_lambda_floor)) if level > 0
        )
        self.sigma_max = float(sde.sigma(sde.T) / sde.alpha(sde.T))

    def __repr__(self):
        return f"KDiffusionDenoiser(sde={self.sde!r}, model_output={self.model_output!r}, sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"

    def __call__(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise TypeError(
                f"x: expected a floating-point tensor [B, ...], got {type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}"
            )
        sigma64 = as_time(sigma, "sigma").to(x.device).reshape(-1)
        if sigma64.numel() == 1:
            sigma64 = sigma64.expand(x.shape[0])
        if sigma64.shape != (x.shape[0],):
            raise ValueError(
                f"sigma: expected a scalar or a [{x.shape[0]}] tensor (one level per sample), got shape {tuple(torch.as_tensor(sigma).shape)}"
            )
        low, high = self.sigma_min * (1 - 1e-6), self.sigma_max * (1 + 1e-6)
        if not bool(torch.isfinite(sigma64).all()) or bool((sigma64 < low).any()) or bool((sigma64 > high).any()):
            raise ValueError(
                f"sigma: expected noise levels in [sigma_min, sigma_max] = [{self.sigma_min:.6g}, {self.sigma_max:.6g}] of "
                f"{self.sde!r}, got {sigma64.min().item():.6g} .. {sigma64.max().item():.6g}"
            )
        t = self.sde.t_of_lam(-torch.log(sigma64)).clamp(0, self.sde.T)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_t = x * self.sde.alpha(t).reshape(shape).to(x.dtype)
        condition = cond if cond is not None else self.cond
        output = check_network_output(self.model(x_t, time_for(x, t), condition), x, "model")
        if self.model_output == "data":
            return output
        return convert(output, self.model_output, "data", self.sde, x_t, t, None)


def to_k_diffusion(
    model: Callable, sde: LinearSDE, model_output: str = "data", cond: Optional[torch.Tensor] = None
) -> KDiffusionDenoiser:
    """An msdiff VE (or VP-type) model(x_t, t, c) as a k-diffusion denoiser D(x, sigma, cond=None).

    model_output: what the model returns ("noise", "data", "velocity", "score"); the denoiser
    always returns the data prediction. cond: the condition passed as c (a ``cond=`` keyword,
    k-diffusion's ``extra_args={"cond": ...}``, overrides it).

    Example::

        import k_diffusion as K
        denoiser = to_k_diffusion(unet_model, VESDE(0.01, 50.0), model_output="score")
        sigmas = K.sampling.get_sigmas_karras(20, denoiser.sigma_min, denoiser.sigma_max)
        x0 = K.sampling.sample_dpmpp_2m(denoiser, torch.randn(4, 3, 64, 64) * sigmas[0], sigmas)
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x_t, t, c), got {type(model).__name__}")
    check_sde(sde)
    if sde.mean_reverting:
        raise ValueError(f"sde: expected a VE or VP-type SDE (k-diffusion denoisers have no mean-reverting form), got {sde!r}")
    check_kind("model_output", model_output, KINDS)
    return KDiffusionDenoiser(model, sde, model_output, cond)


# The official code's names for what the network was trained to predict.
