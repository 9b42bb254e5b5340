"""MR Sampler: exponential-integrator solvers of the reverse mean-reverting (or VE/VP) diffusion.

With y = x - mu every linear SDE is an ordinary Gaussian diffusion with scale alpha and std sigma,
so the probability-flow ODE and the reverse SDE have semi-analytic solutions over a step from s
to t (h = lam_t - lam_s > 0): the linear part is exact and only the network's prediction is
extrapolated in lam (order 1: constant, order 2: linear from the previous output, order 3:
quadratic). Multistep: one network evaluation per step. The update formulas are those of
../shared/reference/mr_sampler.md section 3; every step is one fused ``mr_step`` call.

Two forms of the second-order step (``multistep``), both one evaluation per step and both of
order 2, differing in how the linear extrapolation q(lam) ~ q0 + (lam - lam_s) D1 / h of the
prediction enters the step (c0 q0 + c1 D1, c0 the first-order weight):
- "heun" (default): the extrapolation integrated exactly, c1 = the phi_2 weight of section 3. The
  MR Sampler code's form (DPM-Solver's "taylor", diffusers' "heun"); the drop-in class relies on it.
- "midpoint": the prediction held at its extrapolation to the step's midpoint, q0 + D1 / 2, i.e.
  c1 = c0 / 2 in all four solvers: DPM-Solver++(2M) as k-diffusion (sample_dpmpp_2m) and diffusers
  (solver_type="midpoint", their default) write it. The two weights differ by O(h^2) on D1 = O(h).
Third-order steps are the same in both; ``multistep`` applies to the steps that run at order 2.

One deliberate difference from DPM-Solver++(3M) as usually written: the third-order term carries
2 phi_3, not phi_3. D2 = (D1_0 - D1_1) / (r0 + r1) estimates h^2 q''/2, and integrating the
quadratic extrapolation exactly gives -2 phi_3 (data) or -2 sigma_t phi_3 (noise) on it; with
phi_3 the local error stays O(h^3) and the observed order falls to 2 (measured: 2.69, 2.57, 2.23
at NFE 10-80 with phi_3; 3.2 to 4 with 2 phi_3; python_tests/test_samplers.py checks 3 +- 0.3).
"""

import math
import warnings
from collections import deque
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from ..sde import LinearSDE, MultiSpeedSDE, check_sde
from .combination import Combination
from .loop import Model, call_model, check_generator, check_state, divergence_limit, initial_state, limit_data, seed_from
from .parameterization import KINDS, PREDICTIONS, check_kind, prediction_coefficients
from .static import StaticMRSampler
from .timesteps import get_timesteps

LOOPS = ("eager", "static", "graph", "compile")


class UnstableSolverWarning(UserWarning):
    """A solver configuration known to diverge (noise-prediction SDE with large steps)."""


MULTISTEP_FORMS = ("heun", "midpoint")


def step_coefficients(
    solver: str,
    prediction: str,
    order: int,
    sde: LinearSDE,
    s: float,
    t: float,
    previous_lams: Sequence[float],
    multistep: str = "heun",
):
    """Coefficients of x_t = A x_s + sum_j W[j] q_j + M mu + N z, q_0 the newest prediction.

    previous_lams: lam of the times of q_1, q_2 (as many as order - 1). multistep: the form of a
    second-order step, "heun" or "midpoint" (see the module docstring).
    """
    if multistep not in MULTISTEP_FORMS:
        raise ValueError(f"multistep: expected one of {MULTISTEP_FORMS}, got {multistep!r}")
    alpha_s, alpha_t = float(sde.alpha(s)), float(sde.alpha(t))
    sigma_s, sigma_t = float(sde.sigma(s)), float(sde.sigma(t))
    lam_s, lam_t = float(sde.lam(s)), float(sde.lam(t))
    h = lam_t - lam_s
    # sigma_t (e^h - 1) and sigma_t sqrt(e^2h - 1) as written, or their limits where sigma_t = 0
    # and h = inf (on a consistent schedule sigma_t e^h = alpha_t sigma_s / alpha_s)
    sigma_phi1 = sigma_t * math.expm1(h) if sigma_t > 0 else alpha_t * sigma_s / alpha_s
    sigma_noise = sigma_t * math.sqrt(math.expm1(2 * h)) if sigma_t > 0 else alpha_t * sigma_s / alpha_s
    if solver == "ode" and prediction == "data":
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        a = sigma_t / sigma_s
        c0, c1, c2 = -alpha_t * phi1, alpha_t * phi2, -2 * alpha_t * phi3
        m = 1 - a + a * alpha_s - alpha_t
        noise = 0.0
    elif solver == "ode":
        sigma_phi2 = sigma_phi1 / h - sigma_t
        sigma_phi3 = sigma_phi2 / h - 0.5 * sigma_t
        a = alpha_t / alpha_s
        c0, c1, c2 = -sigma_phi1, -sigma_phi2, -2 * sigma_phi3
        m = 1 - a
        noise = 0.0
    elif prediction == "data":
        phi1 = -math.expm1(-2 * h)
        phi2 = 1 - phi1 / (2 * h)
        a = sigma_t / sigma_s * math.exp(-h)
        c0, c1, c2 = alpha_t * phi1, alpha_t * phi2, 0.0
        m = 1 - a - alpha_t * phi1
        noise = sigma_t * math.sqrt(phi1)
    else:
        sigma_phi2 = sigma_phi1 / h - sigma_t
        a = alpha_t / alpha_s
        c0, c1, c2 = -2 * sigma_phi1, -2 * sigma_phi2, 0.0
        m = 1 - a
        noise = sigma_noise
    weights = [c0, 0.0, 0.0]
    if order == 2:
        if multistep == "midpoint":
            c1 = 0.5 * c0
        r0 = (lam_s - previous_lams[0]) / h
        weights[0] += c1 / r0
        weights[1] -= c1 / r0
    elif order == 3:
        r0 = (lam_s - previous_lams[0]) / h
        r1 = (previous_lams[0] - previous_lams[1]) / h
        # D1 = D1_0 + (D1_0 - D1_1) r0 / (r0 + r1), D2 = (D1_0 - D1_1) / (r0 + r1)
        on_d10 = c1 * (1 + r0 / (r0 + r1)) + c2 / (r0 + r1)
        on_d11 = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)
        weights[0] += on_d10 / r0
        weights[1] += -on_d10 / r0 + on_d11 / r1
        weights[2] -= on_d11 / r1
    return a, weights[:order], m, noise


class MRSampler:
    """Fast sampler for mean-reverting (and VE/VP) diffusion models: 5-20 network evaluations.

    solver "ode" (orders 1-3) or "sde" (orders 1-2); prediction "data" (stable, the default) or
    "noise"; model_output: what the network returns ("noise", "data", "velocity", "score");
    timesteps: "uniform_lambda", "uniform_t", "karras" or a list of steps + 1 times.
    denoise_last: return the last data prediction instead of integrating to t_end.
    clip: (low, high) clamp of every data prediction and of the result (None: no clamp);
    threshold: dynamic thresholding quantile for data predictions (Imagen), e.g. 0.995.
    lower_order_final: with fewer than 10 steps, lower the order of the last steps (more stable).
    multistep: the form of the second-order steps, "heun" (the MR Sampler code's, the default) or
    "midpoint" (DPM-Solver++(2M) as k-diffusion and diffusers write it); see the module docstring.
    check_finite: raise at the first step that produces NaN/inf or values beyond any sane range.
    loop: "eager" (a Python loop that checks every step), "static" (every coefficient precomputed
    on the device, no host synchronisation until the end; the same output bit for bit), "graph"
    (the static loop captured once as a CUDA graph per model and input shape, then replayed;
    CUDA tensors only) or "compile" (the static loop, model included, as one torch.compile'd
    function; compiled at the first call for a model and input shapes: minutes for a large
    network on a CPU; float rounding against the static loop). The static loops are planned at the first call, from the settings then:
    for other settings build another MRSampler. See ``samplers.static.StaticMRSampler``.
    """

    def __init__(
        self,
        sde: LinearSDE,
        steps: int,
        solver: str = "sde",
        order: int = 2,
        prediction: str = "data",
        model_output: str = "noise",
        timesteps: Union[str, Sequence[float], torch.Tensor] = "uniform_lambda",
        t_start: Optional[float] = None,
        t_end: Optional[float] = None,
        denoise_last: bool = False,
        clip: Optional[Sequence[float]] = None,
        threshold: Optional[float] = None,
        lower_order_final: bool = True,
        check_finite: bool = True,
        backend: str = "auto",
        multistep: str = "heun",
        loop: str = "eager",
    ):
        if isinstance(sde, MultiSpeedSDE):
            sde = sde.x
        check_sde(sde)
        if solver not in ("ode", "sde"):
            raise ValueError(f"solver: expected 'ode' or 'sde', got {solver!r}")
        max_order = 3 if solver == "ode" else 2
        if not isinstance(order, int) or not 1 <= order <= max_order:
            raise ValueError(f"order: expected an int in 1..{max_order} for solver {solver!r}, got {order!r}")
        check_kind("prediction", prediction, PREDICTIONS)
        check_kind("model_output", model_output, KINDS)
        if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
            raise ValueError(f"clip: expected (low, high) with low < high, got {clip!r}")
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"threshold: expected a quantile in (0, 1], got {threshold!r}")
        if multistep not in MULTISTEP_FORMS:
            raise ValueError(f"multistep: expected one of {MULTISTEP_FORMS}, got {multistep!r}")
        if loop not in LOOPS:
            raise ValueError(f"loop: expected one of {LOOPS}, got {loop!r}")
        self.sde, self.solver, self.order = sde, solver, order
        self.prediction, self.model_output = prediction, model_output
        self.timesteps = get_timesteps(sde, steps, timesteps, t_start, t_end)
        self.steps = steps
        self.denoise_last, self.clip, self.threshold = denoise_last, clip, threshold
        self.lower_order_final, self.check_finite, self.backend = lower_order_final, check_finite, backend
        self.multistep, self.loop = multistep, loop
        self._static = None
        self.lams = sde.lam(self.timesteps)
        if solver == "sde" and prediction == "noise":
            widest = float((self.lams[1:] - self.lams[:-1]).clamp(max=50).max())
            if widest > 1.0:
                warnings.warn(
                    f"MRSampler(solver='sde', prediction='noise') with {steps} steps takes log-SNR steps up to h = {widest:.2f}: "
                    f"its noise variance grows as sigma_t^2 (e^(2h) - 1) and the samples diverge from the data (MR Sampler paper, "
                    f"Rain100H at NFE 5-10). Use prediction='data' or more steps.",
                    UnstableSolverWarning,
                    stacklevel=2,
                )

    def __repr__(self):
        form = f", multistep={self.multistep!r}" if self.multistep != "heun" else ""
        return (
            f"MRSampler({self.sde!r}, steps={self.steps}, solver={self.solver!r}, order={self.order}, "
            f"prediction={self.prediction!r}, model_output={self.model_output!r}{form})"
        )

    @property
    def nfe(self) -> int:
        return self.steps

    def step_order(self, i: int) -> int:
        order = min(self.order, i + 1)
        if self.lower_order_final and self.steps < 10:
            order = min(order, self.steps - i)
        if math.isinf(float(self.lams[i + 1])):
            order = 1
        return max(order, 1)

    def sample(
        self,
        model: Model,
        mu: Optional[torch.Tensor] = None,
        x_T: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[dict], None]] = None,
        progress: bool = False,
        shape: Optional[Sequence[int]] = None,
        cond: Optional[torch.Tensor] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """Integrate from t_start to t_end and return x_0.

        model(x_t, t, c) returns ``model_output`` for x_t; t is a [B] float tensor; c is ``cond``
        if given, else mu. mu: the degraded image for mean-reverting SDEs (None for VE/VP).
        x_T: the start (default: a prior draw from ``generator``; ``shape`` when there is no mu,
        drawn on ``device``, default cond's device).
        callback receives {"i", "t", "x", "x0"} after every step (eager loop only, as is progress).
        """
        if self.loop != "eager" and (callback is not None or progress):
            raise ValueError(
                f"callback, progress: expected None and False with loop={self.loop!r} (per-step host work would synchronise "
                f"every step), got callback={callback!r}, progress={progress!r}; use loop='eager'"
            )
        sde = self.sde
        sde.check_mu(mu)
        check_generator(generator)
        x = initial_state(sde, mu, x_T, shape, generator, device if device is not None else getattr(cond, "device", None))
        if x.shape[0] == 0:  # an empty batch: nothing to sample, on every backend
            return x.clone()
        condition = cond if cond is not None else mu
        seed = seed_from(generator)
        if self.loop == "eager":
            return self.run_eager(model, x, mu, condition, seed, callback, progress)
        if self._static is None:
            self._static = StaticMRSampler(self, graph=self.loop == "graph", compile=self.loop == "compile")
        return self._static.run(model, x, mu, condition, seed)

    def run_eager(
        self, model: Model, x: torch.Tensor, mu, condition, seed: int, callback=None, progress: bool = False
    ) -> torch.Tensor:
        """The step-by-step loop from the start x with the noise seed ``seed`` (see ``sample``)."""
        history = deque(maxlen=max(self.order - 1, 1))
        limit = divergence_limit(self.sde, mu)
        for i in tqdm(range(self.steps), disable=not progress, desc="MR Sampler", leave=False):
            s, t = float(self.timesteps[i]), float(self.timesteps[i + 1])
            output = call_model(model, x, s, condition, i, self.steps, "MRSampler", check=self.check_finite)
            prediction = self.prediction_of(output, x, mu, s)
            if self.denoise_last and i == self.steps - 1:
                x0 = self.data_of(prediction, x, mu, s).evaluate(x, backend=self.backend)
                if self.check_finite:
                    check_state(x0, limit, i, self.steps, s, 0.0, "MRSampler (denoise_last)")
                return x0
            update, noise = self.update_of(i, x, mu, prediction, history)
            x0 = self.data_of(prediction, x, mu, s).evaluate(x, backend=self.backend) if callback is not None else None
            x = update.evaluate(x, noise, seed=seed, offset=i * x.numel(), backend=self.backend)
            if self.check_finite:
                check_state(x, limit, i, self.steps, s, t, "MRSampler")
            history.appendleft((float(self.lams[i]), prediction))
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "x0": x0})
        return x.clamp(*self.clip) if self.clip is not None else x

    # The methods below build each step from Combinations of whatever stands for the tensors:
    # real tensors in run_eager, placeholders when StaticMRSampler plans its loop, so both loops
    # run the same coefficient arithmetic.
    @property
    def limits_data(self) -> bool:
        """Whether data predictions are clipped or thresholded (then evaluated before the update)."""
        return self.clip is not None or self.threshold is not None

    def raw_prediction(self, output, x, mu, s: float) -> Combination:
        """What the network's output says at time s: the solver's prediction, or the data
        prediction when it is to be limited first."""
        kind = "data" if self.limits_data else self.prediction
        c_out, c_x, c_mu = (float(c) for c in prediction_coefficients(self.sde, s, self.model_output, kind))
        return Combination([(output, c_out), (x, c_x), (mu, c_mu)])

    def prediction_from_data(self, x0, x, mu, s: float) -> Combination:
        """The solver's prediction from a (limited) data prediction x0."""
        return self.converted(Combination([(x0, 1.0)]), "data", self.prediction, x, mu, s)

    def prediction_of(self, output, x, mu, s: float) -> Combination:
        """The solver's prediction at time s as a combination of (output, x, mu)."""
        raw = self.raw_prediction(output, x, mu, s)
        if not self.limits_data:
            return raw
        x0 = limit_data(raw.evaluate(x, backend=self.backend), self.clip, self.threshold)
        return self.prediction_from_data(x0, x, mu, s)

    def update_of(self, i: int, x, mu, prediction: Combination, history) -> Tuple[Combination, float]:
        """Step i's update as (combination, noise coefficient); history holds (lam, prediction) of
        the previous steps, newest first."""
        s, t = float(self.timesteps[i]), float(self.timesteps[i + 1])
        a, weights, m, noise = step_coefficients(
            self.solver, self.prediction, self.step_order(i), self.sde, s, t, [lam for lam, _ in history], self.multistep
        )
        update = Combination([(x, a), (mu, m)])
        for weight, form in zip(weights, [prediction] + [form for _, form in history]):
            update = update + form.scaled(weight)
        return update, noise

    def data_of(self, prediction: Combination, x, mu, s) -> Combination:
        """The data prediction at time s from the solver's prediction."""
        return self.converted(prediction, self.prediction, "data", x, mu, s)

    def converted(self, prediction: Combination, kind: str, target: str, x, mu, s: float) -> Combination:
        """A ``kind`` prediction at time s as the ``target`` kind (parameterization's formulas)."""
        if kind == target:
            return prediction
        c_out, c_x, c_mu = (float(c) for c in prediction_coefficients(self.sde, s, kind, target))
        return prediction.scaled(c_out) + Combination([(x, c_x), (mu, c_mu)])


def sample(
    model: Model,
    sde: LinearSDE,
    mu: Optional[torch.Tensor] = None,
    steps: int = 10,
    *,
    x_T=None,
    generator=None,
    callback=None,
    progress=False,
    shape=None,
    cond=None,
    device=None,
    **options,
) -> torch.Tensor:
    """One-call form: ``MRSampler(sde, steps, **options).sample(model, mu, ...)``."""
    return MRSampler(sde, steps, **options).sample(
        model, mu, x_T=x_T, generator=generator, callback=callback, progress=progress, shape=shape, cond=cond, device=device
    )
