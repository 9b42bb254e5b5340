"""The conditional score estimators of the CMDE paper on VE SDEs: CDE (clean condition), CDiffE
(y diffused like x), CMDE (y at its own speed) and VS-CMDE (whose y speed falls in training),
with their settings (``VEOptions``, ``CMDEOptions``, ``VSCMDEOptions``) and EDM preconditioning."""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from ..checks import check_positive
from ..ops import noise_inject, weighted_score_loss
from ..samplers import conditioned_model
from ..sde import VESDE, LinearSDE, MultiSpeedSDE, check_sde
from .base import Estimator, Shape, check_images, check_output, check_shape, check_step

SIGMA_MIN = 5e-3


@dataclass(frozen=True)
class VEOptions:
    """The settings ``CDE.for_images`` and ``CDiffE.for_images`` take (the paper's VE SDE for x),
    and the base of the other VE estimators' settings; a checkpoint stores them as a dict.

    sigma_max_x None: sqrt(D_x). t_eps None: 1e-5 T. sigma_data: EDM preconditioning of x (None:
    the paper's plain noise prediction; see ``_ConditionalEstimator``)."""

    sigma_min: float = SIGMA_MIN
    sigma_max_x: Optional[float] = None
    schedule: str = "geometric"
    t_eps: Optional[float] = None
    sigma_data: Optional[float] = None

    def x_sde(self, x_shape: Shape) -> VESDE:
        sigma_max = math.sqrt(math.prod(x_shape)) if self.sigma_max_x is None else self.sigma_max_x
        return VESDE(self.sigma_min, sigma_max, self.schedule)


@dataclass(frozen=True)
class CMDEOptions(VEOptions):
    """``CMDE.for_images``: y diffuses with VE(sigma_min, sigma_y_max); the paper uses 0.5 for
    super-resolution and 1 for inpainting and edges."""

    sigma_y_max: float = 0.5


@dataclass(frozen=True)
class VSCMDEOptions(VEOptions):
    """``VSCMDE.for_images``: sigma_y_max falls from sigma_y_start (None: sqrt(D_y)) to
    sigma_y_target at target_step (``vs_sigma_y_max``); the paper: 0.5 at 250k (SR), 1 at 500k
    (inpainting), 1 at 300k (edges)."""

    sigma_y_start: Optional[float] = None
    sigma_y_target: float = 0.5
    target_step: int = 250_000
    clamp: bool = True


def vs_sigma_y_max(step: int, start: float, target: float, target_step: int, clamp: bool = True) -> float:
    """VS-CMDE's sigma_y_max at training step k: harmonic from ``start`` to ``target`` at ``target_step``.

    1 / s(k) = 1 / start + (k / K)(1 / target - 1 / start). clamp=True holds s at ``target`` from
    step K on; clamp=False is the reference code's behaviour (it keeps falling past the target).
    """
    check_step(step, "step")
    check_positive(start, "start")
    check_positive(target, "target")
    if not isinstance(target_step, int) or isinstance(target_step, bool) or target_step < 1:
        raise ValueError(f"target_step: expected an int >= 1, got {target_step!r}")
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp: expected a bool, got {type(clamp).__name__}")
    progress = step / target_step
    if clamp:
        progress = min(progress, 1.0)
    return 1.0 / (1.0 / start + progress * (1.0 / target - 1.0 / start))


class CleanConditionSDE(MultiSpeedSDE):
    """CDE's pair: x diffuses with ``x_sde``, the condition stays clean (``y`` is None).

    It lets every conditional estimator expose ``est.sde.x`` for the samplers.
    """

    def __init__(self, x_sde: LinearSDE):
        check_sde(x_sde, "x_sde")
        self.x, self.y, self.T = x_sde, None, x_sde.T

    def __repr__(self):
        return f"CleanConditionSDE(x={self.x!r}, y=None)"

    def marginal(self, x0, t, mu=None, y0=None):
        """((mean_x, std_x), None), or y0 itself with std 0 for y when y0 is given."""
        clean = None if y0 is None else (y0, torch.zeros((y0.shape[0],) + (1,) * (y0.ndim - 1), dtype=y0.dtype, device=y0.device))
        return self.x.marginal(x0, t, mu), clean


class _ConditionalEstimator(Estimator):
    """Shared code of CDE (clean y) and the multi-speed estimators (y diffuses with sde.y).

    sigma_data (None: off): EDM preconditioning of the x part. In the scaled variable
    x~ = x_t / alpha = x0 + s z (s = sigma / alpha) the network sees c_in x~ and its x output F
    gives the clean-image estimate D = c_skip x~ + c_out F, hence the noise estimate (x~ - D) / s,
    with c_in = 1 / n, c_skip = sigma_data^2 / n^2, c_out = s sigma_data / n, n^2 = s^2 + sigma_data^2.
    The loss is the same maximum-likelihood score loss, written in F: since (x~ - D) / s - z =
    -(sigma_data / n)(F - k z - c x0) with k = -sigma_data / n and c = s / (sigma_data n), the x
    weight becomes w_x sigma_data^2 / n^2 and x0 the target. Why: plain noise prediction turns
    an error e of the network into an error s e of the clean image, so at the large s of a VE SDE
    (sqrt(D_x)) the colours and coarse layout need a precision that takes very long to train; here
    F predicts the image itself at large s and the noise at small s, each at unit scale.
    """

    diffuses_y = True
    default_mode = "fresh"

    def __init__(self, sde, x_shape, y_shape, t_eps, sigma_data: Optional[float] = None):
        super().__init__(sde, x_shape, y_shape, t_eps)
        self.sigma_data = None if sigma_data is None else check_positive(sigma_data, "sigma_data")

    def model_output_channels(self, image_channels=None, cond_channels=None) -> int:
        image_channels, cond_channels = self._channels(image_channels, cond_channels)
        return image_channels + (cond_channels if self.diffuses_y else 0)

    def state_dict(self) -> Dict:
        return {"name": self.name, "sigma_data": self.sigma_data}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        sigma_data = state.get("sigma_data")  # absent from checkpoints written before it existed
        self.sigma_data = None if sigma_data is None else check_positive(sigma_data, "state['sigma_data']")

    def preconditioning(self, t: torch.Tensor) -> Dict[str, torch.Tensor]:
        """EDM's factors for x at times t [B] (float64): alpha, s = sigma / alpha, c_in (applied to
        x_t itself, so it includes 1 / alpha), c_skip, c_out, and the loss's k, c and weight factor."""
        if self.sigma_data is None:
            raise ValueError("preconditioning: this estimator was built without sigma_data (plain noise prediction)")
        t = t.to(torch.float64)
        alpha = self.sde.x.alpha(t)
        s = self.sde.x.sigma(t) / alpha
        data = self.sigma_data
        norm = torch.sqrt(s * s + data * data)
        return {
            "alpha": alpha,
            "s": s,
            "c_in": 1.0 / (alpha * norm),
            "c_skip": data * data / (norm * norm),
            "c_out": s * data / norm,
            "k": -data / norm,
            "c": s / (data * norm),
            "weight": (data / norm) ** 2,
        }

    def network_input_scale(self, t: torch.Tensor) -> torch.Tensor:
        """[B] float64 factor the network input's x part carries (1 without preconditioning)."""
        return torch.ones_like(t, dtype=torch.float64) if self.sigma_data is None else self.preconditioning(t)["c_in"]

    def loss_coefficients(self, t: torch.Tensor, x_dim: int, y_dim: int) -> torch.Tensor:
        """[B, S, 3] float64 (weight w, noise scale k, target scale c) per segment (x[, y]):
        k = -1, c = 0 (noise prediction), except for a preconditioned x (see the class)."""
        x_sde = self.sde.x
        normaliser = x_dim + (y_dim if self.diffuses_y else 0)
        x_weight = x_sde.g2(t) / x_sde.sigma(t) ** 2 / normaliser
        x_segment = [x_weight, -torch.ones_like(x_weight), torch.zeros_like(x_weight)]
        if self.sigma_data is not None:
            factors = self.preconditioning(t)
            x_segment = [x_weight * factors["weight"], factors["k"], factors["c"]]
        segments = [torch.stack(x_segment, dim=1)]
        if self.diffuses_y:
            y_weight = self.sde.y.g2(t) / self.sde.y.sigma(t) ** 2 / normaliser
            segments.append(torch.stack([y_weight, -torch.ones_like(y_weight), torch.zeros_like(y_weight)], dim=1))
        return torch.stack(segments, dim=1)

    def _loss(
        self, model: Callable, x0: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, seed: int, offset_samples: int
    ) -> torch.Tensor:
        """The weighted denoising score-matching loss: model(input [B, C_x + C_y, H, W], t [B]) ->
        [B, model_output_channels, H, W]."""
        batch, x_channels = x0.shape[0], x0.shape[1]
        x_dim, y_dim = x0[0].numel(), y0[0].numel()
        coef_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        input_scale = self.network_input_scale(t)
        x_coefs = torch.stack([input_scale * self.sde.x.alpha(t), input_scale * self.sde.x.sigma(t)], dim=1).to(coef_dtype)
        y_coefs = torch.stack([self.sde.y.alpha(t), self.sde.y.sigma(t)], dim=1).to(coef_dtype) if self.diffuses_y else None
        offset = offset_samples * (x_dim + (y_dim if self.diffuses_y else 0))
        network_input = torch.empty((batch, x_channels + y0.shape[1], *x0.shape[2:]), dtype=x0.dtype, device=x0.device)
        noise = self._stored_noise(seed, offset, x0, network_input.shape if self.diffuses_y else x0.shape)
        inject_noise = None if noise is None else (noise[:, :x_channels], noise[:, x_channels:] if self.diffuses_y else None)
        noise_inject(
            x0.contiguous(), x_coefs, y0.contiguous(), y_coefs, seed=seed, offset=offset, noise=inject_noise, out=network_input
        )
        output = model(network_input, t.to(coef_dtype))
        channels = self.model_output_channels(x_channels, y0.shape[1])
        check_output(output, (batch, channels, *x0.shape[2:]), self._output_description(x_channels, y0.shape[1]))
        coefs = self.loss_coefficients(t, x_dim, y_dim).to(coef_dtype)
        target = None
        if self.sigma_data is not None:  # x0 in the x part; the y part's target scale is 0
            target = x0.contiguous() if not self.diffuses_y else torch.cat([x0, torch.zeros_like(output[:, x_channels:])], dim=1)
        return weighted_score_loss(
            output.contiguous(),
            coefs,
            split=x_dim if self.diffuses_y else None,
            seed=seed,
            offset=offset,
            noise=noise,
            target=target,
            reduction="mean",
        )

    def _output_description(self, x_channels: int, y_channels: int) -> str:
        if self.diffuses_y:
            return f"{x_channels} x-score + {y_channels} y-score channels, unet_preset(..., estimator={self.name!r})"
        return f"{x_channels} x-score channels, unet_preset(..., estimator={self.name!r})"

    def sampling_model(
        self,
        model: Callable,
        y: torch.Tensor,
        mode: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        times: Optional[torch.Tensor] = None,
    ) -> Callable:
        """model(x_t, t, c) -> the noise prediction eps of x (= -NN_x; c is ignored) for the samplers.

        Use with ``MRSampler(est.sde.x, steps, model_output="noise").sample(m, None, shape=...)`` or
        ``pc_sample(m, est.sde.x, y, steps, model_output="noise")``. mode (default: "clean" for
        CDE, "fresh" otherwise): how y_t is formed at each call, see
        ``samplers.conditioned_model``; "consistent" needs the sampler's time grid ``times``.
        """
        if not callable(model):
            raise TypeError(f"model: expected a callable model(input, t), got {type(model).__name__}")
        check_images(y, "y", self.y_shape, any_size=True)
        mode = self.default_mode if mode is None else mode
        if not self.diffuses_y and mode != "clean":
            raise ValueError(f"mode: expected 'clean' for {self.name} (its condition is never diffused), got {mode!r}")
        y_channels = y.shape[1]

        def noise_prediction(x_t: torch.Tensor, t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
            factors = None
            if self.sigma_data is not None:
                times = t.expand(x_t.shape[0]) if torch.is_tensor(t) else torch.full((x_t.shape[0],), float(t))
                factors = {
                    k: v.to(x_t.device, x_t.dtype).reshape(-1, 1, 1, 1)
                    for k, v in self.preconditioning(times.to(x_t.device)).items()
                }
            x_input = x_t if factors is None else factors["c_in"] * x_t
            output = model(torch.cat([x_input, y_t.to(x_t.dtype)], dim=1), t)
            channels = self.model_output_channels(x_t.shape[1], y_channels)
            check_output(output, (x_t.shape[0], channels, *x_t.shape[2:]), self._output_description(x_t.shape[1], y_channels))
            if factors is None:
                return -output[:, : x_t.shape[1]]
            scaled = x_t / factors["alpha"]
            denoised = factors["c_skip"] * scaled + factors["c_out"] * output[:, : x_t.shape[1]]
            return (scaled - denoised) / factors["s"]

        return conditioned_model(noise_prediction, self.sde, y, mode, generator, times)


class CDE(_ConditionalEstimator):
    """Conditional denoising estimator: input cat(x_t, y) with the clean y; output the x-score.

    Loss g_x^2 / sigma_x^2 / D_x ||NN_x + z_x||^2: normalised by D_x, not D_x + D_y, because only
    the D_x components of x are modelled; the value is then a mean over those components (the
    per-dimension bound for x | y) and does not change with the size of the condition.
    """

    name = "cde"
    diffuses_y = False
    default_mode = "clean"

    def __init__(
        self, x_sde: LinearSDE, x_shape=None, y_shape=None, t_eps: Optional[float] = None, sigma_data: Optional[float] = None
    ):
        super().__init__(CleanConditionSDE(x_sde), x_shape, y_shape, t_eps, sigma_data)

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], **settings) -> "CDE":
        """The paper's VE settings (``VEOptions``: sigma_min 5e-3, sigma_max_x = sqrt(D_x))."""
        options = VEOptions(**settings)
        x_shape = check_shape(x_shape, "x_shape")
        return cls(options.x_sde(x_shape), x_shape, y_shape, options.t_eps, options.sigma_data)

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "x_sde": _sde_state(self.sde.x)}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.sde = CleanConditionSDE(_sde_from_state(state, "x_sde", self.sde.x))


class CMDE(_ConditionalEstimator):
    """Conditional multi-speed diffusive estimator: x and y diffuse with their own SDEs (one t).

    Input cat(x_t, y_t), output the x- and y-scores; the y-score is trained (MLE weighting) and
    dropped at sampling. Built from a MultiSpeedSDE; ``for_images`` gives the paper's VE pair.
    """

    name = "cmde"

    def __init__(
        self, sde: MultiSpeedSDE, x_shape=None, y_shape=None, t_eps: Optional[float] = None, sigma_data: Optional[float] = None
    ):
        if not isinstance(sde, MultiSpeedSDE) or isinstance(sde, CleanConditionSDE):
            raise TypeError(f"sde: expected a MultiSpeedSDE(x_sde, y_sde), got {type(sde).__name__}")
        super().__init__(sde, x_shape, y_shape, t_eps, sigma_data)

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], **settings) -> "CMDE":
        """VE(sigma_min, sqrt(D_x)) for x and VE(sigma_min, sigma_y_max) for y (``CMDEOptions``)."""
        options = CMDEOptions(**settings)
        x_shape = check_shape(x_shape, "x_shape")
        y_sde = _y_sde(options.sigma_min, options.sigma_y_max, options.schedule)
        return cls(MultiSpeedSDE(options.x_sde(x_shape), y_sde), x_shape, y_shape, options.t_eps, options.sigma_data)

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "x_sde": _sde_state(self.sde.x), "y_sde": _sde_state(self.sde.y)}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.sde = MultiSpeedSDE(_sde_from_state(state, "x_sde", self.sde.x), _sde_from_state(state, "y_sde", self.sde.y))


class CDiffE(CMDE):
    """Conditional diffusive estimator: y diffuses with the same SDE as x (CMDE with sigma_y = sigma_x)."""

    name = "cdiffe"

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], **settings) -> "CDiffE":
        """The paper's VE SDE for x and y (``VEOptions``)."""
        options = VEOptions(**settings)
        x_shape = check_shape(x_shape, "x_shape")
        x_sde = options.x_sde(x_shape)
        return cls(MultiSpeedSDE(x_sde, x_sde), x_shape, y_shape, options.t_eps, options.sigma_data)


class VSCMDE(CMDE):
    """CMDE whose sigma_y_max falls during training (``vs_sigma_y_max``), VE for x and y.

    ``on_step(k)`` sets the y-SDE to VE(sigma_min, vs_sigma_y_max(k, ...)): read ``est.sde`` after
    it, the object is replaced. The current sigma_y_max and step are in ``state_dict`` and are what
    a loaded estimator samples with.
    """

    name = "vscmde"

    def __init__(
        self,
        x_sde: VESDE,
        sigma_y_start: float,
        sigma_y_target: float = 0.5,
        target_step: int = 250_000,
        clamp: bool = True,
        x_shape=None,
        y_shape=None,
        t_eps: Optional[float] = None,
        sigma_data: Optional[float] = None,
    ):
        if not isinstance(x_sde, VESDE):
            raise TypeError(f"x_sde: expected a VESDE, got {type(x_sde).__name__}")
        vs_sigma_y_max(0, sigma_y_start, sigma_y_target, target_step, clamp)
        self.sigma_y_start, self.sigma_y_target = float(sigma_y_start), float(sigma_y_target)
        self.target_step, self.clamp, self.step = target_step, clamp, 0
        self.sigma_y_max = self.sigma_y_start
        super().__init__(
            MultiSpeedSDE(x_sde, _y_sde(x_sde.sigma_min, self.sigma_y_max, x_sde.schedule)), x_shape, y_shape, t_eps, sigma_data
        )

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], **settings) -> "VSCMDE":
        """sigma_y_max from sqrt(D_y) to 0.5 at step 250k (``VSCMDEOptions``)."""
        options = VSCMDEOptions(**settings)
        x_shape, y_shape = check_shape(x_shape, "x_shape"), check_shape(y_shape, "y_shape")
        start = math.sqrt(math.prod(y_shape)) if options.sigma_y_start is None else options.sigma_y_start
        x_sde = options.x_sde(x_shape)
        return cls(
            x_sde,
            start,
            options.sigma_y_target,
            options.target_step,
            options.clamp,
            x_shape,
            y_shape,
            options.t_eps,
            options.sigma_data,
        )

    def on_step(self, step: int) -> None:
        check_step(step, "step")
        self._set(step, vs_sigma_y_max(step, self.sigma_y_start, self.sigma_y_target, self.target_step, self.clamp))

    def _set(self, step: int, sigma_y_max: float) -> None:
        x_sde = self.sde.x
        self.sde = MultiSpeedSDE(x_sde, _y_sde(x_sde.sigma_min, sigma_y_max, x_sde.schedule, f"sigma_y_max at step {step}"))
        self.step, self.sigma_y_max = step, sigma_y_max

    def state_dict(self) -> Dict:
        return {
            **super().state_dict(),
            "step": self.step,
            "sigma_y_max": self.sigma_y_max,
            "sigma_y_start": self.sigma_y_start,
            "sigma_y_target": self.sigma_y_target,
            "target_step": self.target_step,
            "clamp": self.clamp,
        }

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        for key in ("step", "sigma_y_max", "sigma_y_start", "sigma_y_target", "target_step", "clamp"):
            if key not in state:
                raise ValueError(f"state: expected key {key!r} of a vscmde state, got keys {sorted(state)}")
        vs_sigma_y_max(state["step"], state["sigma_y_start"], state["sigma_y_target"], state["target_step"], state["clamp"])
        self.sigma_y_start, self.sigma_y_target = float(state["sigma_y_start"]), float(state["sigma_y_target"])
        self.target_step, self.clamp = state["target_step"], state["clamp"]
        self._set(state["step"], check_positive(state["sigma_y_max"], "state['sigma_y_max']"))


def _y_sde(sigma_min: float, sigma_y_max: float, schedule: str, what: str = "sigma_y_max") -> VESDE:
    check_positive(sigma_y_max, what)
    if sigma_y_max <= sigma_min:
        raise ValueError(f"{what}: expected > sigma_min = {sigma_min} (a VE SDE must widen), got {sigma_y_max!r}")
    return VESDE(sigma_min, sigma_y_max, schedule)


def _sde_state(sde: LinearSDE) -> Dict:
    """A VE SDE's parameters (restored on load); any other SDE's repr (checked on load)."""
    if isinstance(sde, VESDE):
        return {"sigma_min": sde.sigma_min, "sigma_max": sde.sigma_max, "schedule": sde.schedule}
    return {"repr": repr(sde)}


def _sde_from_state(state: Dict, key: str, current: LinearSDE) -> LinearSDE:
    entry = state.get(key)
    if isinstance(entry, dict) and {"sigma_min", "sigma_max", "schedule"} <= set(entry):
        return VESDE(entry["sigma_min"], entry["sigma_max"], entry["schedule"])
    if isinstance(entry, dict) and "repr" in entry:
        if entry["repr"] != repr(current):
            raise ValueError(
                f"state[{key!r}]: the checkpoint was trained with {entry['repr']}, this estimator has {current!r}; build the estimator with the checkpoint's SDE"
            )
        return current
    raise ValueError(f"state[{key!r}]: expected a dict with sigma_min, sigma_max, schedule (VE) or repr, got {entry!r}")
