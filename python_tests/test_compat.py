"""Drop-in adapters: IR-SDE / DA-CLIP networks, k-diffusion denoisers, the official MR Sampler class."""

import math
import types
import warnings

import pytest
import torch
from torch import nn

from msdiff_fast import MRSampler
from msdiff_fast.compat import DropInMRSampler, IntegerTimeWarning, IRSDESampler, from_k_diffusion, irsde_model, to_k_diffusion
from msdiff_fast.sde import MRSDE, VESDE, VPSDE
from msdiff_fast.testing import FiniteData, GaussianData

F64 = torch.float64
OPT = {"sde": {"max_sigma": 50, "T": 100, "schedule": "cosine", "eps": 0.005}}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


class IRSDEStyleNet(nn.Module):
    """Stands in for IR-SDE's / DA-CLIP's ConditionalUNet: forward(xt, cond, time, text_context=None),
    network input cat(xt - cond, cond), predicts the noise; here the exact noise of finite data."""

    def __init__(self, exact_noise):
        super().__init__()
        self.exact_noise = exact_noise
        self.times, self.contexts = [], []

    def forward(self, xt, cond, time, text_context=None):
        self.times.append(time)
        self.contexts.append(text_context)
        network_input = torch.cat([xt - cond, cond], dim=1)
        channels = xt.shape[1]
        x_t, mu = network_input[:, :channels] + network_input[:, channels:], network_input[:, channels:]
        return self.exact_noise(x_t, time.to(F64), mu)


class ConcatNet(nn.Module):
    """A plain network on cat(x_t - mu, mu) (msdiff's estimator="mr" U-Net layout): forward(x, t)."""

    def __init__(self, exact_noise):
        super().__init__()
        self.exact_noise = exact_noise

    def forward(self, network_input, t):
        channels = network_input.shape[1] // 2
        mu = network_input[:, channels:]
        return self.exact_noise(network_input[:, :channels] + mu, t.to(F64), mu)


def finite_problem(convention="irsde", batch=3, seed=0, channels=2):
    sde = MRSDE.from_irsde(50, 100, "cosine", 0.005, convention)
    data = FiniteData(torch.rand(4, channels, 3, 3, generator=generator(seed), dtype=F64))
    mu = torch.rand(batch, channels, 3, 3, generator=generator(seed + 1), dtype=F64)
    x_T = sde.prior(mu, generator(seed + 2))
    return sde, data, mu, x_T


@pytest.mark.parametrize("solver, order", [("ode", 2), ("sde", 2), ("ode", 3)])
def test_irsde_adapter_reproduces_mrsampler(solver, order):
    sde, data, mu, x_T = finite_problem()
    exact = data.denoiser(sde, "noise")
    options = dict(steps=8, solver=solver, order=order, prediction="data", model_output="noise")
    expected = MRSampler(sde, options.pop("steps"), **options).sample(exact, mu, x_T=x_T, generator=generator(9))
    for signature, network in (("irsde", IRSDEStyleNet(exact)), ("concat", ConcatNet(exact))):
        adapter = IRSDESampler(50, T=100, eps=0.005, schedule="cosine", convention="irsde", steps=8, solver=solver, order=order, network_signature=signature)
        restored = adapter.sample(network, mu, x_T=x_T, generator=generator(9))
        assert adapter.nfe == 8
        assert (restored - expected).abs().max() < 1e-12, signature


def test_irsde_adapter_builds_the_exactly_interpolated_schedule():
    adapter = IRSDESampler(50, T=100, eps=0.005, schedule="cosine", convention="mrs", interpolation="exact", steps=4)
    assert adapter.sde.interpolation == "exact" and adapter.sde.convention == "mrs"
    t = torch.tensor([12.5, 60.25], dtype=torch.float64)
    assert torch.allclose(adapter.sde.lam(t), torch.log(adapter.sde.alpha(t) / adapter.sde.sigma(t)), rtol=1e-12, atol=0)


def test_irsde_adapter_passes_context_and_batched_float_time():
    sde, data, mu, x_T = finite_problem(batch=4)
    network = IRSDEStyleNet(data.denoiser(sde, "noise"))
    context = torch.randn(4, 7)
    IRSDESampler(50, steps=5, solver="ode").sample(network, mu, x_T=x_T, text_context=context)
    assert len(network.times) == 5
    assert all(t.shape == (4,) and t.is_floating_point() for t in network.times)
    assert all(c is context for c in network.contexts)
    # the first call is at t = T on IR-SDE's grid units, the last strictly inside (0, T)
    assert float(network.times[0][0]) == 100.0 and 0 < float(network.times[-1][0]) < 100


def test_integer_time_rounds_warns_once_and_is_exact_on_the_grid():
    sde, data, mu, x_T = finite_problem()
    exact = data.denoiser(sde, "noise")
    network = IRSDEStyleNet(exact)
    rounded = IRSDESampler(50, steps=6, solver="ode", integer_time=True)
    with pytest.warns(IntegerTimeWarning, match="trained on integer t") as caught:
        rounded.sample(network, mu, x_T=x_T)
    assert len([w for w in caught if issubclass(w.category, IntegerTimeWarning)]) == 1
    assert all(t.dtype == torch.int64 for t in network.times)
    assert any(float(t[0]) != float(s) for t, s in zip(network.times, rounded.sampler.timesteps[:-1]))
    # on an integer time grid nothing is rounded: same result as float time, and no warning
    on_grid = dict(steps=10, solver="ode", timesteps="uniform_t")
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegerTimeWarning)
        integer_run = IRSDESampler(50, integer_time=True, **on_grid).sample(IRSDEStyleNet(exact), mu, x_T=x_T)
    float_run = IRSDESampler(50, **on_grid).sample(IRSDEStyleNet(exact), mu, x_T=x_T)
    assert (integer_run - float_run).abs().max() < 1e-12


def gaussian_k_denoiser(mean, std):
    """k-diffusion's D(x, sigma) for x0 ~ N(mean, std^2): the exact denoised image."""

    def denoise(x, sigma):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mean + std**2 / (std**2 + sigma**2) * (x - mean)

    return denoise


@pytest.mark.parametrize("sde", [VESDE(0.01, 20.0), VESDE(0.05, 10.0, "linear"), VPSDE()], ids=repr)
def test_k_diffusion_adapters_match_exact_models_and_round_trip(sde):
    mean, std = 0.3, 0.7
    k_denoiser = gaussian_k_denoiser(mean, std)
    exact = GaussianData(mean, std)
    x = torch.randn(5, 2, 4, generator=generator(1), dtype=F64)
    t = torch.rand(5, generator=generator(2), dtype=F64) * 0.9 + 0.05
    model = from_k_diffusion(k_denoiser, sde)
    # the adapter is the exact data prediction under msdiff's SDE (k-diffusion's sigma = sigma / alpha)
    assert (model(x, t) - exact.denoiser(sde, "data")(x, t)).abs().max() < 1e-12
    # ours -> k-diffusion is the identity on outputs: D(x, sigma) back, whatever the model predicts
    sigma = sde.sigma(t) / sde.alpha(t)
    for model_output, inner in (("data", model), ("noise", exact.denoiser(sde, "noise")), ("score", exact.denoiser(sde, "score"))):
        back = to_k_diffusion(inner, sde, model_output)
        assert (back(x, sigma) - k_denoiser(x, sigma)).abs().max() < 1e-9 * (1 + sigma.max()), model_output
    back = to_k_diffusion(model, sde)
    assert math.isclose(back.sigma_max, float(sde.sigma(sde.T) / sde.alpha(sde.T)), rel_tol=1e-12)
    assert (back(x, float(sigma[0])) - k_denoiser(x, sigma[:1].expand(5))).abs().max() < 1e-9


def test_k_diffusion_denoiser_runs_under_mrsampler_and_passes_conditions():
    sde = VESDE(0.01, 20.0)
    seen = []

    def k_denoiser(x, sigma, cond=None, scale=1.0):
        seen.append((cond, scale))
        return gaussian_k_denoiser(0.2, 0.5)(x, sigma)

    model = from_k_diffusion(k_denoiser, sde, cond_key="cond", scale=2.0)
    x_T = sde.prior((3, 4), generator(3)).double()
    condition = torch.ones(3, 4)
    ours = MRSampler(sde, 10, solver="ode", model_output="data").sample(model, x_T=x_T, cond=condition)
    exact = MRSampler(sde, 10, solver="ode", model_output="data").sample(GaussianData(0.2, 0.5).denoiser(sde, "data"), x_T=x_T)
    assert (ours - exact).abs().max() < 1e-10
    assert all(c is condition and s == 2.0 for c, s in seen)
    denoiser = to_k_diffusion(lambda x, t, c: x * 0 + c, sde, cond=torch.full((3, 4), 7.0))
    assert float(denoiser(x_T, 1.0).min()) == 7.0
    assert float(denoiser(x_T, 1.0, cond=torch.zeros(3, 4)).max()) == 0.0


def irsde_object(network):
    """What the official code passes as ``sde``: an IRSDE after set_model(network)."""
    return types.SimpleNamespace(model=network)


@pytest.mark.filterwarnings("ignore::msdiff_fast.samplers.UnstableSolverWarning")
@pytest.mark.parametrize("solver, order, parameterization, schedule, ours_timesteps", [
    ("ode", 2, "data", "linspace", "uniform_t"),
    ("ode", 3, "noise", "linear-lambda", "uniform_lambda"),
    ("sde", 2, "data", "linear-lambda", "uniform_lambda"),
    ("sde", 1, "noise", "linspace", "uniform_t"),
])
def test_drop_in_matches_mrsampler_with_the_equivalent_settings(solver, order, parameterization, schedule, ours_timesteps):
    sde, data, mu, x_T = finite_problem("mrs")
    network = IRSDEStyleNet(data.denoiser(sde, "noise"))
    drop_in = DropInMRSampler(irsde_object(network), OPT, 20, solver_type=solver, parameterization=parameterization, order=order, fit_target="noise", time_schedule=schedule)
    torch.manual_seed(4)
    samples, qbuffer, states = drop_in.sampling(mu, noisy_state=x_T)
    torch.manual_seed(4)
    equivalent = MRSampler(sde, 20, solver=solver, order=order, prediction=parameterization, model_output="noise", timesteps=ours_timesteps)
    expected = equivalent.sample(data.denoiser(sde, "noise"), mu, x_T=x_T).clamp(0, 1)
    assert (samples - expected).abs().max() < 1e-9
    assert torch.allclose(torch.tensor(drop_in.timesteps, dtype=F64), equivalent.timesteps, atol=1e-9, rtol=0)
    assert qbuffer == [] and states == []
    assert len(network.times) == 20


def test_drop_in_follows_the_official_order_rule_and_time_grids():
    network = IRSDEStyleNet(lambda x, t, mu: torch.zeros_like(x))
    orders = lambda sampler: [sampler.sampler.step_order(i) for i in range(sampler.sampler.steps)]  # noqa: E731
    # fewer than 10 steps: orders ramp up, steps j < M run at min(order, M - j), the last step at full order
    assert orders(DropInMRSampler(irsde_object(network), OPT, 5, order=2)) == [1, 2, 2, 1, 2]
    assert orders(DropInMRSampler(irsde_object(network), OPT, 6, order=3)) == [1, 2, 3, 2, 1, 3]
    assert orders(DropInMRSampler(irsde_object(network), OPT, 12, order=3)) == [1, 2] + [3] * 10
    grid = lambda **kw: DropInMRSampler(irsde_object(network), OPT, 5, order=1, **kw).timesteps  # noqa: E731
    assert grid(time_schedule="linspace") == [100.0, 80.0, 60.0, 40.0, 20.0, 0.0]
    assert grid(time_schedule="leading", timestep_offset=1) == [81.0, 65.0, 49.0, 33.0, 17.0, 1.0]
    karras_t = grid(time_schedule="karras-t")
    assert karras_t[0] == pytest.approx(100.0) and karras_t[-1] == pytest.approx(1.0)
    assert len(grid(time_schedule="trailing")) == 6
    # lambda_min moves the start of the linspace grid to where lam(t) >= lambda_min
    sde = MRSDE.from_irsde(50, 100, "cosine", 0.005, "mrs")
    start = grid(time_schedule="linspace", lambda_min=-3.0)[0]
    assert start < 100 and float(sde.lam(start)) >= -3.0 > float(sde.lam(start + 1))


def test_drop_in_thresholding_denoise_last_and_saved_states(tmp_path):
    sde, data, mu, x_T = finite_problem("mrs", batch=2, channels=3)
    exact = data.denoiser(sde, "data")
    network = lambda x, m, t: 3.0 * exact(x, t.to(F64), m)  # noqa: E731  (a data prediction far outside [-1.5, 1.5])
    drop_in = DropInMRSampler(irsde_object(network), OPT, 6, order=2, fit_target="data", thresholding=True, threshold_max=1.5, denoise_last=True)
    samples, qbuffer, states = drop_in.sampling(mu, noisy_state=x_T, savedir=str(tmp_path))
    assert len(qbuffer) == 6 and len(states) == 7
    # every prediction was clamped to [-s, s] and divided by s: inside [-1, 1]
    assert max(float(q.abs().max()) for q in qbuffer) <= 1 + 1e-6
    # denoise_last returns the last (thresholded) data prediction, clipped to [0, 1]
    assert (samples - qbuffer[-1].clamp(0, 1)).abs().max() < 1e-12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prior_sample.png"] + [f"step_{i}.png" for i in range(1, 7)])


def test_bad_arguments_raise_clearly():
    sde, data, mu, x_T = finite_problem("mrs", batch=2)
    network = IRSDEStyleNet(data.denoiser(sde, "noise"))
    k_model = lambda x, t, c: x  # noqa: E731
    cases = [
        (lambda: IRSDESampler(50, network_signature="nchw"), ValueError, "network_signature"),
        (lambda: IRSDESampler(50, integer_time=1), TypeError, "integer_time"),
        (lambda: IRSDESampler(50, convention="daclip"), ValueError, "convention"),
        (lambda: IRSDESampler(50, solver="sde", order=3), ValueError, "order"),
        (lambda: irsde_model("unet", sde), TypeError, "network"),
        (lambda: irsde_model(network, "sde"), TypeError, "sde"),
        (lambda: irsde_model(network, MRSDE(0.2), integer_time=True), ValueError, "integer_time"),
        (lambda: irsde_model(network, sde)(x_T, torch.full((2,), 50.0), None), ValueError, "mu"),
        (lambda: irsde_model(lambda x, m, t: x[:1], sde)(x_T, torch.full((2,), 50.0), mu), ValueError, "network"),
        (lambda: from_k_diffusion(k_model, sde), ValueError, "sde"),
        (lambda: from_k_diffusion("D", VESDE()), TypeError, "denoiser"),
        (lambda: from_k_diffusion(k_model, VESDE(), cond_key=3), TypeError, "cond_key"),
        (lambda: to_k_diffusion(k_model, VESDE(), "eps"), ValueError, "model_output"),
        (lambda: to_k_diffusion(k_model, sde), ValueError, "sde"),
        (lambda: to_k_diffusion(k_model, VESDE(0.01, 50.0))(torch.zeros(2, 3), 100.0), ValueError, "sigma"),
        (lambda: to_k_diffusion(k_model, VESDE(0.01, 50.0))(torch.zeros(2, 3), torch.ones(3)), ValueError, "sigma"),
        (lambda: to_k_diffusion(k_model, VESDE(0.01, 50.0))(torch.zeros(2, 3, dtype=torch.int64), 1.0), TypeError, "x"),
        (lambda: DropInMRSampler(types.SimpleNamespace(model=None), OPT, 10), TypeError, "set_model"),
        (lambda: DropInMRSampler(irsde_object(network), {"sde": {"T": 100}}, 10), ValueError, "max_sigma"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10, solver_type="heun"), ValueError, "solver_type"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10, solver_type="sde", order=3), ValueError, "order"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10, parameterization="velocity"), ValueError, "parameterization"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10, fit_target="eps"), ValueError, "fit_target"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10, time_schedule="cosine"), ValueError, "time_schedule"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 2, order=3), ValueError, "num_sample_steps"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 120, time_schedule="leading"), ValueError, "strictly decreasing"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 0), ValueError, "num_inference_steps"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10, time_schedule="karras-n", convention="irsde"), ValueError, "lam = inf"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10, thresholding=True, threshold_max=0.5), ValueError, "threshold"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10).sampling(mu[0]), ValueError, "cond"),
        (lambda: DropInMRSampler(irsde_object(network), OPT, 10).sampling(mu, savedir="unused"), ValueError, "savedir"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
