"""Time grids for the samplers: steps + 1 points from t_start (T) down to t_end."""

import math
from typing import Optional, Sequence, Union

import torch

from ..sde import LinearSDE, as_time

KINDS = ("uniform_lambda", "uniform_t", "karras")
# The most steps any sampler takes. Reference samplers use up to 1000-2000 (predictor-corrector:
# 1000 steps, 2000 NFE); 10000 is five times that, and bounds a time grid (and the state built
# from it) to kilobytes: a typo such as --nfe 1000000000 is refused instead of allocating gigabytes.
MAX_STEPS = 10_000
# Explicit times may overshoot [0, T] by this much (relative to T), e.g. after a float32 round
# trip (1.0000000338 for T = 1); they are clamped into [0, T].
TIME_TOLERANCE = 1e-6


def check_steps(steps) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps: expected an int in 1..{MAX_STEPS}, got {steps!r}")
    return steps


def get_timesteps(
    sde: LinearSDE,
    steps: int,
    kind: Union[str, Sequence[float], torch.Tensor] = "uniform_lambda",
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    rho: float = 7.0,
) -> torch.Tensor:
    """A decreasing float64 tensor of steps + 1 times.

    "uniform_t": equal steps in t; "uniform_lambda": equal steps in the half log-SNR (MR Sampler's
    best); "karras": Karras et al.'s rho-spacing of sigma/alpha = exp(-lam); or an explicit list.
    When lam(t_end) is infinite (sigma(t_end) = 0), the log-SNR spacings place the first steps - 1
    steps down to ``sde.t_lambda_floor`` and the last step goes to t_end.
    """
    check_steps(steps)
    t_start = float(sde.T if t_start is None else t_start)
    t_end = float(sde.t_end if t_end is None else t_end)
    if not 0 <= t_end < t_start <= sde.T:
        raise ValueError(f"t_start, t_end: expected 0 <= t_end < t_start <= T = {sde.T}, got t_start={t_start}, t_end={t_end}")
    if not isinstance(kind, str):
        return _explicit(kind, steps, sde)
    if kind == "uniform_t":
        return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    if kind not in KINDS:
        raise ValueError(f"timesteps: expected one of {KINDS} or a list of times, got {kind!r}")
    if math.isinf(float(sde.lam(t_end))):
        if steps == 1:
            return torch.tensor([t_start, t_end], dtype=torch.float64)
        floor = max(sde.t_lambda_floor, t_end)
        return torch.cat([_log_snr_spaced(sde, steps - 1, kind, t_start, floor, rho), torch.tensor([t_end], dtype=torch.float64)])
    return _log_snr_spaced(sde, steps, kind, t_start, t_end, rho)


def _log_snr_spaced(sde: LinearSDE, steps: int, kind: str, t_start: float, t_end: float, rho: float) -> torch.Tensor:
    lam_start, lam_end = float(sde.lam(t_start)), float(sde.lam(t_end))
    if kind == "uniform_lambda":
        lams = torch.linspace(lam_start, lam_end, steps + 1, dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        s_max, s_min = math.exp(-lam_start) ** (1 / rho), math.exp(-lam_end) ** (1 / rho)
        lams = -rho * torch.log(s_max + ramp * (s_min - s_max))
    return _pin_ends(sde.t_of_lam(lams), t_start, t_end)


def _pin_ends(ts: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    """Exact end points (the inverse schedules are only accurate to rounding)."""
    ts = ts.clone()
    ts[0], ts[-1] = t_start, t_end
    return ts


def _explicit(times, steps: int, sde: LinearSDE) -> torch.Tensor:
    ts = as_time(torch.as_tensor(times, dtype=torch.float64), "timesteps").flatten()
    if ts.numel() != steps + 1:
        raise ValueError(f"timesteps: expected steps + 1 = {steps + 1} times, got {ts.numel()}")
    slack = TIME_TOLERANCE * float(sde.T)
    inside = bool(torch.isfinite(ts).all()) and ts.min() >= -slack and ts.max() <= sde.T + slack
    clamped = ts.clamp(0, float(sde.T))
    if not inside or (clamped[1:] >= clamped[:-1]).any():
        raise ValueError(
            f"timesteps: expected strictly decreasing finite times in [0, {sde.T}] (to a relative {TIME_TOLERANCE:g}), got {ts.tolist()}"
        )
    return clamped
