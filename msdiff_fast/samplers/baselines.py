"""The slow reference samplers, correctly respaced, on the same fused step as MR Sampler.

- ``posterior_sample``: IR-SDE's optimal posterior step q(x_t | x_s, x0_hat) (DA-CLIP's sampler);
- ``euler_maruyama``: Euler-Maruyama on the reverse SDE;
- ``probability_flow_euler``: Euler on the probability-flow ODE;
- ``pc_sample``: predictor-corrector (reverse diffusion + Langevin, corrector first), the
  sampler of Song et al. and Batzolis et al., for VE/VP and multi-speed (CMDE) models.

All take a model(x_t, t, c) returning ``model_output`` and time grids from ``get_timesteps``.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from ..sde import VESDE, LinearSDE, MultiSpeedSDE, check_sde, randn_like
from .combination import Combination
from .loop import call_model, check_generator, check_state, divergence_limit, initial_state, seed_from
from .parameterization import KINDS, check_kind, prediction_coefficients
from .timesteps import check_steps, get_timesteps

Times = Union[str, Sequence[float], torch.Tensor]


@dataclass(frozen=True)
class BaselineOptions:
    """The keyword settings of ``posterior_sample``, ``euler_maruyama`` and ``probability_flow_euler``.

    model_output: what the model returns (noise, data, velocity, score); timesteps, t_end: the time
    grid (``get_timesteps``); x_T: the start (default: drawn from the prior with ``generator``,
    which also seeds the noise); callback: called with {"i", "t", "x"} after every step; progress:
    a tqdm bar; shape: the sample shape when neither mu nor x_T is given; cond: what the model
    receives as its condition (default mu); backend: of the fused step; clip: (low, high) of the result.
    """

    model_output: str = "noise"
    timesteps: Times = "uniform_t"
    t_end: Optional[float] = None
    x_T: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    callback: Optional[Callable[[dict], None]] = None
    progress: bool = False
    shape: Optional[Sequence[int]] = None
    cond: Optional[torch.Tensor] = None
    backend: str = "auto"
    clip: Optional[Tuple[float, float]] = None


def _prepare(sde, steps: int, mu, options: BaselineOptions):
    if isinstance(sde, MultiSpeedSDE):
        sde = sde.x
    check_sde(sde)
    check_kind("model_output", options.model_output, KINDS)
    sde.check_mu(mu)
    ts = get_timesteps(sde, steps, options.timesteps, t_end=options.t_end)
    check_generator(options.generator)
    return sde, ts, initial_state(sde, mu, options.x_T, options.shape, options.generator)


def _form(sde, s, model_output, kind, output, x, mu) -> Combination:
    c_out, c_x, c_mu = (float(c) for c in prediction_coefficients(sde, s, model_output, kind))
    return Combination([(output, c_out), (x, c_x), (mu, c_mu)])


def posterior_sample(model, sde: LinearSDE, mu: Optional[torch.Tensor] = None, steps: int = 100, **options) -> torch.Tensor:
    """Ancestral sampling from the exact Gaussian posterior of x_t given x_s and x0 = x0_hat
    (``options``: the keywords of ``BaselineOptions``).

    For y = x - mu, y_s | y_t ~ N((alpha_s / alpha_t) y_t, v) with v = sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2,
    so q(y_t | y_s, y0) has precision 1 / sigma_t^2 + (alpha_s / alpha_t)^2 / v and mean
    var * (alpha_t y0 / sigma_t^2 + (alpha_s / alpha_t) y_s / v): the IR-SDE posterior for any step size.
    """
    options = BaselineOptions(**options)
    sde, ts, x = _prepare(sde, steps, mu, options)
    if x.shape[0] == 0:
        return x.clone()
    condition = options.cond if options.cond is not None else mu
    seed, limit = seed_from(options.generator), divergence_limit(sde, mu)
    for i in tqdm(range(steps), disable=not options.progress, desc="posterior", leave=False):
        s, t = float(ts[i]), float(ts[i + 1])
        output = call_model(model, x, s, condition, i, steps, "posterior_sample")
        x0 = _form(sde, s, options.model_output, "data", output, x, mu)
        alpha_s, alpha_t, sigma_s, sigma_t = (float(v) for v in (sde.alpha(s), sde.alpha(t), sde.sigma(s), sde.sigma(t)))
        ratio = alpha_s / alpha_t
        transition_var = sigma_s**2 - ratio**2 * sigma_t**2
        if sigma_t == 0.0:
            keep_x, keep_x0, std = 0.0, alpha_t, 0.0
        else:
            var = 1 / (1 / sigma_t**2 + ratio**2 / transition_var)
            keep_x, keep_x0, std = var * ratio / transition_var, var * alpha_t / sigma_t**2, math.sqrt(var)
        update = Combination([(x, keep_x), (mu, 1 - keep_x - keep_x0)]) + x0.scaled(keep_x0)
        x = update.evaluate(x, std, seed=seed, offset=i * x.numel(), backend=options.backend)
        check_state(x, limit, i, steps, s, t, "posterior_sample")
        if options.callback is not None:
            options.callback({"i": i, "t": t, "x": x})
    return x.clamp(*options.clip) if options.clip is not None else x


def euler_maruyama(model, sde: LinearSDE, mu: Optional[torch.Tensor] = None, steps: int = 100, **options) -> torch.Tensor:
    """x_t = x_s - [f_s (x_s - mu) - g_s^2 score] (s - t) + g_s sqrt(s - t) z (``options``: ``BaselineOptions``)."""
    return _euler(model, sde, mu, steps, BaselineOptions(**options), stochastic=True)


def probability_flow_euler(model, sde: LinearSDE, mu: Optional[torch.Tensor] = None, steps: int = 100, **options) -> torch.Tensor:
    """x_t = x_s - [f_s (x_s - mu) - g_s^2 score / 2] (s - t) (``options``: ``BaselineOptions``)."""
    return _euler(model, sde, mu, steps, BaselineOptions(**options), stochastic=False)


def _euler(model, sde, mu, steps: int, options: BaselineOptions, stochastic: bool):
    sde, ts, x = _prepare(sde, steps, mu, options)
    if x.shape[0] == 0:
        return x.clone()
    condition = options.cond if options.cond is not None else mu
    seed, limit = seed_from(options.generator), divergence_limit(sde, mu)
    name = "euler_maruyama" if stochastic else "probability_flow_euler"
    for i in tqdm(range(steps), disable=not options.progress, desc=name, leave=False):
        s, t = float(ts[i]), float(ts[i + 1])
        dt = s - t
        output = call_model(model, x, s, condition, i, steps, name)
        score = _form(sde, s, options.model_output, "score", output, x, mu)
        f, g2 = float(sde.f(s)), float(sde.g2(s))
        score_weight = g2 if stochastic else 0.5 * g2
        update = Combination([(x, 1 - f * dt), (mu, f * dt)]) + score.scaled(score_weight * dt)
        noise = math.sqrt(g2 * dt) if stochastic else 0.0
        x = update.evaluate(x, noise, seed=seed, offset=i * x.numel(), backend=options.backend)
        check_state(x, limit, i, steps, s, t, name)
        if options.callback is not None:
            options.callback({"i": i, "t": t, "x": x})
    return x.clamp(*options.clip) if options.clip is not None else x


def conditioned_model(
    model,
    sde: MultiSpeedSDE,
    y: torch.Tensor,
    mode: str = "fresh",
    generator: Optional[torch.Generator] = None,
    times: Optional[torch.Tensor] = None,
):
    """model(x_t, t, y_t) of a multi-speed (CDiffE / CMDE) network as model(x_t, t, _) for a sampler.

    mode "clean": y_t = y (CDE); "fresh": a new y_t = a_y y + s_y z at every call (the reference
    code); "consistent": one forward path of y, drawn once on the grid ``times`` (increasing
    noise increments, so y_t at a later time is y_s plus independent noise), looked up by t.
    """
    if mode not in ("clean", "fresh", "consistent"):
        raise ValueError(f"mode: expected 'clean', 'fresh' or 'consistent', got {mode!r}")
    if mode == "clean":
        return lambda x_t, t, _: model(x_t, t, y)
    if mode == "fresh":

        def fresh(x_t, t, _):
            mean, std = sde.y.marginal(y, t.double())
            return model(x_t, t, mean + std * randn_like(y, generator))

        return fresh
    if times is None:
        raise ValueError("times: expected the sampler's time grid for mode='consistent', got None")
    ascending = torch.sort(torch.as_tensor(times, dtype=torch.float64).unique()).values
    variances = sde.y.sigma(ascending) ** 2 / sde.y.alpha(ascending) ** 2
    increments = torch.cat([variances[:1], variances[1:] - variances[:-1]]).clamp_min(0).sqrt()
    # w(t) = y_t / alpha_y(t) - y is a Brownian path in the variance sigma^2 / alpha^2
    path = torch.cumsum(torch.stack([c * randn_like(y, generator) for c in increments]), 0)

    def consistent(x_t, t, _):
        t_host = t.double().cpu()
        distance, index = (ascending[None] - t_host[:, None]).abs().min(dim=1)
        if (distance > 1e-6 * t_host.abs().clamp_min(1)).any():
            raise ValueError(f"t: expected times on the consistent path's grid, got t = {float(t_host[distance.argmax()])}")
        alpha = sde.y.alpha(ascending[index]).to(y.device, y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
        return model(x_t, t, alpha * (y + path[index.to(y.device), torch.arange(y.shape[0], device=y.device)]))

    return consistent


def pc_sample(
    model: Callable,
    sde: Union[LinearSDE, MultiSpeedSDE],
    y: Optional[torch.Tensor] = None,
    steps: int = 1000,
    *,
    snr: float = 0.15,
    corrector_steps: int = 1,
    conditioning: str = "fresh",
    model_output: str = "score",
    t_end: Optional[float] = None,
    x_T=None,
    shape=None,
    generator=None,
    callback=None,
    progress=False,
    clip=(0.0, 1.0),
    backend="auto",
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al.; the reference sampler of Batzolis et al.).

    Each of ``steps`` steps on linspace(T, t_end): ``corrector_steps`` Langevin corrector steps
    (step size 2 alpha_i (snr ||z|| / ||score||)^2 with batch-mean norms), then the reverse
    diffusion predictor. Returns the last predictor mean (no noise), clipped to ``clip``:
    steps * (1 + corrector_steps) network calls. For a MultiSpeedSDE the network is called as
    model(x_t, t, y_t) with y_t from ``conditioning`` (see ``conditioned_model``); for a plain
    SDE as model(x_t, t, y).
    """
    check_steps(steps)  # before the time grid below is allocated
    check_generator(generator)
    if isinstance(sde, MultiSpeedSDE):
        x_sde = sde.x
        times = torch.linspace(float(x_sde.T), float(x_sde.t_end if t_end is None else t_end), steps + 1, dtype=torch.float64)
        net = (
            conditioned_model(model, sde, y, conditioning, generator, times)
            if y is not None
            else (lambda x_t, t, _: model(x_t, t, None))
        )
    else:
        x_sde, net = sde, (lambda x_t, t, _: model(x_t, t, y))
    if x_sde.mean_reverting:
        raise ValueError(
            "sde: pc_sample is the VE/VP reference sampler; for mean-reverting SDEs use posterior_sample or MRSampler"
        )
    check_kind("model_output", model_output, KINDS)
    if not snr > 0 or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"snr, corrector_steps: expected snr > 0 and an int >= 0, got {snr!r}, {corrector_steps!r}")
    ts = get_timesteps(x_sde, steps, "uniform_t", t_end=t_end)
    x = initial_state(
        x_sde,
        None,
        x_T,
        shape if x_T is not None or y is None else (shape or y.shape),
        generator,
        None if y is None else y.device,
    )
    if y is not None and x_T is None:
        x = x.to(y.dtype)
    if x.shape[0] == 0:
        return x.clone()
    seed, limit = seed_from(generator), divergence_limit(x_sde, None)
    draws = 0
    x_mean = x
    for i in tqdm(range(steps), disable=not progress, desc="predictor-corrector", leave=False):
        s, t = float(ts[i]), float(ts[i + 1])
        for _ in range(corrector_steps):
            output = call_model(net, x, s, None, i, steps, "pc_sample (corrector)")
            score = _form(x_sde, s, model_output, "score", output, x, None).evaluate(x, backend=backend)
            z = Combination([(x, 0.0)]).evaluate(x, 1.0, seed=seed, offset=draws * x.numel(), backend=backend)
            draws += 1
            score_norm = _mean_norm(score)
            # a zero score (e.g. an untrained, zero-initialised network) has no direction to move in
            step = 2 * _langevin_alpha(x_sde, s, t) * (snr * _mean_norm(z) / score_norm) ** 2 if score_norm > 0 else 0.0
            x = Combination([(x, 1.0), (score, step), (z, math.sqrt(2 * step))]).evaluate(x, backend=backend)
            check_state(x, limit, i, steps, s, s, "pc_sample (corrector)")
        score = _form(x_sde, s, model_output, "score", call_model(net, x, s, None, i, steps, "pc_sample"), x, None)
        if isinstance(x_sde, VESDE):
            keep, g2 = 1.0, float(x_sde.sigma(s) ** 2 - x_sde.sigma(t) ** 2)
        else:
            keep, g2 = 1 - float(x_sde.f(s)) * (s - t), float(x_sde.g2(s)) * (s - t)
        x_mean = (Combination([(x, keep)]) + score.scaled(g2)).evaluate(x, backend=backend)
        x = Combination([(x_mean, 1.0)]).evaluate(x_mean, math.sqrt(g2), seed=seed, offset=draws * x.numel(), backend=backend)
        draws += 1
        check_state(x, limit, i, steps, s, t, "pc_sample")
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x_mean": x_mean})
    return x_mean.clamp(*clip) if clip is not None else x_mean


def _langevin_alpha(sde: LinearSDE, s: float, t: float) -> float:
    """Song et al.'s alpha_i: 1 for VE, 1 - beta_i = (alpha_s / alpha_t)^2 for VP-like SDEs."""
    return float(sde.alpha(s) / sde.alpha(t)) ** 2


def _mean_norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v.reshape(v.shape[0], -1).double(), dim=1).mean())
