"""Schedules: closed forms, inverses, derivatives, IR-SDE grids, conversions."""

import math

import pytest
import torch

from msdiff_fast.samplers import convert, get_timesteps
from msdiff_fast.sde import MRSDE, VESDE, VPSDE, MultiSpeedSDE, SubVPSDE, irsde_thetas

CONTINUOUS = [
    VESDE(0.01, 50.0),
    VESDE(5e-3, 110.85, "linear"),
    VPSDE(),
    SubVPSDE(),
    MRSDE(0.2, "cosine"),
    MRSDE(50 / 255, "linear"),
    MRSDE(0.5, "constant", alpha_T=0.01),
]
ALL = CONTINUOUS + [MRSDE.from_irsde(50, 100, "cosine", 0.005, "irsde"), MRSDE.from_irsde(10, 100, "linear", 0.01, "mrs")]


@pytest.mark.parametrize("sde", CONTINUOUS, ids=repr)
def test_lambda_inverse_and_derivatives(sde):
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64) * sde.T
    assert torch.allclose(sde.t_of_lam(sde.lam(t)), t, atol=1e-10, rtol=0)
    assert (sde.lam(t)[1:] < sde.lam(t)[:-1]).all()
    h = 1e-6 * sde.T
    numeric_f = (sde.log_alpha(t + h) - sde.log_alpha(t - h)) / (2 * h)
    numeric_dsigma2 = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(sde.f(t), numeric_f, rtol=1e-6, atol=1e-8)
    assert torch.allclose(sde.dsigma2_dt(t), numeric_dsigma2, rtol=1e-6, atol=1e-8)


def test_mean_reverting_closed_forms():
    sde = MRSDE(0.3, "cosine", alpha_T=0.005)
    t = torch.linspace(0.05, 1, 9, dtype=torch.float64)
    thetabar = sde.thetabar(t)
    assert math.isclose(float(sde.alpha(1.0)), 0.005, rel_tol=1e-12)
    assert torch.allclose(sde.lam(t), -math.log(0.3) - 0.5 * torch.log(torch.expm1(2 * thetabar)), rtol=1e-12)
    assert torch.allclose(0.5 * torch.log1p(torch.exp(-2 * sde.lam(t)) / 0.3**2), thetabar, rtol=1e-10)
    # g^2 / theta = 2 lam_inf^2: the stationary std is lam_inf
    assert torch.allclose(sde.g2(t) / sde.theta(t), torch.full_like(t, 2 * 0.3**2), rtol=1e-10)
    # d thetabar / dt = theta
    numeric = (sde.thetabar(t[:-1] + 1e-7) - sde.thetabar(t[:-1] - 1e-7)) / 2e-7
    assert torch.allclose(numeric, sde.theta(t[:-1]), rtol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("convention", ["irsde", "mrs"])
def test_irsde_grid_matches_closed_form(schedule, convention):
    T, eps, max_sigma = 100, 0.005, 50
    sde = MRSDE.from_irsde(max_sigma, T, schedule, eps, convention)
    # Written out independently from the IR-SDE definition (section 1 of mr_sampler.md).
    if schedule == "cosine":
        steps = T + 2
        abar = [math.cos(((i / steps) + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(steps + 1)]
        thetas = [1 - abar[i + 1] / abar[0] for i in range(T + 1)]
    elif schedule == "linear":
        scale = 1000 / (T + 1)
        thetas = [1e-4 * scale + i * (0.02 - 1e-4) * scale / T for i in range(T + 1)]
    else:
        thetas = [1.0] * (T + 1)
    cumulative = [sum(thetas[: i + 1]) - (thetas[0] if convention == "irsde" else 0.0) for i in range(T + 1)]
    dt = -math.log(eps) / cumulative[-1]
    lam_inf = max_sigma / 255
    alpha = torch.tensor([math.exp(-c * dt) for c in cumulative], dtype=torch.float64)
    sigma = torch.tensor([lam_inf * math.sqrt(1 - math.exp(-2 * c * dt)) for c in cumulative], dtype=torch.float64)
    grid = torch.arange(T + 1, dtype=torch.float64)
    assert torch.allclose(irsde_thetas(T, schedule), torch.tensor(thetas, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(sde.alpha(grid), alpha, atol=1e-12, rtol=0)
    assert torch.allclose(sde.sigma(grid), sigma, atol=1e-12, rtol=0)
    assert math.isclose(float(sde.alpha(T)), eps, rel_tol=1e-12)
    if convention == "irsde":
        assert float(sde.alpha(0)) == 1.0 and float(sde.sigma(0)) == 0.0 and float(sde.lam(0)) == math.inf
    else:
        assert math.isfinite(float(sde.lam(0)))
    # float t: alpha, sigma and lam are each linear between grid points; lam inverts exactly
    t = torch.tensor([1.25, 37.5, 99.9], dtype=torch.float64)
    assert torch.allclose(sde.alpha(t), alpha[t.long()] + (t - t.floor()) * (alpha[t.long() + 1] - alpha[t.long()]), atol=1e-14)
    assert torch.allclose(sde.t_of_lam(sde.lam(t)), t, atol=1e-10)


@pytest.mark.parametrize("convention", ["irsde", "mrs"])
def test_exact_interpolation_solves_the_discrete_sde_between_grid_points(convention):
    exact = MRSDE.from_irsde(50, 100, "cosine", 0.005, convention, interpolation="exact")
    linear = MRSDE.from_irsde(50, 100, "cosine", 0.005, convention)
    grid = torch.arange(101, dtype=torch.float64)
    for name in ("alpha", "sigma", "lam"):
        assert torch.allclose(getattr(exact, name)(grid), getattr(linear, name)(grid), atol=1e-12, rtol=1e-12), name
    t = torch.arange(100, dtype=torch.float64) + 0.37  # one time in every cell, none on the grid
    assert torch.allclose(exact.lam(t), torch.log(exact.alpha(t) / exact.sigma(t)), atol=0, rtol=1e-12)
    # what "linear" gives up: lam off the grid is not log(alpha / sigma)
    assert (linear.lam(t) - torch.log(linear.alpha(t) / linear.sigma(t))).abs().max() > 1e-3
    assert (exact.lam(t)[1:] < exact.lam(t)[:-1]).all()
    assert torch.allclose(exact.t_of_lam(exact.lam(t)), t, atol=1e-9, rtol=0)
    h = 1e-4  # the steps stay inside each cell, where theta is constant
    numeric_f = (exact.log_alpha(t + h) - exact.log_alpha(t - h)) / (2 * h)
    numeric_dsigma2 = (exact.sigma(t + h) ** 2 - exact.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(exact.f(t), numeric_f, rtol=1e-6, atol=1e-11)
    assert torch.allclose(exact.dsigma2_dt(t), numeric_dsigma2, rtol=1e-6, atol=1e-11)
    assert "interpolation='exact'" in repr(exact)
    with pytest.raises(ValueError, match="interpolation: expected 'linear'.*got 'cubic'"):
        MRSDE.from_irsde(50, interpolation="cubic")


def test_max_sigma_scale_and_bad_parameters():
    assert math.isclose(MRSDE.from_irsde(50).lam_inf, 50 / 255)
    assert math.isclose(MRSDE.from_irsde(0.1).lam_inf, 0.1)
    for call, name in [
        (lambda: MRSDE(float("nan")), "lam_inf"),
        (lambda: MRSDE(0.2, "square"), "schedule"),
        (lambda: MRSDE(0.2, alpha_T=1.5), "alpha_T"),
        (lambda: MRSDE.from_irsde(float("inf")), "max_sigma"),
        (lambda: MRSDE.from_irsde(50, T=0), "T"),
        (lambda: MRSDE.from_irsde(50, convention="other"), "convention"),
        (lambda: VESDE(1.0, 0.5), "sigma_max"),
        (lambda: VESDE(-1.0, 0.5), "sigma_min"),
        (lambda: VPSDE(float("inf")), "beta_min"),
        (lambda: MultiSpeedSDE(VESDE(), "not an sde"), "y_sde"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            call()


@pytest.mark.parametrize("sde", ALL, ids=repr)
@pytest.mark.parametrize("kind_from", ["noise", "data", "velocity", "score"])
@pytest.mark.parametrize("kind_to", ["noise", "data", "velocity", "score"])
def test_conversions_round_trip(sde, kind_from, kind_to):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    mu = torch.randn(4, 3, 5, generator=g, dtype=torch.float64) if sde.mean_reverting else None
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64) * sde.T
    output = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    there = convert(output, kind_from, kind_to, sde, x_t, t, mu)
    back = convert(there, kind_to, kind_from, sde, x_t, t, mu)
    assert (back - output).abs().max() < 1e-10


@pytest.mark.parametrize("sde", ALL, ids=repr)
def test_conversions_agree_with_the_definitions(sde):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mu = torch.randn(3, 7, generator=g, dtype=torch.float64) if sde.mean_reverting else None
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64) * sde.T
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    shift = 0 if mu is None else mu
    x_t = alpha * x0 + (1 - alpha) * shift + sigma * eps
    assert torch.allclose(convert(eps, "noise", "data", sde, x_t, t, mu), x0, atol=1e-10)
    assert torch.allclose(convert(x0, "data", "score", sde, x_t, t, mu), -eps / sigma, atol=1e-8)
    scale = sde.velocity_scale
    v = (scale * alpha * eps - sigma / scale * (x0 - shift)) / torch.sqrt(alpha**2 + (sigma / scale) ** 2)
    assert torch.allclose(convert(v, "velocity", "data", sde, x_t, t, mu), x0, atol=1e-10)


def test_marginal_and_prior_statistics():
    sde = MRSDE(0.2, "cosine")
    mu = torch.full((50_000, 1), 0.7, dtype=torch.float64)
    x_T = sde.prior(mu, torch.Generator().manual_seed(0))
    assert abs(x_T.mean().item() - 0.7) < 0.005 and abs(x_T.std().item() - 0.2) < 0.003
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    mean, std = sde.marginal(x0, torch.tensor([0.0 + 1e-9, 1.0], dtype=torch.float64), mu[:2].expand(2, 3))
    assert torch.allclose(mean[1], torch.full((3,), 0.7 * (1 - 0.005), dtype=torch.float64))
    assert math.isclose(float(std[1]), 0.2 * math.sqrt(1 - 0.005**2), rel_tol=1e-12)
    ve = VESDE(0.01, 50.0)
    assert abs(ve.prior((40_000,), torch.Generator().manual_seed(1)).std().item() - 50) < 0.5


@pytest.mark.parametrize("sde", ALL, ids=repr)
@pytest.mark.parametrize("kind", ["uniform_lambda", "uniform_t", "karras"])
@pytest.mark.parametrize("steps", [1, 5, 20])
def test_timesteps(sde, kind, steps):
    ts = get_timesteps(sde, steps, kind)
    assert ts.shape == (steps + 1,) and ts.dtype == torch.float64
    assert ts[0] == sde.T and ts[-1] == sde.t_end
    assert (ts[1:] < ts[:-1]).all()
    lams = sde.lam(ts)
    if kind == "uniform_lambda" and math.isfinite(float(lams[-1])):
        assert torch.allclose(lams[1:] - lams[:-1], (lams[-1] - lams[0]) / steps * torch.ones(steps, dtype=torch.float64), rtol=1e-6)


def test_timesteps_bad_input():
    sde = VPSDE()
    for call, name in [
        (lambda: get_timesteps(sde, 0), "steps"),
        (lambda: get_timesteps(sde, 2.5), "steps"),
        (lambda: get_timesteps(sde, 2, "log"), "timesteps"),
        (lambda: get_timesteps(sde, 2, [1.0, 0.5]), "timesteps"),
        (lambda: get_timesteps(sde, 2, [1.0, 0.5, 0.7]), "timesteps"),
        (lambda: get_timesteps(sde, 2, t_end=2.0), "t_end"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()
