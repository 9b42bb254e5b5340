"""``DropInMRSampler``: the constructor and ``sampling`` method of the official MR Sampler code's
``MRSampler`` class (grrrute/mr-sampler, utils/sampler.py), running on ``msdiff_fast.MRSampler``."""

import math
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..samplers.mr_sampler import MRSampler
from ..samplers.parameterization import convert
from ..samplers.timesteps import get_timesteps
from ..sde import MRSDE
from ..training.data import save_grid
from .calls import check_network_output

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
            raise TypeError(
                f"sde: expected an object whose .model is the network (call sde.set_model(network)), got .model = {type(network).__name__}"
            )
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
            raise ValueError(
                f"threshold_ratio, threshold_max: expected a quantile in (0, 1] and a maximum >= 1, got {threshold_ratio!r}, {threshold_max!r}"
            )
        self.network = network
        self.schedule = MRSDE.from_irsde(
            opt["sde"]["max_sigma"], opt["sde"]["T"], opt["sde"]["schedule"], opt["sde"]["eps"], convention
        )
        self.solver_type, self.parameterization, self.order = solver_type, parameterization, order
        self.fit_target, self.lambda_min, self.time_schedule = fit_target, float(lambda_min), time_schedule
        self.timestep_offset, self.rho = timestep_offset, float(rho)
        self.thresholding, self.threshold_ratio, self.threshold_max = (
            bool(thresholding),
            float(threshold_ratio),
            float(threshold_max),
        )
        self.denoise_last = bool(denoise_last)
        self.set_timesteps(num_sample_steps)

    def __repr__(self):
        return (
            f"DropInMRSampler({self.schedule!r}, steps={len(self.timesteps) - 1}, solver_type={self.solver_type!r}, "
            f"order={self.order}, parameterization={self.parameterization!r}, fit_target={self.fit_target!r}, "
            f"time_schedule={self.time_schedule!r})"
        )

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The official time grids (Table 2 of arXiv 2305.08891 plus uniform log-SNR), in float64."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        sde, steps = self.schedule, num_inference_steps
        grid_t = torch.arange(sde.T + 1, dtype=torch.float64)
        grid_lam = sde.grid_lam
        below = int(
            torch.searchsorted(torch.flip(grid_lam, [0]).contiguous(), torch.tensor(self.lambda_min, dtype=torch.float64))
        )
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
            raise ValueError(
                f"num_inference_steps: time_schedule {kind!r} with {steps} steps (offset {self.timestep_offset}) gives no "
                f"strictly decreasing grid in [0, {sde.T}]: {times.tolist()}"
            )
        inside_first_cell = (times > 0) & (times < 1)
        if math.isinf(float(grid_lam[0])) and bool(inside_first_cell.any()):
            raise ValueError(
                f"time_schedule: {kind!r} with {steps} steps puts times in (0, 1) ({times[inside_first_cell].tolist()}), where the "
                f"'irsde' convention's schedule has lam = inf (sigma_0 = 0); use convention='mrs' or a grid with no time between 0 and 1"
            )
        nfe = times.numel() - 1
        if nfe < self.order:
            raise ValueError(
                f"num_sample_steps: expected at least order = {self.order} steps (the official code repeats its last step otherwise), got {nfe}"
            )
        self.timesteps = times.tolist()
        model_output = self.parameterization if self.thresholding else FIT_TARGETS[self.fit_target]
        self.sampler = _OfficialOrderSampler(
            self.schedule,
            nfe,
            solver=self.solver_type,
            order=self.order,
            prediction=self.parameterization,
            model_output=model_output,
            timesteps=times,
            denoise_last=self.denoise_last,
        )

    def _model(self, contexts: Mapping, record: Optional[list]) -> Callable:
        fit_kind = FIT_TARGETS[self.fit_target]

        def model(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
            output = check_network_output(self.network(x_t, mu, t, **contexts), x_t, "sde.model")
            if self.thresholding:
                # the official code thresholds the converted model output (the solver's prediction)
                output = self._clip_output(convert(output, fit_kind, self.parameterization, self.schedule, x_t, t.double(), mu))
            if record is not None:
                prediction = (
                    output
                    if self.thresholding
                    else convert(output, fit_kind, self.parameterization, self.schedule, x_t, t.double(), mu)
                )
                record.append(prediction.detach().cpu())
            return output

        return model

    def _clip_output(self, output: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding: clamp to the per-sample quantile s in [1, threshold_max], divide by s."""
        flat = output.reshape(output.shape[0], -1).float()
        s = torch.quantile(flat.abs(), self.threshold_ratio, dim=1).clamp(1, self.threshold_max)[:, None]
        return (flat.clamp(-s, s) / s).reshape(output.shape).to(output.dtype)

    def sampling(
        self,
        cond: torch.Tensor,
        text_context=None,
        image_context=None,
        use_tqdm: bool = False,
        position: int = 0,
        savedir: Optional[str] = None,
        noisy_state: Optional[torch.Tensor] = None,
    ):
        """Restore ``cond``; returns (samples clipped to [0, 1], qbuffer, states).

        qbuffer (the solver's predictions, one per network evaluation) and states (x_T and every
        step's result) are filled, on the CPU, when ``savedir`` is given; each state is then
        also written there as a PNG grid of the batch (prior_sample.png, step_<i>.png).
        """
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or cond.ndim != 4:
            raise ValueError(
                "cond: expected the degraded images as a float tensor [B, C, H, W], got "
                f"{type(cond).__name__ if not isinstance(cond, torch.Tensor) else (cond.dtype, tuple(cond.shape))}"
            )
        if savedir is not None and cond.shape[1] not in (1, 3):
            raise ValueError(f"savedir: saving states needs 1- or 3-channel images, got cond with {cond.shape[1]} channels")
        contexts = {
            name: value for name, value in (("text_context", text_context), ("image_context", image_context)) if value is not None
        }
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
