"""Linear SDEs in one form: x_t | x_0, mu ~ N(alpha_t x_0 + (1 - alpha_t) mu, sigma_t^2 I).

VE, VP and sub-VP have mu = 0; the mean-reverting SDE (IR-SDE, DA-CLIP) reverts to the degraded
image mu. Every SDE is defined by log alpha(t) and sigma(t) (and their time derivatives); the
drift f(t)(x - mu) and the diffusion g(t) follow from them:

    f = d log(alpha)/dt,     g^2 = d(sigma^2)/dt - 2 f sigma^2,

so the samplers need nothing SDE-specific. Schedules are evaluated in float64: t may be a float or
a tensor of any shape and every method returns a float64 tensor of t's shape (on t's device).
The half log-SNR is lam = log(alpha) - log(sigma), decreasing in t; ``t_of_lam`` inverts it.
"""

import abc
import math
from typing import Optional, Sequence, Union

import torch

from .checks import check_positive, per_sample

Time = Union[float, int, torch.Tensor]


def as_time(t: Time, name: str = "t") -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: expected a real tensor, got dtype {t.dtype}")
        return t.to(torch.float64)
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.tensor(float(t), dtype=torch.float64)
    raise TypeError(f"{name}: expected a float or a tensor, got {type(t).__name__}")


def _bisect_decreasing(fn, target: torch.Tensor, lo: float, hi: float, iterations: int = 100) -> torch.Tensor:
    """t in [lo, hi] with fn(t) = target for a decreasing fn, elementwise (float64)."""
    low = torch.full_like(target, lo)
    high = torch.full_like(target, hi)
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        above = fn(mid) > target
        low = torch.where(above, mid, low)
        high = torch.where(above, high, mid)
    return 0.5 * (low + high)


class LinearSDE(abc.ABC):
    """Base class. Subclasses define log_alpha, sigma, their derivatives and the prior."""

    T: float = 1.0
    mean_reverting: bool = False
    # Default end of sampling, and the smallest t used for log-SNR spacing when lam(t_end) = inf.
    t_end: float = 1e-3
    t_lambda_floor: float = 1e-3

    @abc.abstractmethod
    def log_alpha(self, t: Time) -> torch.Tensor:
        """Schedule function of the subclass."""

    @abc.abstractmethod
    def sigma(self, t: Time) -> torch.Tensor:
        """Schedule function of the subclass."""

    @abc.abstractmethod
    def dlog_alpha_dt(self, t: Time) -> torch.Tensor:
        """Schedule function of the subclass."""

    @abc.abstractmethod
    def dsigma2_dt(self, t: Time) -> torch.Tensor:
        """Schedule function of the subclass."""

    @property
    def prior_std(self) -> float:
        return float(self.sigma(self.T))

    # velocity v = (L alpha eps - (sigma / L)(x0 - mu)) / sqrt(alpha^2 + (sigma / L)^2), L = velocity_scale
    velocity_scale: float = 1.0

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def lam(self, t: Time) -> torch.Tensor:
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def t_of_lam(self, lam: Time) -> torch.Tensor:
        lam = as_time(lam, "lam")
        return _bisect_decreasing(self.lam, lam, 0.0, self.T)

    def f(self, t: Time) -> torch.Tensor:
        return self.dlog_alpha_dt(t)

    def g2(self, t: Time) -> torch.Tensor:
        return self.dsigma2_dt(t) - 2 * self.f(t) * self.sigma(t) ** 2

    def diffusion(self, t: Time) -> torch.Tensor:
        return torch.sqrt(self.g2(t).clamp_min(0))

    def drift(self, x: torch.Tensor, t: Time, mu: Optional[torch.Tensor] = None) -> torch.Tensor:
        f = _per_sample(self.f(t), x)
        return f * (x if mu is None else x - mu)

    def marginal(self, x0: torch.Tensor, t: Time, mu: Optional[torch.Tensor] = None):
        """(mean, std) of x_t given x_0 (and mu); std has shape [B, 1, ...] or t's shape."""
        alpha = _per_sample(self.alpha(t), x0)
        mean = alpha * x0 if mu is None else alpha * x0 + (1 - alpha) * mu
        return mean, _per_sample(self.sigma(t), x0)

    def prior(self, shape_or_mu: Union[Sequence[int], torch.Tensor], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A draw of x_T: N(mu, prior_std^2) (mu = 0 for VE/VP/sub-VP, or when a shape is given)."""
        if isinstance(shape_or_mu, torch.Tensor):
            mu = shape_or_mu if self.mean_reverting else torch.zeros_like(shape_or_mu)
            return mu + self.prior_std * randn_like(shape_or_mu, generator)
        return self.prior_std * randn_like(torch.empty(tuple(shape_or_mu)), generator)

    def check_mu(self, mu: Optional[torch.Tensor]) -> None:
        if self.mean_reverting and mu is None:
            raise ValueError(f"mu: expected the degraded image (the mean {type(self).__name__} reverts to), got None")


def check_sde(sde, name: str = "sde") -> None:
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"{name}: expected an SDE from msdiff_fast.sde, got {type(sde).__name__}")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or [B] schedule value against a [B, ...] tensor."""
    values = values.to(device=like.device)
    if values.ndim == 1 and like.ndim >= 1 and values.shape[0] == like.shape[0]:
        values = per_sample(values, like.ndim)
    return values.to(like.dtype)


def randn_like(like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normals shaped like ``like``, drawn on the generator's device and moved."""
    device = generator.device if generator is not None else like.device
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.randn(like.shape, generator=generator, device=device, dtype=dtype).to(like.device)


class VESDE(LinearSDE):
    """Variance exploding: alpha = 1, sigma = sigma_min (sigma_max / sigma_min)^t (geometric, the
    reference code's) or sigma_min (1 + t (sigma_max / sigma_min - 1)) (linear)."""

    t_end = 1e-5
    t_lambda_floor = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, schedule: str = "geometric"):
        self.sigma_min = check_positive(sigma_min, "sigma_min")
        self.sigma_max = check_positive(sigma_max, "sigma_max")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max: expected > sigma_min = {sigma_min}, got {sigma_max}")
        if schedule not in ("geometric", "linear"):
            raise ValueError(f"schedule: expected 'geometric' or 'linear', got {schedule!r}")
        self.schedule = schedule
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, schedule={self.schedule!r})"

    def log_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def dlog_alpha_dt(self, t):
        return torch.zeros_like(as_time(t))

    def sigma(self, t):
        t = as_time(t)
        if self.schedule == "geometric":
            return self.sigma_min * torch.exp(t * self.log_ratio)
        return self.sigma_min * (1 + t * (self.sigma_max / self.sigma_min - 1))

    def dsigma2_dt(self, t):
        sigma = self.sigma(t)
        if self.schedule == "geometric":
            return 2 * sigma**2 * self.log_ratio
        return 2 * sigma * (self.sigma_max - self.sigma_min)

    def t_of_lam(self, lam):
        sigma = torch.exp(-as_time(lam, "lam"))
        if self.schedule == "geometric":
            return torch.log(sigma / self.sigma_min) / self.log_ratio
        return (sigma / self.sigma_min - 1) / (self.sigma_max / self.sigma_min - 1)


class VPSDE(LinearSDE):
    """Variance preserving: beta(t) = beta_min + t (beta_max - beta_min), sigma^2 = 1 - alpha^2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = check_positive(beta_min, "beta_min")
        self.beta_max = check_positive(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max: expected >= beta_min = {beta_min}, got {beta_max}")

    def __repr__(self):
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"

    @property
    def prior_std(self) -> float:
        return 1.0

    def log_alpha(self, t):
        t = as_time(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def dlog_alpha_dt(self, t):
        return -0.5 * (self.beta_min + as_time(t) * (self.beta_max - self.beta_min))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def dsigma2_dt(self, t):
        return -2 * self.dlog_alpha_dt(t) * torch.exp(2 * self.log_alpha(t))

    def _t_of_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        slope = self.beta_max - self.beta_min
        if slope == 0:
            return -2 * log_alpha / self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 - 4 * slope * log_alpha)) / slope

    def t_of_lam(self, lam):
        # alpha^2 = 1 / (1 + exp(-2 lam))
        return self._t_of_log_alpha(-0.5 * torch.nn.functional.softplus(-2 * as_time(lam, "lam")))


class SubVPSDE(VPSDE):
    """sub-VP (Song et al.): the VP mean with sigma = 1 - alpha^2."""

    def sigma(self, t):
        return -torch.expm1(2 * self.log_alpha(t))

    def dsigma2_dt(self, t):
        sigma = self.sigma(t)
        return 2 * sigma * (-2 * self.dlog_alpha_dt(t) * torch.exp(2 * self.log_alpha(t)))

    def t_of_lam(self, lam):
        # alpha / (1 - alpha^2) = e^lam  =>  alpha = 2 e^lam / (1 + sqrt(1 + 4 e^(2 lam)))
        lam = as_time(lam, "lam")
        log_alpha = math.log(2.0) + lam - torch.log1p(torch.sqrt(1 + 4 * torch.exp(2 * lam)))
        return self._t_of_log_alpha(log_alpha)


class _MeanRevertingSDE(LinearSDE):
    """dx = theta_t (mu - x) dt + g_t dw with g_t^2 = 2 lam_inf^2 theta_t, given by theta and its
    integral thetabar: alpha = exp(-thetabar), sigma = lam_inf sqrt(1 - alpha^2). Subclasses set
    lam_inf and define theta, thetabar and its inverse t_of_thetabar."""

    mean_reverting = True
    lam_inf: float

    @abc.abstractmethod
    def theta(self, t: Time) -> torch.Tensor:
        """Schedule function of the subclass."""

    @abc.abstractmethod
    def thetabar(self, t: Time) -> torch.Tensor:
        """Schedule function of the subclass: the integral of theta from 0 to t."""

    @abc.abstractmethod
    def t_of_thetabar(self, thetabar: torch.Tensor) -> torch.Tensor:
        """Schedule function of the subclass."""

    @property
    def prior_std(self) -> float:
        return self.lam_inf

    def log_alpha(self, t):
        return -self.thetabar(t)

    def dlog_alpha_dt(self, t):
        return -self.theta(t)

    def sigma(self, t):
        return self.lam_inf * torch.sqrt(-torch.expm1(-2 * self.thetabar(t)))

    def dsigma2_dt(self, t):
        return 2 * self.lam_inf**2 * self.theta(t) * self.alpha(t) ** 2

    def g2(self, t):
        return 2 * self.lam_inf**2 * self.theta(t)

    def lam(self, t):
        return -math.log(self.lam_inf) - 0.5 * torch.log(torch.expm1(2 * self.thetabar(t)))

    def t_of_lam(self, lam):
        lam = as_time(lam, "lam")
        return self.t_of_thetabar(0.5 * torch.log1p(torch.exp(-2 * lam) / self.lam_inf**2))


class MRSDE(_MeanRevertingSDE):
    """Mean-reverting SDE dx = theta_t (mu - x) dt + g_t dw with g_t^2 = 2 lam_inf^2 theta_t.

    alpha = exp(-thetabar), sigma = lam_inf sqrt(1 - alpha^2). Continuous schedules on [0, T]:
    "constant", "linear" (theta_max / theta_min = 200, as IR-SDE's linear betas) and "cosine" (the
    continuous form of IR-SDE's cosine thetas), each scaled so that alpha(T) = alpha_T.
    ``MRSDE.from_irsde`` gives the exact discrete IR-SDE / DA-CLIP schedules instead.
    """

    COSINE_OFFSET = 0.008

    def __init__(self, lam_inf: float, schedule: str = "cosine", alpha_T: float = 0.005, T: float = 1.0):
        self.lam_inf = check_positive(lam_inf, "lam_inf")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule: expected 'cosine', 'linear' or 'constant', got {schedule!r}")
        if not 0 < alpha_T < 1:
            raise ValueError(f"alpha_T: expected a number in (0, 1), got {alpha_T!r}")
        self.schedule = schedule
        self.alpha_T = float(alpha_T)
        self.T = check_positive(T, "T")
        self.t_end = 1e-3 * self.T
        self.t_lambda_floor = 1e-3 * self.T
        self.velocity_scale = self.lam_inf
        self._cos_k = math.pi / (2 * (1 + self.COSINE_OFFSET))
        self._cos_b = self.COSINE_OFFSET * self._cos_k
        self._scale = 1.0
        self._scale = -math.log(self.alpha_T) / float(self.thetabar(self.T))

    def __repr__(self):
        return f"MRSDE(lam_inf={self.lam_inf}, schedule={self.schedule!r}, alpha_T={self.alpha_T}, T={self.T})"

    def theta(self, t: Time) -> torch.Tensor:
        u = as_time(t) / self.T
        if self.schedule == "constant":
            shape = torch.ones_like(u)
        elif self.schedule == "linear":
            shape = 1 + 199 * u
        else:
            shape = 1 - torch.cos(self._cos_k * u + self._cos_b) ** 2 / math.cos(self._cos_b) ** 2
        return self._scale * shape / self.T

    def thetabar(self, t: Time) -> torch.Tensor:
        u = as_time(t) / self.T
        if self.schedule == "constant":
            integral = u
        elif self.schedule == "linear":
            integral = u + 99.5 * u**2
        else:
            k, b = self._cos_k, self._cos_b
            cos_sq_integral = u / 2 + (torch.sin(2 * (k * u + b)) - math.sin(2 * b)) / (4 * k)
            integral = u - cos_sq_integral / math.cos(b) ** 2
        return self._scale * integral

    def t_of_thetabar(self, thetabar: torch.Tensor) -> torch.Tensor:
        u_of = {
            "constant": lambda tb: tb / self._scale,
            "linear": lambda tb: (-1 + torch.sqrt(1 + 4 * 99.5 * tb / self._scale)) / (2 * 99.5),
        }.get(self.schedule)
        if u_of is not None:
            return u_of(thetabar) * self.T
        return _bisect_decreasing(lambda t: -self.thetabar(t), -thetabar, 0.0, self.T)

    @staticmethod
    def from_irsde(
        max_sigma: float,
        T: int = 100,
        schedule: str = "cosine",
        eps: float = 0.005,
        convention: str = "irsde",
        interpolation: str = "linear",
    ) -> "DiscreteMRSDE":
        """The exact schedule of an IR-SDE / DA-CLIP checkpoint (time in grid units 0..T).

        max_sigma >= 1 is read on the 0-255 scale (50 means 50/255), as IR-SDE does. convention
        "irsde" is the training code's (thetabar_0 = 0: alpha_0 = 1, sigma_0 = 0), "mrs" the
        official MR Sampler code's (thetabar includes theta_0, so lam_0 is finite). interpolation
        between grid points: "linear" (alpha, sigma and lam each, as the MR Sampler code) or
        "exact" (the SDE with theta constant on each cell solved exactly), see DiscreteMRSDE.
        """
        schedules = {"linear": LinearlyInterpolatedMRSDE, "exact": DiscreteMRSDE}
        if interpolation not in schedules:
            raise ValueError(f"interpolation: expected 'linear' (the MR Sampler code's) or 'exact', got {interpolation!r}")
        return schedules[interpolation](max_sigma, T, schedule, eps, convention)


class DiscreteMRSDE(_MeanRevertingSDE):
    """IR-SDE's discrete mean-reverting schedule on the grid 0..T, solved exactly for float t.

    theta is constant on each cell (i - 1, i], where thetabar grows by theta_i dt, so thetabar is
    linear between grid points and alpha, sigma and lam follow from it at every t. Built by
    ``MRSDE.from_irsde(..., interpolation="exact")``; the default there is
    ``LinearlyInterpolatedMRSDE``, the MR Sampler code's variant, equal on the grid points.
    """

    t_end = 0.0
    t_lambda_floor = 1.0
    interpolation = "exact"

    def __init__(self, max_sigma: float, T: int = 100, schedule: str = "cosine", eps: float = 0.005, convention: str = "irsde"):
        max_sigma = check_positive(max_sigma, "max_sigma")
        self.lam_inf = max_sigma / 255.0 if max_sigma >= 1 else max_sigma
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T: expected an int >= 1 (number of grid steps), got {T!r}")
        if not 0 < eps < 1:
            raise ValueError(f"eps: expected a number in (0, 1) (alpha at t = T), got {eps!r}")
        if convention not in ("irsde", "mrs"):
            raise ValueError(f"convention: expected 'irsde' or 'mrs', got {convention!r}")
        self.T, self.schedule, self.eps, self.convention = T, schedule, float(eps), convention
        self.velocity_scale = self.lam_inf
        self.thetas = irsde_thetas(T, schedule)
        cumulative = torch.cumsum(self.thetas, 0)
        if convention == "irsde":
            cumulative = cumulative - self.thetas[0]
        self.dt = -math.log(self.eps) / float(cumulative[-1])
        self.grid_thetabar = cumulative * self.dt

    def __repr__(self):
        exact = ", interpolation='exact'" if self.interpolation == "exact" else ""
        return f"MRSDE.from_irsde(max_sigma={self.lam_inf * 255:g}, T={self.T}, schedule={self.schedule!r}, eps={self.eps}, convention={self.convention!r}{exact})"

    def _interpolate(self, grid: torch.Tensor, t: Time) -> torch.Tensor:
        t = as_time(t)
        grid = grid.to(t.device)
        position = t.clamp(0, self.T)
        left = position.floor().clamp(max=self.T - 1).long()
        weight = position - left
        at_left, at_right = grid[left], grid[left + 1]
        # lam_0 may be +inf: the convex form keeps it inf inside the first cell, and weights 0 and 1
        # must not touch the other end (0 * inf)
        inside = (1 - weight) * at_left + weight * at_right
        return torch.where(weight == 0, at_left, torch.where(weight == 1, at_right, inside))

    def theta(self, t: Time) -> torch.Tensor:
        t = as_time(t)
        cell = t.clamp(0, self.T).ceil().clamp(min=1).long()
        return self.thetas.to(t.device)[cell] * self.dt

    def thetabar(self, t: Time) -> torch.Tensor:
        return self._interpolate(self.grid_thetabar, t)

    def t_of_thetabar(self, thetabar: torch.Tensor) -> torch.Tensor:
        """Inverse of the piecewise-linear thetabar(t), clamped to [0, T]."""
        grid = self.grid_thetabar.to(thetabar.device)
        right = torch.searchsorted(grid, thetabar.contiguous()).clamp(1, self.T)
        left = right - 1
        weight = ((thetabar - grid[left]) / (grid[right] - grid[left])).clamp(0, 1)
        return left.to(torch.float64) + weight


class LinearlyInterpolatedMRSDE(DiscreteMRSDE):
    """The discrete IR-SDE schedule as the MR Sampler code reads it between grid points: alpha,
    sigma and lam each linear in t. Equal to DiscreteMRSDE on the grid points; between them lam
    is not log(alpha / sigma) and alpha is not the solution of the drift, so the ODE solvers
    converge to slightly different limits there (benchmarks/results/sampler_accuracy.md)."""

    interpolation = "linear"

    def __init__(self, max_sigma: float, T: int = 100, schedule: str = "cosine", eps: float = 0.005, convention: str = "irsde"):
        super().__init__(max_sigma, T, schedule, eps, convention)
        self.grid_alpha = torch.exp(-self.grid_thetabar)
        self.grid_sigma = self.lam_inf * torch.sqrt(-torch.expm1(-2 * self.grid_thetabar))
        self.grid_lam = torch.log(self.grid_alpha) - torch.log(self.grid_sigma)

    def alpha(self, t):
        return self._interpolate(self.grid_alpha, t)

    def log_alpha(self, t):
        return torch.log(self.alpha(t))

    def sigma(self, t):
        return self._interpolate(self.grid_sigma, t)

    def lam(self, t):
        return self._interpolate(self.grid_lam, t)

    def t_of_lam(self, lam):
        lam = as_time(lam, "lam")
        grid = self.grid_lam.to(lam.device)
        # grid_lam decreases; search on its negation, which increases
        right = torch.searchsorted(-grid, -lam.contiguous()).clamp(1, self.T)
        left = right - 1
        lo, hi = grid[left], grid[right]
        weight = torch.where(torch.isinf(lo), torch.ones_like(lam), (lo - lam) / (lo - hi))
        t = left.to(torch.float64) + weight.clamp(0, 1)
        # lam = +inf only at t = 0 (the "irsde" convention's sigma_0 = 0)
        return torch.where(torch.isposinf(lam), torch.zeros_like(t), t)


def irsde_thetas(T: int, schedule: str) -> torch.Tensor:
    """IR-SDE's T + 1 theta values (float64)."""
    if schedule == "cosine":
        steps = T + 2
        i = torch.arange(steps + 1, dtype=torch.float64)
        abar = torch.cos(((i / steps) + 0.008) / 1.008 * math.pi / 2) ** 2
        abar = abar / abar[0]
        return 1 - abar[1 : T + 2]
    if schedule == "linear":
        scale = 1000 / (T + 1)
        return torch.linspace(1e-4 * scale, 0.02 * scale, T + 1, dtype=torch.float64)
    if schedule == "constant":
        return torch.ones(T + 1, dtype=torch.float64)
    raise ValueError(f"schedule: expected 'cosine', 'linear' or 'constant', got {schedule!r}")


class MultiSpeedSDE:
    """A pair of SDEs sharing one t: x diffuses with ``x_sde``, the condition y with ``y_sde``
    (CMDE: the same family with a smaller sigma_max for y). The scalar schedule methods are x's."""

    def __init__(self, x_sde: LinearSDE, y_sde: LinearSDE):
        for name, sde in (("x_sde", x_sde), ("y_sde", y_sde)):
            check_sde(sde, name)
        if x_sde.T != y_sde.T:
            raise ValueError(f"y_sde: expected the same horizon T = {x_sde.T} as x_sde, got {y_sde.T}")
        self.x, self.y = x_sde, y_sde
        self.T = x_sde.T

    def __repr__(self):
        return f"MultiSpeedSDE(x={self.x!r}, y={self.y!r})"

    def __getattr__(self, name):
        if name in (
            "alpha",
            "sigma",
            "lam",
            "t_of_lam",
            "f",
            "g2",
            "diffusion",
            "drift",
            "prior",
            "prior_std",
            "t_end",
            "t_lambda_floor",
        ):
            return getattr(self.x, name)
        raise AttributeError(name)

    def marginal(self, x0: torch.Tensor, t: Time, mu: Optional[torch.Tensor] = None, y0: Optional[torch.Tensor] = None):
        """((mean_x, std_x), (mean_y, std_y)) with y's pair None when y0 is None."""
        return self.x.marginal(x0, t, mu), (None if y0 is None else self.y.marginal(y0, t))
