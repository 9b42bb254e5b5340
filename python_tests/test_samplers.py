"""Samplers against exact solutions: identities, convergence orders, distributions, guards."""

import math
import warnings

import pytest
import torch
from scipy import stats

import msdiff_fast as mf
from msdiff_fast.samplers import MRSampler, UnstableSolverWarning, conditioned_model
from msdiff_fast.sde import MRSDE, VESDE, VPSDE, MultiSpeedSDE
from msdiff_fast.testing import FiniteData, GaussianData, reference_ode_solution

F64 = torch.float64


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sde", [MRSDE(0.3, "cosine"), MRSDE.from_irsde(50, 100, "cosine", 0.005, "mrs"), VPSDE(), VESDE(0.01, 10.0)], ids=repr)
@pytest.mark.parametrize("model_output", ["noise", "data", "velocity"])
def test_ode1_noise_equals_ode1_data(sde, model_output):
    data = FiniteData(torch.randn(4, 6, generator=generator(1), dtype=F64))
    mu = torch.randn(3, 6, generator=generator(2), dtype=F64) if sde.mean_reverting else None
    x_T = sde.prior(mu if mu is not None else (3, 6), generator(3))
    # a discrete IR-SDE schedule interpolates lam separately from alpha and sigma: the identity
    # holds on its grid points
    grid = [100.0, 80, 55, 30, 12, 5, 2, 0] if sde.T == 100 else "uniform_lambda"
    runs = [MRSampler(sde, 7, solver="ode", order=1, prediction=p, model_output=model_output, timesteps=grid).sample(data.denoiser(sde, model_output), mu, x_T=x_T) for p in ("noise", "data")]
    assert (runs[0] - runs[1]).abs().max() < 1e-10


@pytest.mark.parametrize("convention", ["irsde", "mrs"])
def test_posterior_sampling_is_sde1_data_prediction(convention):
    sde = MRSDE.from_irsde(50, 100, "cosine", 0.005, convention)
    data = GaussianData(0.4, 0.25)
    mu = torch.rand(5, 3, 4, 4, generator=generator(4), dtype=F64)
    model = data.denoiser(sde, "noise")
    grid = torch.arange(100, -1, -1, dtype=F64)
    posterior = mf.posterior_sample(model, sde, mu, 100, timesteps=grid, generator=generator(5))
    sde1 = MRSampler(sde, 100, solver="sde", order=1, prediction="data", timesteps=grid).sample(model, mu, generator=generator(5))
    assert (posterior - sde1).abs().max() < 1e-10
    # and for respaced steps too (on grid points, where lam = log(alpha / sigma) exactly): the
    # posterior step is SDE-1 for any step size
    coarse = torch.tensor([100.0, 97, 92, 85, 70, 50, 30, 15, 6, 2, 0], dtype=F64)
    posterior = mf.posterior_sample(model, sde, mu, 10, timesteps=coarse, generator=generator(6))
    sde1 = MRSampler(sde, 10, solver="sde", order=1, timesteps=coarse).sample(model, mu, generator=generator(6))
    assert (posterior - sde1).abs().max() < 1e-10


def observed_orders(sde, data, mu, x_T, prediction, nfes, t_end):
    exact = reference_ode_solution(data.denoiser(sde, "data"), sde, x_T, sde.T, t_end, mu, steps=3000)
    orders = []
    for order in (1, 2, 3):
        errors = []
        for nfe in nfes:
            sampler = MRSampler(sde, nfe, solver="ode", order=order, prediction=prediction, model_output="noise", t_end=t_end, lower_order_final=False)
            errors.append(float((sampler.sample(data.denoiser(sde, "noise"), mu, x_T=x_T) - exact).abs().max()))
        slope = -torch.linalg.lstsq(torch.log(torch.tensor(nfes, dtype=F64))[:, None] ** torch.tensor([0.0, 1.0], dtype=F64), torch.log(torch.tensor(errors, dtype=F64))[:, None]).solution[1, 0]
        orders.append(float(slope))
    return orders


# The discrete IR-SDE schedule with interpolation="exact" is a smooth function of lam off its grid
# points, so the solvers reach their orders down to t = 0 (with "linear" they stall at the
# difference between the two interpolations, ~1e-2: benchmarks/results/sampler_accuracy.md).
@pytest.mark.parametrize("sde, t_end", [(MRSDE(0.5, "cosine"), 0.1), (MRSDE.from_irsde(50, 100, "cosine", 0.005, "mrs", interpolation="exact"), 0.0)], ids=repr)
@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_ode_convergence_orders(prediction, sde, t_end):
    data = FiniteData(torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=F64) * 0.5)
    mu = torch.randn(4, 8, generator=generator(2), dtype=F64)
    x_T = sde.prior(mu, generator(1))
    orders = observed_orders(sde, data, mu, x_T, prediction, [32, 64, 128], t_end=t_end)
    for expected, observed in zip((1, 2, 3), orders):
        assert abs(observed - expected) < 0.3, f"order {expected}: observed {observed:.2f} ({orders})"


def test_sde2_reproduces_a_discrete_distribution():
    sde = MRSDE(0.5, "cosine")
    points = torch.tensor([[-1.0, 0.5], [0.8, 0.8], [0.2, -1.2]], dtype=F64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    data = FiniteData(points, weights)
    n = 6000
    mu = torch.zeros(n, 2, dtype=F64)
    x = MRSampler(sde, 20, solver="sde", order=2).sample(data.denoiser(sde, "noise"), mu, generator=generator(7))
    counts = torch.bincount(data.nearest(x), minlength=3).double()
    assert (x - points[data.nearest(x)]).abs().max() < 0.05
    chi2 = float(((counts - n * weights) ** 2 / (n * weights)).sum())
    assert chi2 < stats.chi2.ppf(0.999, df=2), f"counts {counts.tolist()}, chi2 {chi2:.1f}"


@pytest.mark.parametrize("sde", [MRSDE(0.2, "cosine"), MRSDE.from_irsde(50, 100, "cosine", 0.005, "irsde")], ids=repr)
def test_sde2_reproduces_gaussian_moments(sde):
    data = GaussianData(0.3, 0.2)
    n = 40_000
    mu = torch.full((n, 1), -0.2, dtype=F64)
    # the variance error decays like 1/NFE (measured +15%, +2.7%, +1.2%, +0.3% at NFE 20/50/100/200)
    x = MRSampler(sde, 100, solver="sde", order=2).sample(data.denoiser(sde, "noise"), mu, generator=generator(8))
    assert abs(x.mean().item() - 0.3) < 4 * 0.2 / math.sqrt(n)
    assert abs(x.std().item() / 0.2 - 1) < 0.025


def test_noise_prediction_sde_at_low_nfe_is_flagged():
    sde = MRSDE.from_irsde(50, 100, "cosine", 0.005, "mrs")
    with pytest.warns(UnstableSolverWarning, match="prediction='data'"):
        MRSampler(sde, 5, solver="sde", prediction="noise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MRSampler(sde, 5, solver="sde", prediction="data")


def test_denoise_last_returns_the_last_data_prediction():
    sde = MRSDE(0.3, "cosine")
    data = GaussianData(0.1, 0.3)
    mu = torch.randn(2, 5, generator=generator(0), dtype=F64)
    model = data.denoiser(sde, "noise")
    seen = []
    sampler = MRSampler(sde, 6, solver="ode", denoise_last=True)
    x0 = sampler.sample(model, mu, generator=generator(1), callback=seen.append)
    assert len(seen) == 5
    last_t = float(sampler.timesteps[-2])
    x_last = seen[-1]["x"]
    assert torch.allclose(x0, data.data_prediction(sde, x_last, torch.tensor(last_t, dtype=F64), mu), atol=1e-12)


def test_clip_and_threshold_keep_predictions_in_range():
    sde = MRSDE(0.3, "cosine")
    data = FiniteData(torch.tensor([[2.0, -2.0]], dtype=F64))
    mu = torch.zeros(3, 2, dtype=F64)
    x = MRSampler(sde, 8, clip=(-1.0, 1.0)).sample(data.denoiser(sde, "noise"), mu, generator=generator(0))
    assert x.abs().max() <= 1.0
    predictions = []
    MRSampler(sde, 8, threshold=0.9, solver="ode").sample(data.denoiser(sde, "noise"), mu, generator=generator(0), callback=predictions.append)
    assert max(float(p["x0"].abs().max()) for p in predictions) <= 1.0 + 1e-12


def test_nan_guard_names_the_step():
    sde = MRSDE(0.3, "cosine")
    calls = []

    def model(x, t, mu):
        calls.append(t)
        return torch.full_like(x, float("nan")) if len(calls) == 3 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match="step 3/10"):
        MRSampler(sde, 10).sample(model, torch.zeros(2, 3), generator=generator(0))


def test_bad_inputs():
    sde = MRSDE(0.3, "cosine")
    mu = torch.zeros(2, 3)
    good = lambda x, t, m: torch.zeros_like(x)  # noqa: E731
    for call, error, name in [
        (lambda: MRSampler(sde, 0), ValueError, "steps"),
        (lambda: MRSampler(sde, 5, solver="sde", order=3), ValueError, "order"),
        (lambda: MRSampler(sde, 5, solver="rk"), ValueError, "solver"),
        (lambda: MRSampler(sde, 5, model_output="eps"), ValueError, "model_output"),
        (lambda: MRSampler(sde, 5, prediction="velocity"), ValueError, "prediction"),
        (lambda: MRSampler("vp", 5), TypeError, "sde"),
        (lambda: MRSampler(sde, 5, clip=(1, 0)), ValueError, "clip"),
        (lambda: MRSampler(sde, 5).sample(good, None), ValueError, "mu"),
        (lambda: MRSampler(sde, 5).sample(lambda x, t, m: x[:1], mu), ValueError, "model"),
        (lambda: MRSampler(sde, 5).sample(good, mu, x_T=torch.zeros(3, 3)), ValueError, "x_T"),
        (lambda: MRSampler(sde, 5).sample(good, mu.long()), TypeError, "mu"),
        (lambda: MRSampler(VPSDE(), 5).sample(good), ValueError, "shape"),
        (lambda: mf.posterior_sample(good, sde, mu, 0), ValueError, "steps"),
        (lambda: mf.pc_sample(good, sde, None, 10, shape=(2, 3)), ValueError, "sde"),
    ]:
        with pytest.raises(error, match=name):
            call()


@pytest.mark.parametrize("sampler", ["euler_maruyama", "posterior_sample", "pf_euler", "pc_sample"])
def test_reference_samplers_match_gaussian_statistics(sampler):
    data = GaussianData(0.3, 0.2)
    n = 20_000
    if sampler == "pc_sample":
        sde = VESDE(0.01, 5.0)
        x = mf.pc_sample(data.denoiser(sde, "score"), sde, None, 400, shape=(n, 1), generator=generator(3), clip=None)
    else:
        sde = MRSDE(0.2, "cosine")
        mu = torch.full((n, 1), 0.1, dtype=F64)
        model = data.denoiser(sde, "noise")
        if sampler == "euler_maruyama":
            x = mf.euler_maruyama(model, sde, mu, 400, generator=generator(3))
        elif sampler == "posterior_sample":
            x = mf.posterior_sample(model, sde, mu, 100, generator=generator(3))
        else:
            x = mf.probability_flow_euler(model, sde, mu, 400, generator=generator(3))
    assert abs(x.mean().item() - 0.3) < 0.01
    assert abs(x.std().item() / 0.2 - 1) < 0.04


def test_fast_ode_agrees_with_the_exact_gaussian_flow_for_ve_and_vp():
    data = GaussianData(0.2, 0.5)
    for sde in (VESDE(0.01, 20.0), VPSDE()):
        x_T = sde.prior((4, 3), generator(1)).double()
        exact = data.flow(sde, x_T, sde.T, sde.t_end)
        errors = []
        for steps in (20, 40):
            x = MRSampler(sde, steps, solver="ode", order=3, model_output="score").sample(data.denoiser(sde, "score"), x_T=x_T)
            errors.append(float((x - exact).abs().max()))
        assert errors[0] < 1e-2 * float(exact.abs().max()) and errors[1] < errors[0] / 4, errors


class JointGaussian:
    """(x0, y0) jointly Gaussian per element; the exact conditional and joint scores under a
    multi-speed VE pair, for testing the multi-speed conditioning modes."""

    def __init__(self, sde: MultiSpeedSDE, var_x=0.3**2, var_y=0.4**2, cov=0.1):
        self.sde, self.var_x, self.var_y, self.cov = sde, var_x, var_y, cov

    def conditional(self, y):
        mean = self.cov / self.var_y * y
        return mean, self.var_x - self.cov**2 / self.var_y

    def joint_score_x(self, x_t, t, y_t):
        sx2 = self.sde.x.sigma(t.double()).reshape(-1, *([1] * (x_t.ndim - 1))) ** 2
        sy2 = self.sde.y.sigma(t.double()).reshape(-1, *([1] * (x_t.ndim - 1))) ** 2
        a, b, c = self.var_x + sx2, self.cov, self.var_y + sy2
        det = a * c - b * b
        return -(c * x_t - b * y_t) / det

    def conditional_score_x(self, x_t, t, y):
        mean, var = self.conditional(y)
        sx2 = self.sde.x.sigma(t.double()).reshape(-1, *([1] * (x_t.ndim - 1))) ** 2
        return -(x_t - mean) / (var + sx2)


@pytest.mark.parametrize("mode", ["clean", "fresh", "consistent"])
def test_multispeed_pc_and_fast_sampler_modes(mode):
    sde = MultiSpeedSDE(VESDE(0.01, 5.0), VESDE(0.01, 0.02))
    joint = JointGaussian(sde)
    n = 8000
    y = torch.full((n, 1), 0.5, dtype=F64)
    model = joint.conditional_score_x if mode == "clean" else joint.joint_score_x
    want_mean, want_var = joint.conditional(0.5)
    x = mf.pc_sample(model, sde, y, 300, conditioning=mode, generator=generator(4), clip=None)
    assert abs(x.mean().item() - want_mean) < 0.015
    assert abs(x.var().item() / want_var - 1) < 0.08
    sampler = MRSampler(sde, 20, solver="sde", order=2, model_output="score")
    fast = sampler.sample(conditioned_model(model, sde, y, mode, generator(5), sampler.timesteps), shape=(n, 1), generator=generator(6))
    assert abs(fast.mean().item() - want_mean) < 0.015
    assert abs(fast.var().item() / want_var - 1) < 0.08
