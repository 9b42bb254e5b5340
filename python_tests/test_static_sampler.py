"""The static sampling loop (MRSampler(loop="static" / "graph" / "compile")) against MRSampler.sample's
eager loop: the same output bit for bit on the CPU (to float rounding compiled or graphed), the same
divergence guard, the same generator use."""

import pytest
import torch

from msdiff_fast.samplers import MRSampler
from msdiff_fast.samplers.loop import seed_from
from msdiff_fast.samplers.static import StaticMRSampler, plan_loop, stream_noise
from msdiff_fast.sde import MRSDE, VESDE, VPSDE
from msdiff_fast.testing import FiniteData

SHAPE = (3, 2, 5, 7)  # odd sizes: kernel tails and a batch that is not a multiple of anything
CUDA = torch.cuda.is_available()


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def finite_model(sde, kind, dtype):
    """The exact denoiser of a few points, returning ``kind`` (deterministic: no state between calls)."""
    data = FiniteData(torch.rand(5, *SHAPE[1:], generator=generator(11), dtype=torch.float64))
    exact = data.denoiser(sde, kind)
    return lambda x, t, mu: exact(x.double(), t.double(), None if mu is None else mu.double()).to(dtype)


def degraded(sde, dtype, device="cpu", seed=3):
    """mu for a mean-reverting SDE, None for VE/VP."""
    return torch.rand(SHAPE, generator=generator(seed), dtype=torch.float32).to(device, dtype) if sde.mean_reverting else None


def both_loops(sde, steps, model, mu, loop="static", seed=5, **options):
    """(eager, static) samples from the same generator seed, and the two generators afterwards."""
    results, generators = [], []
    for which in ("eager", loop):
        g = generator(seed)
        shape = None if mu is not None else SHAPE
        results.append(MRSampler(sde, steps, loop=which, **options).sample(model, mu, generator=g, shape=shape))
        generators.append(g)
    return results, generators


MR = MRSDE(0.4, "cosine")
IRSDE = MRSDE.from_irsde(50, 100, "cosine", 0.005, "mrs")
CONFIGURATIONS = [
    # (sde, solver, order, prediction, model_output, timesteps, steps)
    (MR, "ode", 1, "data", "noise", "uniform_lambda", 6),
    (MR, "ode", 2, "data", "noise", "uniform_lambda", 10),
    (MR, "ode", 3, "data", "velocity", "karras", 12),
    (MR, "ode", 3, "noise", "data", "uniform_t", 7),
    (IRSDE, "ode", 2, "noise", "noise", "uniform_lambda", 5),
    (IRSDE, "ode", 3, "data", "noise", [100.0, 80, 55, 30, 12, 5, 2, 0], 7),
    (MR, "sde", 1, "data", "noise", "uniform_lambda", 8),
    (MR, "sde", 2, "data", "score", "uniform_t", 10),
    (IRSDE, "sde", 2, "data", "noise", "uniform_lambda", 5),
    (IRSDE, "sde", 2, "noise", "velocity", "karras", 20),
    (VPSDE(), "sde", 2, "data", "noise", "uniform_lambda", 9),
    (VPSDE(), "ode", 3, "data", "data", "uniform_t", 8),
    (VESDE(0.01, 10.0), "sde", 2, "data", "score", "uniform_lambda", 10),
    (VESDE(0.01, 10.0), "ode", 2, "noise", "noise", "karras", 6),
]


@pytest.mark.filterwarnings("ignore::msdiff_fast.samplers.UnstableSolverWarning")
@pytest.mark.parametrize("sde, solver, order, prediction, model_output, timesteps, steps", CONFIGURATIONS, ids=str)
def test_static_loop_equals_the_eager_loop_bit_for_bit(sde, solver, order, prediction, model_output, timesteps, steps):
    mu = degraded(sde, torch.float32)
    model = finite_model(sde, model_output, torch.float32)
    options = dict(solver=solver, order=order, prediction=prediction, model_output=model_output, timesteps=timesteps)
    (eager, static), (g_eager, g_static) = both_loops(sde, steps, model, mu, **options)
    assert static.dtype == eager.dtype and torch.isfinite(eager).all()
    assert torch.equal(static, eager)
    # the same draws from the generator: what follows the call is the same too
    assert torch.equal(torch.rand(4, generator=g_eager), torch.rand(4, generator=g_static))


@pytest.mark.parametrize("options", [
    dict(solver="sde", clip=(0.1, 0.9)),
    dict(solver="ode", order=3, prediction="noise", clip=(0.0, 1.0)),
    dict(solver="ode", threshold=0.8),
    dict(solver="ode", prediction="noise", threshold=0.9, clip=(0.0, 1.0)),
    dict(solver="sde", denoise_last=True),
    dict(solver="ode", order=3, prediction="noise", denoise_last=True, clip=(0.2, 0.8)),
    dict(solver="sde", lower_order_final=False, check_finite=False),
], ids=str)
def test_static_loop_supports_clip_threshold_and_denoise_last(options):
    mu = degraded(MR, torch.float32)
    model = finite_model(MR, "noise", torch.float32)
    (eager, static), _ = both_loops(MR, 8, model, mu, **options)
    assert torch.equal(static, eager)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", ["ode", "sde"])
def test_static_loop_equals_the_eager_loop_in_every_dtype(dtype, solver):
    mu = degraded(MR, dtype)
    (eager, static), _ = both_loops(MR, 7, finite_model(MR, "noise", dtype), mu, solver=solver)
    assert static.dtype == dtype and torch.equal(static, eager)


def test_static_loop_with_a_separate_condition_and_an_explicit_start():
    sde = VPSDE()
    model_calls = []

    def model(x, t, cond):
        model_calls.append(cond)
        return 0.3 * x + 0.1 * cond

    cond = torch.rand(SHAPE, generator=generator(1))
    x_T = torch.randn(SHAPE, generator=generator(2))
    eager = MRSampler(sde, 6).sample(model, None, x_T=x_T, cond=cond, generator=generator(4))
    static = MRSampler(sde, 6, loop="static").sample(model, None, x_T=x_T, cond=cond, generator=generator(4))
    assert torch.equal(static, eager)
    assert len(model_calls) == 12 and all(c is cond for c in model_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_predrawn_noise_gives_the_same_sample(dtype):
    """The CUDA-graph path draws every step's noise first (the seed then lives outside the graph):
    stream_noise must hold the normals each step draws itself, so the sample is unchanged."""
    mu = degraded(MR, dtype)
    sampler = MRSampler(MR, 6, solver="sde", loop="static")
    static = StaticMRSampler(sampler)
    model = finite_model(MR, "noise", dtype)
    x_T, seed = MR.prior(mu, generator(1)), seed_from(generator(2))
    drawn, _ = static.loop(model, x_T, mu, mu, seed)
    noise = stream_noise(seed, sampler.steps, x_T)
    assert noise.shape == (sampler.steps, *SHAPE)
    predrawn, _ = static.loop(model, x_T, mu, mu, 0, noise=noise)
    assert torch.equal(predrawn, drawn)
    assert torch.equal(drawn, sampler.run_eager(model, x_T, mu, mu, seed))


def test_the_plan_releases_what_no_later_step_reads():
    sampler = MRSampler(MR, 12, solver="ode", order=3, clip=(0.0, 1.0))
    plan = plan_loop(sampler, has_mu=True)
    released, live, most_live = [], {plan.start}, 0
    for step in plan.steps:
        for slot in [step.state] + [t for call in step.calls for t in (call.x, *call.terms)]:
            assert slot not in released, f"{slot} read after it was released"
        live |= {step.output} | {call.out for call in step.calls}
        most_live = max(most_live, len(live))
        released += step.released
        live -= set(step.released)
    assert len(released) == len(set(released))
    assert live == {plan.result}
    # order 3 reads two steps of history: (state, output, clipped data prediction) of at most three steps
    assert most_live <= 3 * 3


def nan_at(sde, steps, nan_step):
    """A model that returns NaN at the time of step ``nan_step`` (1-based), whenever it is called."""
    times = MRSampler(sde, steps).timesteps

    def model(x, t, mu):  # no host synchronisation: CUDA-graph capturable
        bad = torch.isclose(t.double(), times[nan_step - 1].to(t.device)).reshape(-1, *[1] * (x.ndim - 1))
        return torch.where(bad, torch.full_like(x, float("nan")), 0.1 * x)

    return model


@pytest.mark.parametrize("loop", ["eager", "static"])
def test_divergence_guard_names_the_step(loop):
    # the eager loop checks the network's output of every step; the static one replays eagerly to name it
    with pytest.raises(FloatingPointError, match=r"MRSampler: the model's output at step 3/10 \(t .*\) holds NaN or inf"):
        MRSampler(MR, 10, loop=loop).sample(nan_at(MR, 10, 3), torch.zeros(2, 3), generator=generator(0))


def test_divergence_guard_catches_values_beyond_the_limit_and_names_the_step():
    def model(x, t, mu):
        return torch.full_like(x, 1e9) if float(t[0]) < 0.5 else 0.1 * x

    for loop in ("eager", "static"):
        with pytest.raises(FloatingPointError, match=r"step \d+/10 .* values up to"):
            MRSampler(MR, 10, solver="ode", prediction="noise", loop=loop).sample(model, torch.zeros(2, 3), generator=generator(0))


def test_divergence_guard_off_returns_the_nan():
    x = MRSampler(MR, 10, loop="static", check_finite=False).sample(nan_at(MR, 10, 3), torch.zeros(2, 3), generator=generator(0))
    assert torch.isnan(x).all()


def test_divergence_that_the_replay_does_not_reproduce_is_reported():
    calls = []

    def flaky(x, t, mu):
        calls.append(1)
        return torch.full_like(x, float("nan")) if len(calls) == 2 else 0.1 * x

    with pytest.raises(FloatingPointError, match="replaying it step by step did not"):
        MRSampler(MR, 5, loop="static").sample(flaky, torch.zeros(2, 3), generator=generator(0))
    assert len(calls) == 10  # the static run, then the eager replay


def test_bad_arguments():
    mu = torch.zeros(2, 3)
    model = lambda x, t, m: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="loop: expected one of"):
        MRSampler(MR, 5, loop="compiled")
    with pytest.raises(ValueError, match="callback, progress"):
        MRSampler(MR, 5, loop="static").sample(model, mu, callback=print)
    with pytest.raises(ValueError, match="callback, progress"):
        MRSampler(MR, 5, loop="static").sample(model, mu, progress=True)
    with pytest.raises(ValueError, match="loop: 'graph' .* CUDA tensors"):
        MRSampler(MR, 5, loop="graph").sample(model, mu, generator=generator(0))
    with pytest.raises(ValueError, match="model"):
        MRSampler(MR, 5, loop="static").sample(lambda x, t, m: x[:1], mu)
    with pytest.raises(TypeError, match="sampler"):
        StaticMRSampler("sampler")
    with pytest.raises(TypeError, match="graph"):
        StaticMRSampler(MRSampler(MR, 5), graph="yes")
    with pytest.raises(TypeError, match="compile"):
        StaticMRSampler(MRSampler(MR, 5), compile=1)
    with pytest.raises(ValueError, match="graph, compile: expected at most one"):
        StaticMRSampler(MRSampler(MR, 5), graph=True, compile=True)


# --------------------------------------------------------------------------- one compiled function
def affine_model(x, t, mu):
    return 0.3 * x - 0.2 * mu * t.reshape(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("solver", ["ode", "sde"])
def test_compiled_loop_matches_the_static_loop(solver):
    mu = degraded(MR, torch.float32)
    compiled = MRSampler(MR, 6, solver=solver, loop="compile")
    for seed in (5, 6):
        static = MRSampler(MR, 6, solver=solver, loop="static").sample(affine_model, mu, generator=generator(seed))
        # the noise is drawn outside the compiled function: another seed is new data, not a new program
        with torch._dynamo.config.patch(error_on_recompile=seed == 6):
            out = compiled.sample(affine_model, mu, generator=generator(seed))
        torch.testing.assert_close(out, static, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(solver="sde", clip=(0.0, 1.0)),
    dict(solver="ode", order=3, prediction="noise", threshold=0.9, denoise_last=True),
], ids=str)
def test_the_loop_compiles_to_one_graph(options):
    """No graph break anywhere in the loop (the fused steps included): one program, not NFE pieces."""
    sampler = MRSampler(MR, 6, **options)
    static = StaticMRSampler(sampler)
    mu = degraded(MR, torch.float32)
    x = MR.prior(mu, generator(1))
    static.coefficients(static.plan(True), x)
    noise = stream_noise(3, sampler.steps, x) if options["solver"] == "sde" else None
    explained = torch._dynamo.explain(static.loop)(affine_model, x, mu, mu, 0, noise)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_loop_with_the_fast_network():
    """FastNetwork's channels-last inputs and inference mode inside the compiled loop: still one graph, the static
    loop's sample."""
    from msdiff_fast.models import FastNetwork

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x) * t.reshape(-1, 1, 1, 1)

    torch.manual_seed(0)
    fast = FastNetwork(Net())
    model = lambda x, t, m: fast(torch.cat([x - m, m], dim=1), t)  # noqa: E731
    mu = degraded(MR, torch.float32)
    static = MRSampler(MR, 6, loop="static").sample(model, mu, generator=generator(1))
    compiled = MRSampler(MR, 6, loop="compile")
    torch.testing.assert_close(compiled.sample(model, mu, generator=generator(1)), static, rtol=1e-5, atol=1e-6)
    loop = compiled._static
    x = MR.prior(mu, generator(2))
    explained = torch._dynamo.explain(loop.loop)(model, x, mu, mu, 0, stream_noise(3, 6, x))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_loop_guard_names_the_step():
    with pytest.raises(FloatingPointError, match=r"step 3/10"):
        MRSampler(MR, 10, loop="compile").sample(nan_at(MR, 10, 3), torch.zeros(2, 3), generator=generator(0))


# --------------------------------------------------------------------------- CUDA graphs
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("solver", ["ode", "sde"])
def test_graph_loop_matches_the_eager_loop_on_cuda(solver):
    device = torch.device("cuda")
    mu = degraded(MR, torch.float32, device)
    net = torch.nn.Conv2d(4, 2, 3, padding=1).to(device)
    model = lambda x, t, m: net(torch.cat([x - m, m], dim=1)) * t.reshape(-1, 1, 1, 1)  # noqa: E731
    graph_sampler = MRSampler(MR, 10, solver=solver, loop="graph")
    with torch.no_grad():
        for seed in (5, 6):  # the first call captures, the second replays with another seed
            eager = MRSampler(MR, 10, solver=solver).sample(model, mu, generator=torch.Generator(device).manual_seed(seed))
            graphed = graph_sampler.sample(model, mu, generator=torch.Generator(device).manual_seed(seed))
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        other_mu = torch.rand_like(mu)
        eager = MRSampler(MR, 10, solver=solver).sample(model, other_mu, generator=torch.Generator(device).manual_seed(7))
        graphed = graph_sampler.sample(model, other_mu, generator=torch.Generator(device).manual_seed(7))
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert len(graph_sampler._static._graphs) == 1


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_graph_loop_guard_names_the_step_on_cuda():
    device = torch.device("cuda")
    with pytest.raises(FloatingPointError, match="step 4/8"):
        MRSampler(MR, 8, loop="graph").sample(nan_at(MR, 8, 4), torch.zeros(2, 3, device=device), generator=torch.Generator(device).manual_seed(0))
