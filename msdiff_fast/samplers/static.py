"""The MR Sampler loop as a fixed program: every coefficient on the device before the first step,
no host synchronisation inside the loop, so that the whole loop can be captured as one CUDA graph
or compiled as one function.

``MRSampler.sample`` (loop="eager") evaluates its float64 schedule, copies each step's
coefficients to the device and reads the state back for the divergence check at every step: on a
GPU each of those waits for the device. ``StaticMRSampler`` plans the loop once instead: it runs
MRSampler's own step construction (``raw_prediction``, ``update_of``, ... building Combinations)
on placeholders, which fixes every ``mr_step`` call's operands, term order and coefficients; at
run time the placeholders stand for that call's tensors. Same operands in the same order, same
coefficients, same noise positions, same kernels: the output is MRSampler's bit for bit.

The divergence guard keeps the largest |x| over the guarded steps on the device and reads it once
at the end; when it trips, the eager loop replays the run from the same start and seed and raises
its FloatingPointError, which names the step.

With ``graph=True`` (CUDA tensors) the loop, network included, is captured once per model and
input shapes and replayed: the inputs are copied into the graph's buffers, the SDE noise of all
steps is drawn into a buffer first (the same stream positions as the eager loop), and the
result is copied out.
"""

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..ops import mr_step
from ..ops.reference import compute_dtype
from .combination import check_coefficients
from .loop import Model, call_model, divergence_limit, limit_data, time_tensor


class Slot:
    """Stands for a tensor of the loop while it is planned (x_0, output_3, ...)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name


@dataclass
class Call:
    """One mr_step: out = coefficients . (x, *terms) + noise z (stream positions of step ``step``),
    then clipped / thresholded when ``limit``."""

    out: Slot
    x: Slot
    terms: List[Slot]
    coefficients: List[float]
    noise: float = 0.0
    step: int = 0
    limit: bool = False


@dataclass
class Step:
    time: float
    state: Slot
    output: Slot
    calls: List[Call] = field(default_factory=list)
    guarded: Optional[Slot] = None  # the new state, when check_finite watches it
    released: List[Slot] = field(default_factory=list)  # slots no later step reads


@dataclass
class LoopPlan:
    steps: List[Step]
    start: Slot
    mu: Optional[Slot]
    result: Slot


# What plan_loop reads of an MRSampler (this module sits below mr_sampler.py, which runs its
# static loops through StaticMRSampler, so it knows the sampler by these names, not by its class).
PLANNED_INTERFACE = ("timesteps", "lams", "raw_prediction", "prediction_from_data", "data_of", "update_of")


def plan_loop(sampler, has_mu: bool) -> LoopPlan:
    """The steps of ``sampler``'s loop on placeholders, mirroring ``MRSampler.run_eager`` (mu is
    None for VE/VP SDEs: Combinations then leave its terms out)."""
    x, mu = Slot("x_0"), Slot("mu") if has_mu else None
    start = x
    history = deque(maxlen=max(sampler.order - 1, 1))
    steps = []
    for i in range(sampler.steps):
        s = float(sampler.timesteps[i])
        step = Step(s, x, Slot(f"output_{i}"))
        steps.append(step)
        prediction = sampler.raw_prediction(step.output, x, mu, s)
        if sampler.limits_data:
            x0 = Slot(f"data_{i}")
            step.calls.append(Call(x0, *prediction.operands(x), limit=True))
            prediction = sampler.prediction_from_data(x0, x, mu, s)
        if sampler.denoise_last and i == sampler.steps - 1:
            result = Slot("denoised")
            step.calls.append(Call(result, *sampler.data_of(prediction, x, mu, s).operands(x)))
            break
        update, noise = sampler.update_of(i, x, mu, prediction, history)
        x = Slot(f"x_{i + 1}")
        step.calls.append(Call(x, *update.operands(step.state), noise=noise, step=i))
        step.guarded = x if sampler.check_finite else None
        history.appendleft((float(sampler.lams[i]), prediction))
        result = x
    for call in (call for step in steps for call in step.calls):
        check_coefficients(call.coefficients, call.noise)
    last_read: Dict[Slot, int] = {}
    for i, step in enumerate(steps):
        for slot in [step.state] + [t for call in step.calls for t in (call.x, *call.terms)]:
            last_read[slot] = i
    for slot, i in last_read.items():
        if slot is not mu and slot is not result:
            steps[i].released.append(slot)
    return LoopPlan(steps, start, mu, result)


@dataclass
class DeviceCoefficients:
    """A plan's numbers as tensors for one (device, dtype, batch): times and per-call rows."""

    times: List[torch.Tensor]
    coefs: List[List[torch.Tensor]]
    noise_coefs: List[List[Optional[torch.Tensor]]]


class StaticMRSampler:
    """``MRSampler.sample`` without host synchronisation inside the loop (see the module docstring).

    Use it through ``MRSampler(..., loop="static")``, ``loop="graph"`` or ``loop="compile"``; ``run``
    is the entry point those call. graph: capture the loop as a CUDA graph per (model, input
    shapes) and replay it (CUDA tensors only; the model must not synchronise with the host, and a
    model that reads tensors other than its arguments reads the ones it read during capture).
    compile: torch.compile the loop with the model inside; it recompiles for another network or
    new input shapes (a new closure over the same network, or a new seed, reuses the program).
    """

    def __init__(self, sampler, graph: bool = False, compile: bool = False):
        if not all(hasattr(sampler, name) for name in PLANNED_INTERFACE):
            raise TypeError(f"sampler: expected an MRSampler, got {type(sampler).__name__}")
        for name, value in (("graph", graph), ("compile", compile)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {value!r}")
        if graph and compile:
            raise ValueError("graph, compile: expected at most one of them True, got both")
        self.sampler, self.graph, self.compile = sampler, graph, compile
        self._plans: Dict[bool, LoopPlan] = {}
        self._coefficients: Dict[Tuple, DeviceCoefficients] = {}
        self._graphs: Dict[Tuple, CapturedLoop] = {}
        self._compiled_loop = torch.compile(self.loop) if compile else None

    def plan(self, has_mu: bool) -> LoopPlan:
        if has_mu not in self._plans:
            self._plans[has_mu] = plan_loop(self.sampler, has_mu)
        return self._plans[has_mu]

    def coefficients(self, plan: LoopPlan, like: torch.Tensor) -> DeviceCoefficients:
        """The plan's times and coefficients on like's device, built once per (device, dtype, batch)."""
        key = (plan.mu is not None, like.device, like.dtype, like.shape[0])
        if key not in self._coefficients:
            batch, device = like.shape[0], like.device
            # the dtype the kernels compute in, so that no step converts them again
            dtype = compute_dtype(like.dtype)
            self._coefficients[key] = DeviceCoefficients(
                [time_tensor(like, step.time) for step in plan.steps],
                [
                    [torch.tensor([call.coefficients], dtype=dtype).repeat(batch, 1).to(device) for call in step.calls]
                    for step in plan.steps
                ],
                [
                    [
                        torch.full((batch,), call.noise, dtype=dtype).to(device) if call.noise != 0.0 else None
                        for call in step.calls
                    ]
                    for step in plan.steps
                ],
            )
        return self._coefficients[key]

    def loop(self, model: Model, x: torch.Tensor, mu, condition, seed: int, noise: Optional[torch.Tensor] = None):
        """(result, largest |x| over the guarded steps or None): the planned loop from x.

        noise: the stream normals of every step, [steps, *x.shape] (see ``stream_noise``), in
        place of drawing them from ``seed`` inside each step.
        """
        sampler = self.sampler
        plan = self.plan(mu is not None)
        numbers = self.coefficients(plan, x)
        values = {plan.start: x, plan.mu: mu}
        peak = None
        for i, step in enumerate(plan.steps):
            values[step.output] = call_model(
                model, values[step.state], numbers.times[i], condition, check=False
            )  # the guard reads once, at the end
            for call, coefs, noise_coef in zip(step.calls, numbers.coefs[i], numbers.noise_coefs[i]):
                explicit = noise[call.step] if noise is not None and noise_coef is not None else None
                out = mr_step(
                    values[call.x],
                    [values[t] for t in call.terms],
                    coefs,
                    noise_coef,
                    seed=seed,
                    offset=call.step * x.numel(),
                    noise=explicit,
                    backend=sampler.backend,
                )
                values[call.out] = limit_data(out, sampler.clip, sampler.threshold) if call.limit else out
            if step.guarded is not None:
                largest = values[step.guarded].abs().amax()
                peak = largest if peak is None else torch.maximum(peak, largest)
            for slot in step.released:
                del values[slot]
        result = values[plan.result]
        if sampler.clip is not None and not sampler.denoise_last:
            result = result.clamp(*sampler.clip)
        return result, peak

    def run(self, model: Model, x: torch.Tensor, mu: Optional[torch.Tensor], condition, seed: int) -> torch.Tensor:
        """The sample from the start x with noise seed ``seed``: MRSampler.run_eager's result."""
        sampler = self.sampler
        limit = divergence_limit(sampler.sde, mu) if sampler.check_finite else None
        if self.graph:
            if x.device.type != "cuda":
                raise ValueError(
                    f"loop: 'graph' captures CUDA graphs and needs CUDA tensors, got x_T on {x.device}; use loop='static'"
                )
            result, peak = self._replay(model, x, mu, condition, seed)
        elif self.compile:
            # the coefficients are built outside the compiled function, which then only reads them
            self.coefficients(self.plan(mu is not None), x)
            result, peak = self._compiled_loop(model, x, mu, condition, 0, self._drawn_noise(mu, x, seed))
        else:
            result, peak = self.loop(model, x, mu, condition, seed)
        if peak is not None:
            largest = float(peak)
            if not math.isfinite(largest) or largest > limit:
                sampler.run_eager(model, x, mu, condition, seed)  # raises, naming the step
                what = "NaN or inf" if not math.isfinite(largest) else f"values up to {largest:.3g} (limit {limit:.3g})"
                raise FloatingPointError(
                    f"MRSampler(loop={self.mode!r}): the loop produced {what}, but replaying it step by step "
                    "did not (a model whose output changes from call to call?)"
                )
        return result

    @property
    def mode(self) -> str:
        return "graph" if self.graph else "compile" if self.compile else "static"

    def _drawn_noise(self, mu, x: torch.Tensor, seed: int) -> Optional[torch.Tensor]:
        """Every step's normals (``stream_noise``), or None when the loop draws none (an ODE)."""
        draws = any(call.noise != 0.0 for step in self.plan(mu is not None).steps for call in step.calls)
        return stream_noise(seed, self.sampler.steps, x, self.sampler.backend) if draws else None

    def _replay(self, model, x, mu, condition, seed):
        shapes = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in (x, mu, condition))
        key = (shapes, condition is mu)
        noise = self._drawn_noise(mu, x, seed)
        with torch.no_grad():
            captured = self._graphs.get(key)
            if captured is None or captured.model is not model:
                captured = self._graphs[key] = CapturedLoop(self.loop, model, x, mu, condition, noise)
            return captured(x, mu, condition, noise)


def stream_noise(seed: int, steps: int, like: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[steps, *like.shape]: the normals mr_step draws for step i (stream positions from
    i * like.numel()), by the same kernels: zero coefficients and a noise coefficient of one."""
    rows = steps * like.shape[0]
    zeros = torch.zeros((rows, *like.shape[1:]), dtype=compute_dtype(like.dtype), device=like.device)
    coefs = torch.zeros(rows, 2, dtype=torch.float32, device=like.device)
    ones = torch.ones(rows, dtype=torch.float32, device=like.device)
    return mr_step(zeros, [zeros], coefs, ones, seed=seed, offset=0, backend=backend).view(steps, *like.shape)


class CapturedLoop:
    """StaticMRSampler.loop for one model and one set of input shapes, as a CUDA graph."""

    def __init__(self, loop, model: Model, x: torch.Tensor, mu, condition, noise):
        self.model = model  # the graph runs this model's kernels (and keeps the cache key alive)
        self.inputs = [x.clone(), None if mu is None else mu.clone(), None, None if noise is None else noise.clone()]
        self.inputs[2] = self.inputs[1] if condition is mu else (None if condition is None else condition.clone())
        x, mu, condition, noise = self.inputs
        device = x.device
        try:
            # one eager run first, on a side stream: lazy initialisation (cuBLAS handles, autotuning)
            # must not happen during capture
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                loop(model, x, mu, condition, 0, noise)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = loop(model, x, mu, condition, 0, noise)
        except RuntimeError as error:
            raise RuntimeError(
                f"loop='graph': capturing the sampling loop as a CUDA graph failed ({error}); the model must run on the "
                "device without host synchronisation (no .item(), no CPU generators, no data-dependent shapes); "
                "loop='static' runs the same loop without capture"
            ) from error

    def __call__(self, x, mu, condition, noise):
        for buffer, value in zip(self.inputs, (x, mu, condition, noise)):
            if buffer is not None and buffer is not value:
                buffer.copy_(value)
        self.graph.replay()
        result, peak = self.outputs
        return result.clone(), None if peak is None else peak.clone()
