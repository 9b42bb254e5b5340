"""What a network predicts, and how to turn it into the solver's prediction.

Every kind is an affine function of (model output, x_t, mu) with per-time coefficients:

    noise -> data:    x0 = (x_t - sigma eps) / alpha - (1 - alpha) / alpha * mu
    data -> noise:    eps = (x_t - mu - alpha (x0 - mu)) / sigma
    score:            eps = -sigma * score
    velocity:         v = (L alpha eps - (sigma / L)(x0 - mu)) / c,  c = sqrt(alpha^2 + (sigma / L)^2),
                      L = sde.velocity_scale (lam_inf for mean-reverting SDEs, 1 otherwise), so
                      x0 = (alpha / c^2)(x_t - mu) + mu - sigma / (L c) * v

so the samplers fold the conversion into the coefficients of their one fused step.
"""

from typing import Optional, Tuple

import torch

from ..sde import LinearSDE, Time, as_time

KINDS = ("noise", "data", "velocity", "score")
PREDICTIONS = ("noise", "data")


def check_kind(name: str, value: str, allowed=KINDS) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def velocity_norm_squared(sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
    """c^2 = alpha^2 + (sigma / L)^2, the squared normaliser of the velocity (module docstring)."""
    return sde.alpha(t) ** 2 + (sde.sigma(t) / sde.velocity_scale) ** 2


def _data_and_noise_forms(sde: LinearSDE, t: torch.Tensor, kind: str):
    """(c_out, c_x, c_mu) of x0 and of eps, each as an affine function of (output, x_t, mu)."""
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    zero, one = torch.zeros_like(alpha), torch.ones_like(alpha)
    if kind == "noise":
        eps = (one, zero, zero)
    elif kind == "score":
        eps = (-sigma, zero, zero)
    elif kind == "data":
        data = (one, zero, zero)
        return data, (-alpha / sigma, 1 / sigma, -(1 - alpha) / sigma)
    else:
        scale = sde.velocity_scale
        c2 = velocity_norm_squared(sde, t)
        data = (-sigma / (scale * c2.sqrt()), alpha / c2, 1 - alpha / c2)
        data_minus_mu = (data[0], data[1], data[2] - 1)
        return data, tuple((e - alpha * d) / sigma for e, d in zip((zero, one, -one), data_minus_mu))
    # x0 = (x_t - mu - sigma eps) / alpha + mu
    data = (-sigma * eps[0] / alpha, 1 / alpha - sigma * eps[1] / alpha, -(1 - alpha) / alpha)
    return data, eps


def prediction_coefficients(
    sde: LinearSDE, t: Time, model_output: str, prediction: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_out, c_x, c_mu) with prediction = c_out * output + c_x * x_t + c_mu * mu, float64."""
    check_kind("model_output", model_output)
    check_kind("prediction", prediction, KINDS)
    t = as_time(t)
    data, eps = _data_and_noise_forms(sde, t, model_output)
    if prediction == "data":
        return data
    if prediction == "noise":
        return eps
    if prediction == "score":
        sigma = sde.sigma(t)
        return tuple(-e / sigma for e in eps)
    # velocity from (x0, eps): v = (L alpha eps - (sigma / L)(x0 - mu)) / c
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    scale = sde.velocity_scale
    c = torch.sqrt(velocity_norm_squared(sde, t))
    a, b = scale * alpha / c, sigma / (scale * c)
    return (a * eps[0] - b * data[0], a * eps[1] - b * data[1], a * eps[2] - b * data[2] + b)


def convert(
    output: torch.Tensor,
    model_output: str,
    prediction: str,
    sde: LinearSDE,
    x_t: torch.Tensor,
    t: Time,
    mu: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The ``prediction`` kind of a network output of kind ``model_output`` at (x_t, t)."""
    if output.shape != x_t.shape:
        raise ValueError(f"output: expected shape {tuple(x_t.shape)} (like x_t), got {tuple(output.shape)}")
    coefficients = prediction_coefficients(sde, t, model_output, prediction)
    c_out, c_x, c_mu = (_broadcast(c, output) for c in coefficients)
    result = c_out * output + c_x * x_t
    return result if mu is None else result + c_mu * mu


def _broadcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if c.ndim == 1:
        c = c.reshape(-1, *([1] * (like.ndim - 1)))
    return c.to(device=like.device, dtype=like.dtype)
