"""Issue 14's closed-form pieces: the Gaussian inverse problem (posterior, each estimator's ideal
score, the exact sampler output), the Gaussian mixture model, and the midpoint second-order step."""

import math

import pytest
import torch

import msdiff_fast as mf
from msdiff_fast.samplers import MRSampler, conditioned_model, get_timesteps
from msdiff_fast.samplers.mr_sampler import step_coefficients
from msdiff_fast.sde import MRSDE, VESDE, VPSDE, MultiSpeedSDE
from msdiff_fast.testing import (
    FiniteData,
    GaussianData,
    GaussianInverseProblem,
    GaussianMixture,
    gaussian_kl,
    gaussian_w2,
    reference_ode_solution,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: OpenMP's fan-out costs more than it saves, and on a loaded
    machine far more (a [4, 3] softmax took 40 ms on 2 threads, 2 us on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def small_problem(mean=0.5):
    """d = 3, m = 2: a correlated prior, a mixing operator, noise 0.1."""
    g = generator(11)
    factor = torch.randn(3, 3, generator=g, dtype=F64)
    cov = 0.05 * factor @ factor.T + 0.02 * torch.eye(3, dtype=F64)
    return GaussianInverseProblem(torch.full((3,), mean, dtype=F64) + 0.1 * torch.randn(3, generator=g, dtype=F64), cov,
                                  torch.randn(2, 3, generator=g, dtype=F64), 0.1)


def observation(problem, seed=3):
    return problem.sample(1, generator(seed))[1][0]


# ------------------------------------------------------------------------------------ posterior
@pytest.mark.parametrize("problem", [small_problem(), GaussianInverseProblem.super_resolution(4, 2), GaussianInverseProblem.inpainting(4, 2)], ids=repr)
def test_posterior_matches_the_information_form(problem):
    y = observation(problem)
    mean, cov = problem.posterior(y)
    noise_precision = torch.eye(problem.obs_dim, dtype=F64) / problem.noise_std**2
    precision = torch.linalg.inv(problem.cov) + problem.operator.T @ noise_precision @ problem.operator
    want_cov = torch.linalg.inv(precision)
    want_mean = want_cov @ (torch.linalg.solve(problem.cov, problem.mean) + problem.operator.T @ noise_precision @ y)
    assert torch.allclose(cov, want_cov, atol=1e-10, rtol=1e-8)
    assert torch.allclose(mean, want_mean, atol=1e-9, rtol=1e-8)


def test_posterior_matches_numerical_integration_in_one_dimension():
    problem = GaussianInverseProblem(torch.tensor([0.3], dtype=F64), torch.tensor([[0.2]], dtype=F64), torch.tensor([[1.5]], dtype=F64), 0.4)
    y = torch.tensor([0.9], dtype=F64)
    x = torch.linspace(-4, 4, 200_001, dtype=F64)
    density = torch.exp(-0.5 * (x - 0.3) ** 2 / 0.2 - 0.5 * (y - 1.5 * x) ** 2 / 0.4**2)
    weights = density / density.sum()
    want_mean = (weights * x).sum()
    mean, cov = problem.posterior(y)
    assert abs(float(mean[0] - want_mean)) < 1e-9
    assert abs(float(cov[0, 0] - (weights * (x - want_mean) ** 2).sum())) < 1e-9


# ------------------------------------------------------------------------------------ ideal scores
def log_density_gradient(mean, cov, point, dims):
    """grad of log N(point; mean, cov) over the first ``dims`` coordinates, by autograd."""
    point = point.clone().requires_grad_(True)
    torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(point).backward()
    return point.grad[:dims]


@pytest.mark.parametrize("x_sde", [VESDE(0.01, 5.0), VPSDE()], ids=repr)
def test_cde_ideal_score_is_the_conditional_score(x_sde):
    problem = small_problem()
    y = observation(problem)
    post_mean, post_cov = problem.posterior(y)
    x_t = torch.randn(5, 3, generator=generator(4), dtype=F64)
    score = problem.conditional_score(x_sde, y)
    for t in (0.05, 0.7):
        alpha, sigma = float(x_sde.alpha(t)), float(x_sde.sigma(t))
        got = score(x_t, torch.full((5,), t, dtype=F64))
        for b in range(5):
            want = log_density_gradient(alpha * post_mean, alpha**2 * post_cov + sigma**2 * torch.eye(3, dtype=F64), x_t[b], 3)
            assert torch.allclose(got[b], want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("sdes", [(VESDE(0.01, 5.0), VESDE(0.01, 0.5)), (VESDE(0.01, 5.0), VESDE(0.01, 5.0)), (VPSDE(), VPSDE(0.1, 5.0))], ids=repr)
def test_joint_score_is_the_gradient_of_the_joint_log_density(sdes):
    x_sde, y_sde = sdes
    problem = small_problem()
    score = problem.joint_score(MultiSpeedSDE(x_sde, y_sde))
    x_t = torch.randn(4, 3, generator=generator(5), dtype=F64)
    y_t = torch.randn(4, 2, generator=generator(6), dtype=F64)
    A, S = problem.operator, problem.cov
    for t in (0.1, 0.6):
        ax, sx, ay, sy = (float(v) for v in (x_sde.alpha(t), x_sde.sigma(t), y_sde.alpha(t), y_sde.sigma(t)))
        # the joint Gaussian of (x_t, y_t), assembled block by block from (x0, n, z_x, z_y)
        mix = torch.zeros(5, 3 + 2 + 3 + 2, dtype=F64)
        root = torch.linalg.cholesky(S)
        mix[:3, :3], mix[:3, 5:8] = ax * root, sx * torch.eye(3, dtype=F64)
        mix[3:, :3], mix[3:, 3:5], mix[3:, 8:] = ay * A @ root, ay * problem.noise_std * torch.eye(2, dtype=F64), sy * torch.eye(2, dtype=F64)
        mean = torch.cat([ax * problem.mean, ay * A @ problem.mean])
        got = score(x_t, torch.full((4,), t, dtype=F64), y_t)
        for b in range(4):
            want = log_density_gradient(mean, mix @ mix.T, torch.cat([x_t[b], y_t[b]]), 3)
            assert torch.allclose(got[b], want, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("estimator", ["cde", "cmde"])
def test_ideal_scores_minimise_the_denoising_objectives(estimator):
    """The minimiser of E||s(x_t, v) + z / sigma||^2 over affine s is a least-squares fit on samples."""
    problem = small_problem()
    x_sde, y_sde = VESDE(0.01, 3.0), VESDE(0.01, 0.7)
    t = 0.55
    n = 400_000
    g = generator(7)
    x0, y = problem.sample(n, g)
    z = torch.randn(n, 3, generator=g, dtype=F64)
    x_t = x0 + float(x_sde.sigma(t)) * z
    v = y if estimator == "cde" else y + float(y_sde.sigma(t)) * torch.randn(n, 2, generator=g, dtype=F64)
    features = torch.cat([x_t, v, torch.ones(n, 1, dtype=F64)], dim=1)
    fitted = torch.linalg.lstsq(features, -z / float(x_sde.sigma(t))).solution
    probe_x = torch.randn(6, 3, generator=generator(8), dtype=F64)
    probe_v = problem.sample(6, generator(9))[1]
    regression = torch.cat([probe_x, probe_v, torch.ones(6, 1, dtype=F64)], dim=1) @ fitted
    times = torch.full((6,), t, dtype=F64)
    if estimator == "cde":
        ideal = torch.stack([problem.conditional_score(x_sde, probe_v[b])(probe_x[b : b + 1], times[:1])[0] for b in range(6)])
    else:
        ideal = problem.joint_score(MultiSpeedSDE(x_sde, y_sde))(probe_x, times, probe_v)
    assert float((regression - ideal).norm() / ideal.norm()) < 0.02


def test_cmde_score_tends_to_the_cde_score_as_sigma_y_max_falls():
    problem = small_problem()
    x_sde = VESDE(0.01, 3.0)
    y = observation(problem)
    x_t = torch.randn(8, 3, generator=generator(10), dtype=F64)
    times = torch.full((8,), 0.3, dtype=F64)
    cde = problem.conditional_score(x_sde, y)(x_t, times)
    gaps = []
    for sigma_y_max in (0.1, 0.01, 0.001):
        cmde = problem.joint_score(MultiSpeedSDE(x_sde, VESDE(sigma_y_max / 2, sigma_y_max)))(x_t, times, y.expand(8, -1))
        gaps.append(float((cmde - cde).norm() / cde.norm()))
    # sigma_y adds sigma_y^2 to the observation noise (0.1^2): the gap falls like sigma_y_max^2
    assert gaps[0] > 1e-3 and gaps[1] < gaps[0] / 50 and gaps[2] < gaps[1] / 50 and gaps[2] < 1e-4, gaps


# ------------------------------------------------------------------------------------ sampler output
@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_exact_score_samplers_end_at_the_posterior(solver):
    # the ODE carries the prior's mismatch with p_T(x_T | y) (its mean, ~0.2 here) to t = 0 scaled down by
    # sqrt(posterior variance) / sigma_max: a large sigma_max makes it negligible
    problem = small_problem(mean=0.0)
    y = observation(problem)
    mean, cov = problem.sampling_moments(y, VESDE(1e-4, 1000.0), solver=solver, steps=300)
    post_mean, post_cov = problem.posterior(y)
    assert gaussian_w2(mean, cov, post_mean, post_cov) < 1e-3
    assert gaussian_kl(post_mean, post_cov, mean, cov) < 1e-4


@pytest.mark.parametrize("conditioning", ["fresh", "consistent"])
def test_sampling_moments_match_the_package_samplers(conditioning):
    """CDiffE's ideal score through Euler-Maruyama: the samples follow the exact moments of their
    conditioning mode (the modes differ by 10% in total variance), far from the posterior."""
    problem = GaussianInverseProblem.super_resolution(4, 2)
    x_sde = VESDE(0.005, 4.0)
    sde = MultiSpeedSDE(x_sde, x_sde)
    y = observation(problem, seed=0)
    n, steps = 4000, 200
    ys = y.float().expand(n, -1).contiguous()
    model = conditioned_model(problem.joint_score(sde), sde, ys, conditioning, generator(1), get_timesteps(x_sde, steps, "uniform_t"))
    x = mf.euler_maruyama(model, x_sde, None, steps, model_output="score", shape=(n, problem.dim), generator=generator(2)).double()
    mean, cov = x.mean(0), torch.cov(x.T)
    exact = {mode: problem.sampling_moments(y, x_sde, x_sde, mode) for mode in ("fresh", "consistent")}
    other = "consistent" if conditioning == "fresh" else "fresh"
    variance_error = {mode: abs(float(torch.trace(cov) / torch.trace(exact[mode][1])) - 1) for mode in exact}
    assert variance_error[conditioning] < 0.03 and variance_error[other] > 0.06, variance_error
    assert float((mean - exact[conditioning][0]).norm()) < 0.03
    assert gaussian_w2(mean, cov, *problem.posterior(y)) > 0.5


def test_gaussian_distances_against_one_dimensional_formulas():
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 1.7
    args = (torch.tensor([m1], dtype=F64), torch.tensor([[v1]], dtype=F64), torch.tensor([m2], dtype=F64), torch.tensor([[v2]], dtype=F64))
    assert math.isclose(gaussian_w2(*args), math.hypot(m1 - m2, math.sqrt(v1) - math.sqrt(v2)), rel_tol=1e-12)
    assert math.isclose(gaussian_kl(*args), 0.5 * (v1 / v2 + (m1 - m2) ** 2 / v2 - 1 + math.log(v2 / v1)), rel_tol=1e-12)
    problem = small_problem()
    assert gaussian_w2(problem.mean, problem.cov, problem.mean, problem.cov) < 1e-7
    assert abs(gaussian_kl(problem.mean, problem.cov, problem.mean, problem.cov)) < 1e-12


def test_gaussian_problem_bad_inputs():
    problem = small_problem()
    y = observation(problem)
    cases = [
        (lambda: GaussianInverseProblem(problem.mean, -problem.cov, problem.operator, 0.1), ValueError, "cov"),
        (lambda: GaussianInverseProblem(problem.mean, problem.cov, problem.operator[:, :2], 0.1), ValueError, "operator"),
        (lambda: GaussianInverseProblem(problem.mean, problem.cov, problem.operator, -1.0), ValueError, "noise_std"),
        (lambda: GaussianInverseProblem.super_resolution(5, 2), ValueError, "factor"),
        (lambda: GaussianInverseProblem.inpainting(4, 4), ValueError, "hole"),
        (lambda: problem.posterior(y[:1]), ValueError, "y"),
        (lambda: problem.conditional_score(MRSDE(0.3), y), ValueError, "x_sde"),
        (lambda: problem.joint_score(VESDE()), TypeError, "sde"),
        (lambda: problem.sampling_moments(y, VESDE(), conditioning="fresh"), ValueError, "conditioning"),
        (lambda: problem.sampling_moments(y, VESDE(), VESDE(), conditioning="mean"), ValueError, "conditioning"),
        (lambda: problem.sampling_moments(y, VESDE(), solver="euler"), ValueError, "solver"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()


# ------------------------------------------------------------------------------------ Gaussian mixture
def test_gaussian_mixture_denoiser_is_the_score_of_its_marginal():
    sde = MRSDE(0.3, "cosine")
    means = torch.randn(3, 4, generator=generator(12), dtype=F64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    mixture = GaussianMixture(means, 0.25, weights)
    x_t = torch.randn(5, 4, generator=generator(13), dtype=F64)
    mu = torch.rand(5, 4, generator=generator(14), dtype=F64)
    t = 0.4
    alpha, sigma = float(sde.alpha(t)), float(sde.sigma(t))
    got = mixture.denoiser(sde, "score")(x_t, torch.full((5,), t, dtype=F64), mu)
    for b in range(5):
        point = x_t[b].clone().requires_grad_(True)
        components = torch.distributions.MultivariateNormal(alpha * means + (1 - alpha) * mu[b], covariance_matrix=(alpha**2 * 0.25**2 + sigma**2) * torch.eye(4, dtype=F64))
        torch.logsumexp(torch.log(weights) + components.log_prob(point), 0).backward()
        assert torch.allclose(got[b], point.grad, atol=1e-9, rtol=1e-8)


def test_gaussian_mixture_limits():
    sde = VESDE(0.01, 5.0)
    x_t = torch.randn(6, 4, generator=generator(15), dtype=F64)
    t = torch.full((6,), 0.3, dtype=F64)
    one = GaussianMixture(torch.full((1, 4), 0.4, dtype=F64), 0.2).data_prediction(sde, x_t, t, None)
    assert torch.allclose(one, GaussianData(0.4, 0.2).data_prediction(sde, x_t, t, None), atol=1e-12)
    points = torch.randn(5, 4, generator=generator(16), dtype=F64)
    narrow = GaussianMixture(points, 1e-8).data_prediction(sde, x_t, t, None)
    assert torch.allclose(narrow, FiniteData(points).data_prediction(sde, x_t, t, None), atol=1e-10)
    draws = GaussianMixture(points, 0.3).sample(200_000, generator(17))
    assert torch.allclose(draws.mean(0), points.mean(0), atol=0.01)
    assert torch.allclose(draws.var(0), points.var(0, unbiased=False) + 0.09, atol=0.02)
    with pytest.raises(ValueError, match="std"):
        GaussianMixture(points, 0.0)


# ------------------------------------------------------------------------------------ midpoint form
def midpoint_step(solver, prediction, sde, s, t, lam_previous, x, q0, q1, z, mu):
    """One DPM-Solver++(2M)-style midpoint step, written out as diffusers and k-diffusion do (float64)."""
    alpha_s, alpha_t, sigma_s, sigma_t = (float(v) for v in (sde.alpha(s), sde.alpha(t), sde.sigma(s), sde.sigma(t)))
    lam_s, lam_t = float(sde.lam(s)), float(sde.lam(t))
    h, h_previous = lam_t - lam_s, lam_s - lam_previous
    r = h_previous / h
    d0, d1 = q0, (q0 - q1) / r
    x, mu = x - mu, mu  # the linear-SDE steps act on x - mu; the data prediction enters as q - mu
    if prediction == "data":
        d0, d1 = d0 - mu, d1
    if (solver, prediction) == ("ode", "data"):
        step = sigma_t / sigma_s * x - alpha_t * math.expm1(-h) * d0 - 0.5 * alpha_t * math.expm1(-h) * d1
    elif (solver, prediction) == ("ode", "noise"):
        step = alpha_t / alpha_s * x - sigma_t * math.expm1(h) * d0 - 0.5 * sigma_t * math.expm1(h) * d1
    elif (solver, prediction) == ("sde", "data"):
        step = (sigma_t / sigma_s * math.exp(-h) * x + alpha_t * -math.expm1(-2 * h) * d0 + 0.5 * alpha_t * -math.expm1(-2 * h) * d1
                + sigma_t * math.sqrt(-math.expm1(-2 * h)) * z)
    else:
        step = alpha_t / alpha_s * x - 2 * sigma_t * math.expm1(h) * d0 - sigma_t * math.expm1(h) * d1 + sigma_t * math.sqrt(math.expm1(2 * h)) * z
    return step + mu


@pytest.mark.parametrize("solver", ["ode", "sde"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_midpoint_step_matches_an_independent_implementation(solver, prediction):
    sde = MRSDE(0.4, "cosine")
    g = generator(18)
    x, q0, q1, z, mu = (torch.randn(7, generator=g, dtype=F64) for _ in range(5))
    s, t, previous = 0.5, 0.35, 0.62
    a, weights, m, noise = step_coefficients(solver, prediction, 2, sde, s, t, [float(sde.lam(previous))], multistep="midpoint")
    got = a * x + weights[0] * q0 + weights[1] * q1 + m * mu + noise * z
    want = midpoint_step(solver, prediction, sde, s, t, float(sde.lam(previous)), x, q0, q1, z, mu)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)
    heun = step_coefficients(solver, prediction, 2, sde, s, t, [float(sde.lam(previous))])
    assert abs(heun[1][1] - weights[1]) > 1e-4  # the two forms differ at second order
    assert step_coefficients(solver, prediction, 1, sde, s, t, [], multistep="midpoint") == step_coefficients(solver, prediction, 1, sde, s, t, [])


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_midpoint_sampler_runs_the_midpoint_step(prediction):
    """Two ODE steps of MRSampler(multistep="midpoint") against the written-out first- and midpoint steps."""
    sde = MRSDE(0.4, "cosine")
    data = FiniteData(torch.randn(3, 5, generator=generator(19), dtype=F64) * 0.5)
    mu = torch.randn(2, 5, generator=generator(20), dtype=F64)
    x_T = sde.prior(mu, generator(21))
    times = [1.0, 0.6, 0.3]
    model = data.denoiser(sde, prediction)
    got = MRSampler(sde, 2, solver="ode", order=2, prediction=prediction, model_output=prediction, timesteps=times, multistep="midpoint",
                    lower_order_final=False).sample(model, mu, x_T=x_T)
    q_T = model(x_T, torch.full((2,), 1.0, dtype=F64), mu)
    # the first step is first order: the midpoint step with D1 = 0
    x_1 = midpoint_step("ode", prediction, sde, 1.0, 0.6, float("-inf"), x_T, q_T, q_T, None, mu)
    q_1 = model(x_1, torch.full((2,), 0.6, dtype=F64), mu)
    want = midpoint_step("ode", prediction, sde, 0.6, 0.3, float(sde.lam(1.0)), x_1, q_1, q_T, None, mu)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


@pytest.fixture(scope="module")
def ode_problem():
    """test_samplers.py's convergence-order problem: (sde, data, mu, x_T, the ODE solution at t = 0.1)."""
    sde = MRSDE(0.5, "cosine")
    data = FiniteData(torch.randn(3, 8, generator=generator(5), dtype=F64) * 0.5)
    mu = torch.randn(4, 8, generator=generator(2), dtype=F64)
    x_T = sde.prior(mu, generator(1))
    return sde, data, mu, x_T, reference_ode_solution(data.denoiser(sde, "data"), sde, x_T, sde.T, 0.1, mu, steps=500)


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_midpoint_form_is_second_order(prediction, ode_problem):
    sde, data, mu, x_T, exact = ode_problem
    nfes = [32, 64, 128]
    errors = []
    for nfe in nfes:
        sampler = MRSampler(sde, nfe, solver="ode", order=2, prediction=prediction, model_output="noise", t_end=0.1, multistep="midpoint")
        errors.append(float((sampler.sample(data.denoiser(sde, "noise"), mu, x_T=x_T) - exact).abs().max()))
    slope = -(math.log(errors[-1]) - math.log(errors[0])) / (math.log(nfes[-1]) - math.log(nfes[0]))
    assert abs(slope - 2) < 0.3, (slope, errors)


def test_midpoint_sde_reproduces_gaussian_moments():
    sde = MRSDE(0.3, "cosine")
    data = GaussianData(0.4, 0.25)
    mu = torch.rand(1, 6, generator=generator(22)).expand(6000, 6).contiguous()
    x = MRSampler(sde, 100, solver="sde", order=2, multistep="midpoint").sample(data.denoiser(sde, "noise"), mu, generator=generator(23))
    assert abs(float(x.mean()) - 0.4) < 0.01
    assert abs(float(x.std(0).mean()) / 0.25 - 1) < 0.03


def test_multistep_is_checked():
    with pytest.raises(ValueError, match="multistep"):
        MRSampler(VESDE(), 10, multistep="taylor")
    with pytest.raises(ValueError, match="multistep"):
        step_coefficients("ode", "data", 2, VESDE(), 0.5, 0.4, [1.0], multistep="Midpoint")
    assert "multistep='midpoint'" in repr(MRSampler(VESDE(), 10, multistep="midpoint"))
