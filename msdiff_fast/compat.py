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

import math
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .samplers.mr_sampler import MRSampler
from .samplers.parameterization import KINDS, check_kind, convert
from .samplers.timesteps import get_timesteps
from .sde import DiscreteMRSDE, LinearSDE, MRSDE, as_time
from .training.data import save_grid

NETWORK_SIGNATURES = ("irsde", "concat", "msdiff")


class IntegerTimeWarning(UserWarning):
    """A network trained on integer time indices received a rounded off-grid time."""


def _time_for(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t as a [B] tensor on x's device in the dtype the samplers use for x."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = t.to(device=x.device, dtype=dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _check_network_output(output, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.shape != x.shape:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"{name}: expected an output of shape {tuple(x.shape)} (like x_t), got {got}")
    return output


class _IRSDEModel:
    """model(x_t, t, mu) for a network with an IR-SDE-style signature (see ``irsde_model``)."""

    def __init__(self, network, network_signature: str, integer_time: bool, network_kwargs: Mapping):
        self.network, self.signature = network, network_signature
        self.integer_time, self.network_kwargs = integer_time, dict(network_kwargs)
        self.warned = False

    def network_time(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _time_for(x, t)
        if not self.integer_time:
            return t
        index = t.round()
        if not self.warned and bool((index - t).abs().max() > 1e-6):
            self.warned = True
            warnings.warn(
                f"irsde_model: the network was trained on integer t, and the sampler asked for t = {float(t[0]):.4g}: "
                f"it is called at the nearest grid index {int(index[0])} (the solver still uses the exact schedule at t). "
                "Use a time grid on integers (e.g. timesteps='uniform_t' with steps dividing T) to avoid the rounding.",
                IntegerTimeWarning,
                stacklevel=4,
            )
        return index.long()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mu is None:
            raise ValueError("mu: expected the degraded image (IR-SDE networks are conditioned on it), got None")
        time = self.network_time(x_t, t)
        if self.signature == "irsde":
            output = self.network(x_t, mu, time, **self.network_kwargs)
        elif self.signature == "concat":
            output = self.network(torch.cat([x_t - mu, mu], dim=1), time, **self.network_kwargs)
        else:
            output = self.network(x_t, time, mu, **self.network_kwargs)
        return _check_network_output(output, x_t, "network")


def irsde_model(network: Callable, sde: LinearSDE, network_signature: str = "irsde", integer_time: bool = False, **network_kwargs) -> Callable:
    """An IR-SDE / DA-CLIP network as an msdiff model(x_t, t, mu), unchanged.

    network_signature: "irsde": ``network(x_t, mu, t, **network_kwargs)`` (IR-SDE's and DA-CLIP's
    ConditionalUNet, which builds cat(x_t - mu, mu) itself); "concat": ``network(cat(x_t - mu, mu),
    t, **network_kwargs)`` (a plain U-Net with that input, e.g. ``unet_preset(..., estimator="mr")``);
    "msdiff": ``network(x_t, t, mu, **network_kwargs)``. t is a [B] tensor in the SDE's units
    (grid indices 0..T for ``MRSDE.from_irsde``). integer_time=True (discrete schedules only) calls
    the network with the nearest integer index (a long tensor, as in IR-SDE training) and warns once
    when that rounds.
    network_kwargs (e.g. DA-CLIP's text_context=..., image_context=...) go to every call.

    Example::

        sde = MRSDE.from_irsde(50, T=100, schedule="cosine", eps=0.005)   # DA-CLIP's training schedule
        model = irsde_model(daclip_unet, sde, "irsde", text_context=degra, image_context=image)
        x0 = MRSampler(sde, 10, solver="sde", order=2, model_output="noise").sample(model, lq_image)
    """
    if not callable(network):
        raise TypeError(f"network: expected a callable (an nn.Module), got {type(network).__name__}")
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"sde: expected an SDE from msdiff_fast.sde, got {type(sde).__name__}")
    if network_signature not in NETWORK_SIGNATURES:
        raise ValueError(f"network_signature: expected one of {NETWORK_SIGNATURES}, got {network_signature!r}")
    if not isinstance(integer_time, bool):
        raise TypeError(f"integer_time: expected a bool, got {type(integer_time).__name__}")
    if integer_time and not isinstance(sde, DiscreteMRSDE):
        raise ValueError(f"integer_time: integer time indices exist on a discrete IR-SDE schedule (MRSDE.from_irsde), got sde {sde!r}")
    return _IRSDEModel(network, network_signature, integer_time, network_kwargs)


class IRSDESampler:
    """MR Sampler for an IR-SDE / DA-CLIP checkpoint: its schedule, its network, 5-20 evaluations.

    max_sigma, T, eps, schedule: the checkpoint's ``sde`` options (max_sigma >= 1 is on the 0-255
    scale); convention "irsde" is the schedule IR-SDE / DA-CLIP train with (thetabar_0 = 0), "mrs"
    the one the official MR Sampler code samples with (shifted by theta_0); interpolation between
    grid points "linear" (the MR Sampler code's) or "exact" (see DiscreteMRSDE). steps, solver, order,
    prediction, timesteps and ``options`` go to ``MRSampler``; model_output is what the network
    predicts ("noise" for IR-SDE / DA-CLIP). network_signature, integer_time: see ``irsde_model``.

    Example (DA-CLIP universal image restoration, batched)::

        sampler = IRSDESampler(max_sigma=50, T=100, eps=0.005, schedule="cosine", steps=10)
        restored = sampler.sample(unet, lq_batch, generator=torch.Generator("cuda").manual_seed(0),
                                  text_context=degra_context, image_context=image_context).clamp(0, 1)
    """

    def __init__(
        self,
        max_sigma: float,
        T: int = 100,
        eps: float = 0.005,
        schedule: str = "cosine",
        convention: str = "irsde",
        interpolation: str = "linear",
        steps: int = 10,
        solver: str = "sde",
        order: int = 2,
        prediction: str = "data",
        model_output: str = "noise",
        network_signature: str = "irsde",
        integer_time: bool = False,
        timesteps: Union[str, Sequence[float], torch.Tensor] = "uniform_lambda",
        **options,
    ):
        if network_signature not in NETWORK_SIGNATURES:
            raise ValueError(f"network_signature: expected one of {NETWORK_SIGNATURES}, got {network_signature!r}")
        if not isinstance(integer_time, bool):
            raise TypeError(f"integer_time: expected a bool, got {type(integer_time).__name__}")
        self.sde = MRSDE.from_irsde(max_sigma, T, schedule, eps, convention, interpolation)
        self.sampler = MRSampler(self.sde, steps, solver=solver, order=order, prediction=prediction, model_output=model_output, timesteps=timesteps, **options)
        self.network_signature, self.integer_time = network_signature, integer_time

    def __repr__(self):
        return f"IRSDESampler({self.sampler!r}, network_signature={self.network_signature!r}, integer_time={self.integer_time})"

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def model(self, network: Callable, **network_kwargs) -> Callable:
        """The network as an msdiff model(x_t, t, mu) on this sampler's schedule."""
        return irsde_model(network, self.sde, self.network_signature, self.integer_time, **network_kwargs)

    def sample(self, network: Callable, mu: torch.Tensor, x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None, callback=None, progress: bool = False, **network_kwargs) -> torch.Tensor:
        """Restore the degraded batch ``mu`` [B, C, H, W]; x_T defaults to mu + max_sigma * z."""
        with torch.no_grad():
            return self.sampler.sample(self.model(network, **network_kwargs), mu, x_T=x_T, generator=generator, callback=callback, progress=progress)


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
        return _check_network_output(self.denoiser(x_t / alpha, sigma_k, **kwargs), x_t, "denoiser")


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
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"sde: expected an SDE from msdiff_fast.sde, got {type(sde).__name__}")
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
        self.sigma_min = next(level for level in (float(sde.sigma(t) / sde.alpha(t)) for t in (0.0, sde.t_end, sde.t_lambda_floor)) if level > 0)
        self.sigma_max = float(sde.sigma(sde.T) / sde.alpha(sde.T))

    def __repr__(self):
        return f"KDiffusionDenoiser(sde={self.sde!r}, model_output={self.model_output!r}, sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"

    def __call__(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise TypeError(f"x: expected a floating-point tensor [B, ...], got {type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
        sigma64 = as_time(sigma, "sigma").to(x.device).reshape(-1)
        if sigma64.numel() == 1:
            sigma64 = sigma64.expand(x.shape[0])
        if sigma64.shape != (x.shape[0],):
            raise ValueError(f"sigma: expected a scalar or a [{x.shape[0]}] tensor (one level per sample), got shape {tuple(torch.as_tensor(sigma).shape)}")
        low, high = self.sigma_min * (1 - 1e-6), self.sigma_max * (1 + 1e-6)
        if not bool(torch.isfinite(sigma64).all()) or bool((sigma64 < low).any()) or bool((sigma64 > high).any()):
            raise ValueError(f"sigma: expected noise levels in [sigma_min, sigma_max] = [{self.sigma_min:.6g}, {self.sigma_max:.6g}] of {self.sde!r}, got {sigma64.min().item():.6g} .. {sigma64.max().item():.6g}")
        t = self.sde.t_of_lam(-torch.log(sigma64)).clamp(0, self.sde.T)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_t = x * self.sde.alpha(t).reshape(shape).to(x.dtype)
        condition = cond if cond is not None else self.cond
        output = _check_network_output(self.model(x_t, _time_for(x, t), condition), x, "model")
        if self.model_output == "data":
            return output
        return convert(output, self.model_output, "data", self.sde, x_t, t, None)


def to_k_diffusion(model: Callable, sde: LinearSDE, model_output: str = "data", cond: Optional[torch.Tensor] = None) -> KDiffusionDenoiser:
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
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"sde: expected an SDE from msdiff_fast.sde, got {type(sde).__name__}")
    if sde.mean_reverting:
        raise ValueError(f"sde: expected a VE or VP-type SDE (k-diffusion denoisers have no mean-reverting form), got {sde!r}")
    check_kind("model_output", model_output, KINDS)
    return KDiffusionDenoiser(model, sde, model_output, cond)


# The official code's names for what the network was trained to predict.
FIT_TARGETS = {"noise": "noise", "reverse_traj": "noise", "data": "data", "patch": "data", "velocity": "velocity"}
TIME_SCHEDULES = ("linspace", "leading", "trailing", "karras-n", "karras-t", "linear-lambda")


class _OfficialOrderSampler(MRSampler):
    """MRSampler with the official code's order rule: steps 1..order-1 ramp up; with fewer than 10
    steps step j < M runs at min(order, M - j); the final step M runs at full order."""

    def step_order(self, i: int) -> int:
        step = i + 1
        if step < self.order:
            order = step
        elif step < self.steps and self.steps < 10:
            order = min(self.order, self.steps - step)
        else:
            order = self.order
        if math.isinf(float(self.lams[i + 1])):
            order = 1
        return max(order, 1)


class DropInMRSampler:
    """Drop-in replacement for the official MR Sampler code's ``MRSampler`` (grrrute/mr-sampler,
    universal-image-restoration/utils/sampler.py), on ``msdiff_fast.MRSampler``.

    Same constructor arguments (sde, opt, num_sample_steps, solver_type, parameterization, order,
    fit_target, lambda_min, time_schedule, timestep_offset, rho, thresholding, threshold_ratio,
    threshold_max, denoise_last), same ``set_timesteps`` and ``sampling(cond, text_context,
    image_context, use_tqdm, position, savedir, noisy_state) -> (samples, qbuffer, states)``.
    ``sde``: any object with the network in ``.model`` (the official IRSDE after ``set_model``),
    called as ``model(x_t, mu, t, text_context=..., image_context=...)`` (the contexts only when
    given); the schedule comes from ``opt["sde"]`` (max_sigma, T, schedule, eps).

    convention (keyword only, not in the official class): "mrs" (default) is the schedule the
    official sampler uses, so results match it; "irsde" is the schedule IR-SDE / DA-CLIP
    checkpoints were trained with. Differences from the official class, all deliberate:
    schedules in float64 instead of float32; invalid arguments raise ValueError instead of
    asserting; a divergent step raises FloatingPointError instead of printing "nan detected"; the
    network receives t as a [B] tensor (not a Python float); with ``denoise_last`` and
    parameterization="noise" the data prediction is returned (the official code returns the noise
    prediction); ODE order 3 weights D2 by 2 phi3, the Taylor coefficient (the official code, like
    DPM-Solver's 3M step, uses phi3); the SDE data-prediction step weights mu by
    1 - (sigma_t / sigma_s) e^-h - alpha_t phi1 (the official code by 1 - (alpha_t / alpha_s) e^-2h
    - alpha_t phi1: the same number where lam = log(alpha / sigma), i.e. on integer t, and up to
    ~5e-4 apart per step between grid points, where the schedule interpolates lam separately);
    fit_target="velocity" is converted with c = sqrt(alpha^2 + (sigma / lam_inf)^2), which is 1 on
    the grid and which the official code takes as 1 everywhere; noise comes from msdiff's counter-based stream seeded from torch's default generator.

    Example (in the official test.py, only the import changes)::

        from msdiff_fast.compat import DropInMRSampler as MRSampler
        sampler = MRSampler(sde=sde, opt=opt, **opt["sampler"])
        output, _, _ = sampler.sampling(LQ, text_context=degra_context, image_context=image_context)
    """

    def __init__(
        self,
        sde,
        opt: Mapping,
        num_sample_steps: int,
        solver_type: str = "ode",
        parameterization: str = "data",
        order: int = 2,
        fit_target: str = "data",
        lambda_min: float = -float("inf"),
        time_schedule: str = "linspace",
        timestep_offset: int = 0,
        rho: float = 7.0,
        thresholding: bool = False,
        threshold_ratio: float = 0.995,
        threshold_max: float = 1.5,
        denoise_last: bool = False,
        *,
        convention: str = "mrs",
    ):
        network = getattr(sde, "model", None)
        if not callable(network):
            raise TypeError(f"sde: expected an object whose .model is the network (call sde.set_model(network)), got .model = {type(network).__name__}")
        if not isinstance(opt, Mapping) or not isinstance(opt.get("sde"), Mapping):
            raise ValueError(f"opt: expected the options mapping with an 'sde' section, got {type(opt).__name__}")
        missing = [key for key in ("max_sigma", "T", "schedule", "eps") if key not in opt["sde"]]
        if missing:
            raise ValueError(f"opt: expected opt['sde'] to hold max_sigma, T, schedule and eps, missing {missing}")
        if solver_type not in ("ode", "sde"):
            raise ValueError(f"solver_type: expected 'ode' or 'sde', got {solver_type!r}")
        if parameterization not in ("noise", "data"):
            raise ValueError(f"parameterization: expected 'noise' or 'data', got {parameterization!r}")
        allowed_orders = (1, 2, 3) if solver_type == "ode" else (1, 2)
        if order not in allowed_orders or isinstance(order, bool):
            raise ValueError(f"order: expected one of {allowed_orders} for solver_type {solver_type!r}, got {order!r}")
        if fit_target not in FIT_TARGETS:
            raise ValueError(f"fit_target: expected one of {tuple(FIT_TARGETS)}, got {fit_target!r}")
        if time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"time_schedule: expected one of {TIME_SCHEDULES}, got {time_schedule!r}")
        if not isinstance(lambda_min, (int, float)) or math.isnan(lambda_min):
            raise ValueError(f"lambda_min: expected a number (-inf for no clipping), got {lambda_min!r}")
        if not isinstance(rho, (int, float)) or not rho > 0:
            raise ValueError(f"rho: expected a positive number, got {rho!r}")
        if thresholding and not (0 < threshold_ratio <= 1 and threshold_max >= 1):
            raise ValueError(f"threshold_ratio, threshold_max: expected a quantile in (0, 1] and a maximum >= 1, got {threshold_ratio!r}, {threshold_max!r}")
        self.network = network
        self.schedule = MRSDE.from_irsde(opt["sde"]["max_sigma"], opt["sde"]["T"], opt["sde"]["schedule"], opt["sde"]["eps"], convention)
        self.solver_type, self.parameterization, self.order = solver_type, parameterization, order
        self.fit_target, self.lambda_min, self.time_schedule = fit_target, float(lambda_min), time_schedule
        self.timestep_offset, self.rho = timestep_offset, float(rho)
        self.thresholding, self.threshold_ratio, self.threshold_max = bool(thresholding), float(threshold_ratio), float(threshold_max)
        self.denoise_last = bool(denoise_last)
        self.set_timesteps(num_sample_steps)

    def __repr__(self):
        return f"DropInMRSampler({self.schedule!r}, steps={len(self.timesteps) - 1}, solver_type={self.solver_type!r}, order={self.order}, parameterization={self.parameterization!r}, fit_target={self.fit_target!r}, time_schedule={self.time_schedule!r})"

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The official time grids (Table 2 of arXiv 2305.08891 plus uniform log-SNR), in float64."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        sde, steps = self.schedule, num_inference_steps
        grid_t = torch.arange(sde.T + 1, dtype=torch.float64)
        grid_lam = sde.grid_lam
        below = int(torch.searchsorted(torch.flip(grid_lam, [0]).contiguous(), torch.tensor(self.lambda_min, dtype=torch.float64)))
        max_timestep = sde.T - below
        kind = self.time_schedule
        if kind == "linspace":
            times = torch.linspace(0, max_timestep, steps + 1, dtype=torch.float64).flip(0)
        elif kind == "leading":
            interval = max_timestep // (steps + 1)
            times = (torch.arange(steps + 1, dtype=torch.float64) * interval).flip(0) + self.timestep_offset
        elif kind == "trailing":
            times = torch.arange(max_timestep, 0, -sde.T / (steps + 1), dtype=torch.float64)
        elif kind == "karras-n":
            levels = (sde.grid_sigma / sde.grid_alpha).numpy()
            ramp = np.linspace(0, 1, steps + 1)
            first, last = levels.max() ** (1 / self.rho), levels.min() ** (1 / self.rho)
            karras = (first + ramp * (last - first)) ** self.rho
            times = torch.from_numpy(np.interp(karras, levels, grid_t.numpy()))
        elif kind == "karras-t":
            ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
            first, last = float(sde.T) ** (1 / self.rho), 1.0
            times = (first + ramp * (last - first)) ** self.rho
        elif math.isinf(float(grid_lam.max())):
            # the "irsde" convention's lam_0 = inf: space uniformly down to t = 1, then step to 0
            lam_low = max(float(grid_lam.min()), self.lambda_min)
            times = get_timesteps(sde, steps, "uniform_lambda", t_start=float(sde.t_of_lam(lam_low)), t_end=0.0)
        else:
            lam_low = max(float(grid_lam.min()), self.lambda_min)
            lams = np.linspace(lam_low, float(grid_lam.max()), steps + 1)
            times = torch.from_numpy(np.interp(lams, grid_lam.flip(0).numpy(), grid_t.flip(0).numpy()))
        times = times.to(torch.float64)
        if times.numel() < 2 or bool((times[1:] >= times[:-1]).any()) or float(times[-1]) < 0 or float(times[0]) > sde.T:
            raise ValueError(f"num_inference_steps: time_schedule {kind!r} with {steps} steps (offset {self.timestep_offset}) gives no strictly decreasing grid in [0, {sde.T}]: {times.tolist()}")
        inside_first_cell = (times > 0) & (times < 1)
        if math.isinf(float(grid_lam[0])) and bool(inside_first_cell.any()):
            raise ValueError(
                f"time_schedule: {kind!r} with {steps} steps puts times in (0, 1) ({times[inside_first_cell].tolist()}), where the "
                f"'irsde' convention's schedule has lam = inf (sigma_0 = 0); use convention='mrs' or a grid with no time between 0 and 1"
            )
        nfe = times.numel() - 1
        if nfe < self.order:
            raise ValueError(f"num_sample_steps: expected at least order = {self.order} steps (the official code repeats its last step otherwise), got {nfe}")
        self.timesteps = times.tolist()
        model_output = self.parameterization if self.thresholding else FIT_TARGETS[self.fit_target]
        self.sampler = _OfficialOrderSampler(
            self.schedule, nfe, solver=self.solver_type, order=self.order, prediction=self.parameterization,
            model_output=model_output, timesteps=times, denoise_last=self.denoise_last,
        )

    def _model(self, contexts: Mapping, record: Optional[list]) -> Callable:
        fit_kind = FIT_TARGETS[self.fit_target]

        def model(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
            output = _check_network_output(self.network(x_t, mu, t, **contexts), x_t, "sde.model")
            if self.thresholding:
                # the official code thresholds the converted model output (the solver's prediction)
                output = self._clip_output(convert(output, fit_kind, self.parameterization, self.schedule, x_t, t.double(), mu))
            if record is not None:
                prediction = output if self.thresholding else convert(output, fit_kind, self.parameterization, self.schedule, x_t, t.double(), mu)
                record.append(prediction.detach().cpu())
            return output

        return model

    def _clip_output(self, output: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding: clamp to the per-sample quantile s in [1, threshold_max], divide by s."""
        flat = output.reshape(output.shape[0], -1).float()
        s = torch.quantile(flat.abs(), self.threshold_ratio, dim=1).clamp(1, self.threshold_max)[:, None]
        return (flat.clamp(-s, s) / s).reshape(output.shape).to(output.dtype)

    def sampling(self, cond: torch.Tensor, text_context=None, image_context=None, use_tqdm: bool = False, position: int = 0, savedir: Optional[str] = None, noisy_state: Optional[torch.Tensor] = None):
        """Restore ``cond``; returns (samples clipped to [0, 1], qbuffer, states).

        qbuffer (the solver's predictions, one per network evaluation) and states (x_T and every
        step's result) are filled, on the CPU, when ``savedir`` is given; each state is then
        also written there as a PNG grid of the batch (prior_sample.png, step_<i>.png).
        """
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or cond.ndim != 4:
            raise ValueError(f"cond: expected the degraded images as a float tensor [B, C, H, W], got {type(cond).__name__ if not isinstance(cond, torch.Tensor) else (cond.dtype, tuple(cond.shape))}")
        if savedir is not None and cond.shape[1] not in (1, 3):
            raise ValueError(f"savedir: saving states needs 1- or 3-channel images, got cond with {cond.shape[1]} channels")
        contexts = {name: value for name, value in (("text_context", text_context), ("image_context", image_context)) if value is not None}
        qbuffer, states = ([], []) if savedir is not None else (None, None)
        bar = tqdm(desc="sampling", total=self.sampler.steps, position=position, leave=False) if use_tqdm else None
        x_T = noisy_state if noisy_state is not None else self.schedule.prior(cond)
        if savedir is not None:
            states.append(x_T.detach().cpu())
            self._save(savedir, "prior_sample.png", x_T)

        def after_step(info):
            if bar is not None:
                bar.update(1)
            if savedir is not None:
                states.append(info["x"].detach().cpu())
                self._save(savedir, f"step_{info['i'] + 1}.png", info["x"])

        watching = bar is not None or savedir is not None
        with torch.no_grad():
            x0 = self.sampler.sample(self._model(contexts, qbuffer), cond, x_T=x_T, callback=after_step if watching else None)
        if self.denoise_last and watching:
            after_step({"i": self.sampler.steps - 1, "x": x0})
        if bar is not None:
            bar.close()
        return torch.clip(x0, 0, 1.0), (qbuffer if qbuffer is not None else []), (states if states is not None else [])

    @staticmethod
    def _save(savedir: str, name: str, x: torch.Tensor) -> None:
        Path(savedir).mkdir(parents=True, exist_ok=True)
        save_grid(Path(savedir) / name, x.detach().float().cpu().clamp(0, 1))
