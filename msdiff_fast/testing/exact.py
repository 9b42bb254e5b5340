"""Data distributions whose score is known exactly under any linear SDE.

With the exact denoiser E[x0 | x_t, mu] in place of a network, a sampler's error is pure
discretisation error: it can be measured against exact flows (Gaussian data) or a converged
reference solution (any data), with no training. Both data models are independent of mu; mu only
enters through the SDE (x_t | x0 ~ N(alpha x0 + (1 - alpha) mu, sigma^2)).
"""

import abc
from typing import Optional, Sequence

import torch

from ..checks import per_sample
from ..samplers.parameterization import check_kind, convert
from ..sde import LinearSDE, as_time


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.to(device=like.device, dtype=torch.float64)
    return per_sample(values, like.ndim) if values.ndim == 1 else values


class ExactModel(abc.ABC):
    """Base: ``denoiser(sde, kind)`` is a model(x_t, t, mu) returning ``kind`` exactly."""

    @abc.abstractmethod
    def data_prediction(self, sde: LinearSDE, x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor]) -> torch.Tensor:
        """E[x0 | x_t, mu] in float64."""

    def denoiser(self, sde: LinearSDE, kind: str = "data"):
        check_kind("kind", kind)

        def model(x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor] = None) -> torch.Tensor:
            t = as_time(t).to(x_t.device)
            x_t64 = x_t.double()
            mu64 = None if mu is None else mu.double()
            x0 = self.data_prediction(sde, x_t64, t, mu64)
            return convert(x0, "data", kind, sde, x_t64, t, mu64).to(x_t.dtype)

        return model


class GaussianData(ExactModel):
    """x0 ~ N(mean, std^2) independently per element (mean: a float or a tensor like one sample)."""

    def __init__(self, mean=0.0, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"std: expected > 0, got {std!r}")
        self.mean, self.std = mean, float(std)

    def _mean_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.mean, dtype=torch.float64, device=x.device)

    def data_prediction(self, sde, x_t, t, mu):
        alpha, sigma = _per_sample(sde.alpha(t), x_t), _per_sample(sde.sigma(t), x_t)
        centred = x_t if mu is None else x_t - (1 - alpha) * mu
        mean = self._mean_like(x_t)
        gain = alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2)
        return mean + gain * (centred - alpha * mean)

    def flow(
        self, sde: LinearSDE, x: torch.Tensor, t_from: float, t_to: float, mu: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The exact probability-flow ODE map from t_from to t_to.

        The flow keeps each point's standardised position (x_t - m_t) / s_t in the Gaussian
        marginal N(m_t, s_t^2), m_t = alpha mean + (1 - alpha) mu, s_t^2 = alpha^2 std^2 + sigma^2.
        """
        x64 = x.double()
        mu64 = None if mu is None else mu.double()

        def moments(t):
            alpha, sigma = float(sde.alpha(t)), float(sde.sigma(t))
            mean = alpha * self._mean_like(x64) + (0 if mu64 is None else (1 - alpha) * mu64)
            return mean, (alpha**2 * self.std**2 + sigma**2) ** 0.5

        m_from, s_from = moments(t_from)
        m_to, s_to = moments(t_to)
        return (m_to + s_to * (x64 - m_from) / s_from).to(x.dtype)

    def sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.mean + self.std * torch.randn(tuple(shape), generator=generator, dtype=torch.float64)


class FiniteData(ExactModel):
    """x0 uniform (or ``weights``) over the K rows of ``points`` [K, *sample_shape]."""

    def __init__(self, points: torch.Tensor, weights: Optional[torch.Tensor] = None):
        if not isinstance(points, torch.Tensor) or points.ndim < 2:
            raise ValueError(
                f"points: expected a tensor [K, *sample_shape], got {getattr(points, 'shape', type(points).__name__)}"
            )
        self.points = points.double()
        k = points.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights.double()
        if (
            weights.shape != (k,)
            or (weights < 0).any()
            or not torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
        ):
            raise ValueError(f"weights: expected {k} non-negative numbers summing to 1, got {weights.tolist()}")
        self.weights = weights

    def posterior_weights(self, sde: LinearSDE, x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor]) -> torch.Tensor:
        """p(x0 = point k | x_t) as [B, K]."""
        batch = x_t.shape[0]
        alpha = _per_sample(sde.alpha(t), x_t).expand(batch, *([1] * (x_t.ndim - 1)))
        sigma = _per_sample(sde.sigma(t), x_t).expand(batch, *([1] * (x_t.ndim - 1)))
        centred = (x_t if mu is None else x_t - (1 - alpha) * mu).reshape(batch, 1, -1)
        points = self.points.to(x_t.device).reshape(1, self.points.shape[0], -1)
        squared = ((centred - alpha.reshape(batch, 1, 1) * points) ** 2).sum(-1) / sigma.reshape(batch, 1) ** 2
        logits = torch.log(self.weights.to(x_t.device))[None] - 0.5 * squared
        return torch.softmax(logits, dim=1)

    def data_prediction(self, sde, x_t, t, mu):
        weights = self.posterior_weights(sde, x_t, t, mu)
        points = self.points.to(x_t.device).reshape(self.points.shape[0], -1)
        return (weights @ points).reshape(x_t.shape)

    def sample(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        index = torch.multinomial(self.weights, batch, replacement=True, generator=generator)
        return self.points[index]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest point for each sample of x [B, *sample_shape]."""
        points = self.points.to(x.device).reshape(self.points.shape[0], -1)
        return torch.cdist(x.double().reshape(x.shape[0], -1), points).argmin(dim=1)


class GaussianMixture(FiniteData):
    """x0 ~ sum_k w_k N(points[k], std^2 I): FiniteData with components of width ``std``.

    The width sets how sharp the denoiser is: with std small against the distance between
    components, E[x0 | x_t] switches abruptly from one component to another as sigma falls past
    that distance (std -> 0 is FiniteData); with std comparable to it the switch is gradual.
    """

    def __init__(self, points: torch.Tensor, std: float, weights: Optional[torch.Tensor] = None):
        super().__init__(points, weights)
        if not isinstance(std, (int, float)) or isinstance(std, bool) or not std > 0 or std == float("inf"):
            raise ValueError(f"std: expected a finite positive number, got {std!r}")
        self.std = float(std)

    def _components(self, sde: LinearSDE, x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor]):
        """(p(component k | x_t) [B, K], alpha [B, 1], variance of x_t in a component [B, 1], x_t - (1 - alpha) mu [B, D])."""
        batch = x_t.shape[0]
        alpha = _per_sample(sde.alpha(t), x_t).expand(batch, *([1] * (x_t.ndim - 1))).reshape(batch, 1)
        sigma = _per_sample(sde.sigma(t), x_t).expand(batch, *([1] * (x_t.ndim - 1))).reshape(batch, 1)
        centred = (x_t if mu is None else x_t - (1 - alpha.reshape(-1, *([1] * (x_t.ndim - 1)))) * mu).reshape(batch, -1)
        variance = alpha**2 * self.std**2 + sigma**2
        points = self.points.to(x_t.device).reshape(self.points.shape[0], -1)
        squared = ((centred[:, None] - alpha[:, :, None] * points[None]) ** 2).sum(-1)
        logits = torch.log(self.weights.to(x_t.device))[None] - 0.5 * squared / variance
        return torch.softmax(logits, dim=1), alpha, variance, centred

    def posterior_weights(self, sde, x_t, t, mu):
        return self._components(sde, x_t, t, mu)[0]

    def data_prediction(self, sde, x_t, t, mu):
        weights, alpha, variance, centred = self._components(sde, x_t, t, mu)
        points = self.points.to(x_t.device).reshape(self.points.shape[0], -1)
        # within component k, E[x0 | x_t] = m_k + (alpha std^2 / variance)(x_t - alpha m_k)
        gain = alpha * self.std**2 / variance
        return ((1 - alpha * gain) * (weights @ points) + gain * centred).reshape(x_t.shape)

    def sample(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        centres = super().sample(batch, generator)
        return centres + self.std * torch.randn(centres.shape, generator=generator, dtype=torch.float64)


def reference_ode_solution(
    model,
    sde: LinearSDE,
    x: torch.Tensor,
    t_from: float,
    t_to: float,
    mu: Optional[torch.Tensor] = None,
    model_output: str = "data",
    steps: int = 2000,
) -> torch.Tensor:
    """A converged solution of the probability-flow ODE (classical RK4 in the half log-SNR).

    In w = (x - mu) / alpha the ODE reads dw/dlam = -exp(-lam) eps_hat(x, t(lam)): smooth and
    non-stiff, so RK4 with a few thousand steps reaches float64 rounding for smooth models. It
    shares no code with the exponential integrators it is used to check. lam(t_to) must be finite.
    """
    lam_from, lam_to = float(sde.lam(t_from)), float(sde.lam(t_to))
    if not torch.isfinite(torch.tensor(lam_to)):
        raise ValueError(f"t_to: expected a time with finite log-SNR (sigma > 0), got {t_to}")
    x64 = x.double()
    mu64 = None if mu is None else mu.double()
    shift = 0.0 if mu64 is None else mu64
    batch = x.shape[0]

    # the RK4 stages sit on a half-step lattice in lam: invert the schedule once for all of them
    lams = torch.linspace(lam_from, lam_to, 2 * steps + 1, dtype=torch.float64)
    times = sde.t_of_lam(lams)
    alphas = sde.alpha(times)

    def velocity(w, node):
        x_t = shift + float(alphas[node]) * w
        t_batch = torch.full((batch,), float(times[node]), dtype=torch.float64, device=x.device)
        eps = convert(model(x_t, t_batch, mu64).double(), model_output, "noise", sde, x_t, t_batch, mu64)
        return -torch.exp(-lams[node]).item() * eps

    w = (x64 - shift) / float(sde.alpha(t_from))
    h = (lam_to - lam_from) / steps
    for step in range(steps):
        node = 2 * step
        k1 = velocity(w, node)
        k2 = velocity(w + 0.5 * h * k1, node + 1)
        k3 = velocity(w + 0.5 * h * k2, node + 1)
        k4 = velocity(w + h * k3, node + 2)
        w = w + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return (shift + float(sde.alpha(t_to)) * w).to(x.dtype)
