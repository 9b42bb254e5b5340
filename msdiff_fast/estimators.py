"""Conditional score estimators (CDE, CDiffE, CMDE, VS-CMDE) and mean-reverting diffusion losses.

Every estimator turns a clean pair (x0, y0) into one training loss in two fused passes:
``ops.noise_inject`` writes the network input cat(x_t, y_t) straight into one buffer, and
``ops.weighted_score_loss`` regenerates the same noise from (seed, offset) to form the weighted
loss and its gradient, so the noise is never stored. On the CPU the noise is drawn once instead
and both ops read it (``stored_noise``): the same values, bit for bit. The math is ../shared/reference/cmde.md
sections 1-2 and mr_sampler.md sections 1-2.

Score parameterisation s = NN / sigma per component, so the network predicts -z for x (and y);
with the maximum-likelihood weighting Lambda = diag(g_x^2, g_y^2) and the 1 / (D_x + D_y)
normalisation the per-sample loss is

    w_x ||NN_x + z_x||^2 + w_y ||NN_y + z_y||^2,   w = g(t)^2 / sigma(t)^2 / (D_x + D_y),

a constant 2 ln(sigma_max / sigma_min) / (D_x + D_y) for a geometric VE SDE. With ``sigma_data``
the x part is preconditioned as in EDM (Karras et al. 2022) instead; see ``_ConditionalEstimator``.
CDE has no y term
and normalises by D_x (see ``CDE``). Randomness: from ``generator`` each ``loss`` call draws, in
this order, u = torch.rand(global_batch, dtype=float64) (t = t_eps + (T - t_eps) u, one t per
sample shared by x and y) and the Philox seed int(torch.randint(0, 2**62, (1,))). Sample b's
noise sits at stream positions (offset_samples + b) * D_noise + j, D_noise the noise elements per
sample (the network input's D_x + D_y when y diffuses; D_x when it does not), so ranks of a
data-parallel job that share the generator state and pass offset_samples = rank * local_batch,
global_batch = world * local_batch reproduce exactly the noise and t's of one process.
"""

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .ops import compiled, noise_inject, weighted_score_loss
from .sde import LinearSDE, MRSDE, MultiSpeedSDE, VESDE
from .samplers import conditioned_model

__all__ = [
    "CDE",
    "CDiffE",
    "CMDE",
    "ESTIMATORS",
    "CleanConditionSDE",
    "Estimator",
    "MeanReverting",
    "VSCMDE",
    "make_estimator",
    "vs_sigma_y_max",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIGMA_MIN = 5e-3
VE_T_EPS = 1e-5
Shape = Tuple[int, int, int]


def stored_noise(seed: int, offset: int, like: torch.Tensor, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """The stream's noise for a batch, drawn once, where reading it back beats regenerating it.

    That is on the CPU: two cores spend about as long on Philox and Box-Muller as on the memory
    traffic a second draw saves (a loss-only training step was 5-10% faster reading at batch 2,
    even at batch 16); on a GPU the arithmetic is the cheap side and the
    ops regenerate (None). float64 stays on the reference path (None), which
    draws its noise in float64.
    """
    if like.device.type != "cpu" or like.dtype == torch.float64:
        return None
    noise = compiled.cpu_stream_normals(seed, offset, math.prod(shape))
    return None if noise is None else noise.view(*shape)


def vs_sigma_y_max(step: int, start: float, target: float, target_step: int, clamp: bool = True) -> float:
    """VS-CMDE's sigma_y_max at training step k: harmonic from ``start`` to ``target`` at ``target_step``.

    1 / s(k) = 1 / start + (k / K)(1 / target - 1 / start). clamp=True holds s at ``target`` from
    step K on; clamp=False is the reference code's behaviour (it keeps falling past the target).
    """
    _check_step(step, "step")
    _check_positive(start, "start")
    _check_positive(target, "target")
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
        if not isinstance(x_sde, LinearSDE):
            raise TypeError(f"x_sde: expected an SDE from msdiff_fast.sde, got {type(x_sde).__name__}")
        self.x, self.y, self.T = x_sde, None, x_sde.T

    def __repr__(self):
        return f"CleanConditionSDE(x={self.x!r}, y=None)"

    def marginal(self, x0, t, mu=None, y0=None):
        """((mean_x, std_x), None), or y0 itself with std 0 for y when y0 is given."""
        clean = None if y0 is None else (y0, torch.zeros((y0.shape[0],) + (1,) * (y0.ndim - 1), dtype=y0.dtype, device=y0.device))
        return self.x.marginal(x0, t, mu), clean


class Estimator:
    """Common interface; see the module docstring. Subclasses set ``name`` and ``model_output`` and
    define ``loss``, ``sampling_model`` and ``model_output_channels``."""

    name = ""
    # what sampling_model's callable returns (the MR Sampler's ``model_output``)
    model_output = "noise"

    def __init__(self, sde, x_shape: Optional[Sequence[int]], y_shape: Optional[Sequence[int]], t_eps: Optional[float]):
        self.sde = sde
        self.x_shape = _check_shape(x_shape, "x_shape")
        self.y_shape = _check_shape(y_shape, "y_shape")
        if self.x_shape is not None and self.y_shape is not None and self.x_shape[1:] != self.y_shape[1:]:
            raise ValueError(f"y_shape: expected the spatial size {self.x_shape[1:]} of x_shape (y is concatenated to x), got {self.y_shape[1:]}")
        self.t_eps = VE_T_EPS * float(sde.T) if t_eps is None else _check_positive(t_eps, "t_eps")
        if not self.t_eps < float(sde.T):
            raise ValueError(f"t_eps: expected a number in (0, T = {sde.T}), got {t_eps!r}")

    def __repr__(self):
        return f"{type(self).__name__}(sde={self.sde!r}, x_shape={self.x_shape}, y_shape={self.y_shape}, t_eps={self.t_eps})"

    @property
    def sampler_sde(self) -> LinearSDE:
        """The SDE to give MRSampler / pc_sample together with ``sampling_model``."""
        return self.sde.x

    def on_step(self, step: int) -> None:
        """Called by the trainer before each step; only VS-CMDE's schedule depends on it."""
        _check_step(step, "step")

    def state_dict(self) -> Dict:
        return {"name": self.name}

    def load_state_dict(self, state: Dict) -> None:
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected the state of a {self.name!r} estimator, got {got!r}")

    def model_input_channels(self, image_channels: Optional[int] = None, cond_channels: Optional[int] = None) -> int:
        image_channels, cond_channels = self._channels(image_channels, cond_channels)
        return image_channels + cond_channels

    def _channels(self, image_channels, cond_channels) -> Tuple[int, int]:
        if image_channels is None:
            if self.x_shape is None:
                raise ValueError("image_channels: expected an int (this estimator was built without x_shape), got None")
            image_channels = self.x_shape[0]
        if cond_channels is None:
            cond_channels = self.y_shape[0] if self.y_shape is not None else image_channels
        for value, name in ((image_channels, "image_channels"), (cond_channels, "cond_channels")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        return image_channels, cond_channels

    def _check_batch(self, model, x0, y0, generator, offset_samples, global_batch) -> int:
        if not callable(model):
            raise TypeError(f"model: expected a callable model(input, t), got {type(model).__name__}")
        _check_images(x0, "x0", self.x_shape)
        _check_images(y0, "y0", self.y_shape)
        if y0.shape[0] != x0.shape[0] or y0.shape[2:] != x0.shape[2:]:
            raise ValueError(f"y0: expected batch {x0.shape[0]} and spatial size {tuple(x0.shape[2:])} (like x0), got shape {tuple(y0.shape)}")
        if y0.dtype != x0.dtype or y0.device != x0.device:
            raise TypeError(f"y0: expected dtype {x0.dtype} on {x0.device} (like x0), got {y0.dtype} on {y0.device}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        batch = x0.shape[0]
        if not isinstance(offset_samples, int) or isinstance(offset_samples, bool) or offset_samples < 0:
            raise ValueError(f"offset_samples: expected an int >= 0 (index of this batch's first sample in the global batch), got {offset_samples!r}")
        if global_batch is None:
            if offset_samples:
                raise ValueError(f"global_batch: expected the global batch size when offset_samples = {offset_samples} > 0 (all ranks draw t for it), got None")
            global_batch = batch
        if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < offset_samples + batch:
            raise ValueError(f"global_batch: expected an int >= offset_samples + batch = {offset_samples + batch}, got {global_batch!r}")
        return global_batch

    def _draw(self, generator, batch: int, offset_samples: int, global_batch: int, device) -> Tuple[torch.Tensor, int]:
        """(t [batch] float64 on ``device``, Philox seed), in the order the module docstring gives."""
        source = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(global_batch, generator=generator, dtype=torch.float64, device=source)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=source))
        T = float(self.sde.T)
        t = self.t_eps + (T - self.t_eps) * u[offset_samples : offset_samples + batch]
        return t.to(device), seed


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
        self.sigma_data = None if sigma_data is None else _check_positive(sigma_data, "sigma_data")

    def model_output_channels(self, image_channels=None, cond_channels=None) -> int:
        image_channels, cond_channels = self._channels(image_channels, cond_channels)
        return image_channels + (cond_channels if self.diffuses_y else 0)

    def state_dict(self) -> Dict:
        return {"name": self.name, "sigma_data": self.sigma_data}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        sigma_data = state.get("sigma_data")  # absent from checkpoints written before it existed
        self.sigma_data = None if sigma_data is None else _check_positive(sigma_data, "state['sigma_data']")

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
            "alpha": alpha, "s": s, "c_in": 1.0 / (alpha * norm), "c_skip": data * data / (norm * norm), "c_out": s * data / norm,
            "k": -data / norm, "c": s / (data * norm), "weight": (data / norm) ** 2,
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

    def loss(
        self,
        model: Callable,
        x0: torch.Tensor,
        y0: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        step: Optional[int] = None,
        *,
        offset_samples: int = 0,
        global_batch: Optional[int] = None,
    ) -> torch.Tensor:
        """Mean over the batch of the per-sample weighted denoising score-matching loss.

        model(input [B, C_x + C_y, H, W], t [B]) -> [B, model_output_channels, H, W]; x0 [B, C_x, H, W]
        clean images, y0 [B, C_y, H, W] their conditions. step: the training step (VS-CMDE applies
        its schedule; the others ignore it). offset_samples / global_batch: see the module docstring.
        """
        if step is not None:
            self.on_step(step)
        global_batch = self._check_batch(model, x0, y0, generator, offset_samples, global_batch)
        batch, x_channels = x0.shape[0], x0.shape[1]
        x_dim, y_dim = x0[0].numel(), y0[0].numel()
        t, seed = self._draw(generator, batch, offset_samples, global_batch, x0.device)
        coef_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        input_scale = self.network_input_scale(t)
        x_coefs = torch.stack([input_scale * self.sde.x.alpha(t), input_scale * self.sde.x.sigma(t)], dim=1).to(coef_dtype)
        y_coefs = torch.stack([self.sde.y.alpha(t), self.sde.y.sigma(t)], dim=1).to(coef_dtype) if self.diffuses_y else None
        offset = offset_samples * (x_dim + (y_dim if self.diffuses_y else 0))
        network_input = torch.empty((batch, x_channels + y0.shape[1], *x0.shape[2:]), dtype=x0.dtype, device=x0.device)
        noise = stored_noise(seed, offset, x0, network_input.shape if self.diffuses_y else x0.shape)
        inject_noise = None if noise is None else (noise[:, :x_channels], noise[:, x_channels:] if self.diffuses_y else None)
        noise_inject(x0.contiguous(), x_coefs, y0.contiguous(), y_coefs, seed=seed, offset=offset, noise=inject_noise, out=network_input)
        output = model(network_input, t.to(coef_dtype))
        channels = self.model_output_channels(x_channels, y0.shape[1])
        _check_output(output, (batch, channels, *x0.shape[2:]), self._output_description(x_channels, y0.shape[1]))
        coefs = self.loss_coefficients(t, x_dim, y_dim).to(coef_dtype)
        target = None
        if self.sigma_data is not None:  # x0 in the x part; the y part's target scale is 0
            target = x0.contiguous() if not self.diffuses_y else torch.cat([x0, torch.zeros_like(output[:, x_channels:])], dim=1)
        return weighted_score_loss(output.contiguous(), coefs, split=x_dim if self.diffuses_y else None, seed=seed, offset=offset, noise=noise,
                                   target=target, reduction="mean")

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
        _check_images(y, "y", self.y_shape, any_size=True)
        mode = self.default_mode if mode is None else mode
        if not self.diffuses_y and mode != "clean":
            raise ValueError(f"mode: expected 'clean' for {self.name} (its condition is never diffused), got {mode!r}")
        y_channels = y.shape[1]

        def noise_prediction(x_t: torch.Tensor, t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
            factors = None
            if self.sigma_data is not None:
                times = t.expand(x_t.shape[0]) if torch.is_tensor(t) else torch.full((x_t.shape[0],), float(t))
                factors = {k: v.to(x_t.device, x_t.dtype).reshape(-1, 1, 1, 1) for k, v in self.preconditioning(times.to(x_t.device)).items()}
            x_input = x_t if factors is None else factors["c_in"] * x_t
            output = model(torch.cat([x_input, y_t.to(x_t.dtype)], dim=1), t)
            channels = self.model_output_channels(x_t.shape[1], y_channels)
            _check_output(output, (x_t.shape[0], channels, *x_t.shape[2:]), self._output_description(x_t.shape[1], y_channels))
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

    def __init__(self, x_sde: LinearSDE, x_shape=None, y_shape=None, t_eps: Optional[float] = None, sigma_data: Optional[float] = None):
        super().__init__(CleanConditionSDE(x_sde), x_shape, y_shape, t_eps, sigma_data)

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], *, sigma_min: float = SIGMA_MIN, sigma_max_x: Optional[float] = None, schedule: str = "geometric", t_eps: Optional[float] = None, sigma_data: Optional[float] = None) -> "CDE":
        """The paper's VE settings: sigma_min 5e-3, sigma_max_x = sqrt(D_x); sigma_data: see _ConditionalEstimator."""
        x_shape = _check_shape(x_shape, "x_shape")
        return cls(VESDE(sigma_min, _default_sigma_max(x_shape, sigma_max_x), schedule), x_shape, y_shape, t_eps, sigma_data)

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

    def __init__(self, sde: MultiSpeedSDE, x_shape=None, y_shape=None, t_eps: Optional[float] = None, sigma_data: Optional[float] = None):
        if not isinstance(sde, MultiSpeedSDE) or isinstance(sde, CleanConditionSDE):
            raise TypeError(f"sde: expected a MultiSpeedSDE(x_sde, y_sde), got {type(sde).__name__}")
        super().__init__(sde, x_shape, y_shape, t_eps, sigma_data)

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], *, sigma_min: float = SIGMA_MIN, sigma_max_x: Optional[float] = None, sigma_y_max: float = 0.5, schedule: str = "geometric", t_eps: Optional[float] = None, sigma_data: Optional[float] = None) -> "CMDE":
        """VE(sigma_min, sqrt(D_x)) for x and VE(sigma_min, sigma_y_max) for y; the paper uses
        sigma_y_max 0.5 for super-resolution and 1 for inpainting and edges. sigma_data: see
        _ConditionalEstimator."""
        x_shape = _check_shape(x_shape, "x_shape")
        x_sde = VESDE(sigma_min, _default_sigma_max(x_shape, sigma_max_x), schedule)
        return cls(MultiSpeedSDE(x_sde, _y_sde(sigma_min, sigma_y_max, schedule)), x_shape, y_shape, t_eps, sigma_data)

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "x_sde": _sde_state(self.sde.x), "y_sde": _sde_state(self.sde.y)}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.sde = MultiSpeedSDE(_sde_from_state(state, "x_sde", self.sde.x), _sde_from_state(state, "y_sde", self.sde.y))


class CDiffE(CMDE):
    """Conditional diffusive estimator: y diffuses with the same SDE as x (CMDE with sigma_y = sigma_x)."""

    name = "cdiffe"

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], *, sigma_min: float = SIGMA_MIN, sigma_max_x: Optional[float] = None, schedule: str = "geometric", t_eps: Optional[float] = None, sigma_data: Optional[float] = None) -> "CDiffE":
        x_shape = _check_shape(x_shape, "x_shape")
        x_sde = VESDE(sigma_min, _default_sigma_max(x_shape, sigma_max_x), schedule)
        return cls(MultiSpeedSDE(x_sde, x_sde), x_shape, y_shape, t_eps, sigma_data)


class VSCMDE(CMDE):
    """CMDE whose sigma_y_max falls during training (``vs_sigma_y_max``), VE for x and y.

    ``on_step(k)`` sets the y-SDE to VE(sigma_min, vs_sigma_y_max(k, ...)): read ``est.sde`` after
    it, the object is replaced. The current sigma_y_max and step are in ``state_dict`` and are what
    a loaded estimator samples with.
    """

    name = "vscmde"

    def __init__(self, x_sde: VESDE, sigma_y_start: float, sigma_y_target: float = 0.5, target_step: int = 250_000, clamp: bool = True, x_shape=None, y_shape=None, t_eps: Optional[float] = None, sigma_data: Optional[float] = None):
        if not isinstance(x_sde, VESDE):
            raise TypeError(f"x_sde: expected a VESDE, got {type(x_sde).__name__}")
        vs_sigma_y_max(0, sigma_y_start, sigma_y_target, target_step, clamp)
        self.sigma_y_start, self.sigma_y_target = float(sigma_y_start), float(sigma_y_target)
        self.target_step, self.clamp, self.step = target_step, clamp, 0
        self.sigma_y_max = self.sigma_y_start
        super().__init__(MultiSpeedSDE(x_sde, _y_sde(x_sde.sigma_min, self.sigma_y_max, x_sde.schedule)), x_shape, y_shape, t_eps, sigma_data)

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Sequence[int], *, sigma_min: float = SIGMA_MIN, sigma_max_x: Optional[float] = None, sigma_y_start: Optional[float] = None, sigma_y_target: float = 0.5, target_step: int = 250_000, clamp: bool = True, schedule: str = "geometric", t_eps: Optional[float] = None, sigma_data: Optional[float] = None) -> "VSCMDE":
        """sigma_y_max from sqrt(D_y) to 0.5 at step 250k (SR); the paper uses 1 at 500k (inpainting), 1 at 300k (edges)."""
        x_shape, y_shape = _check_shape(x_shape, "x_shape"), _check_shape(y_shape, "y_shape")
        start = math.sqrt(math.prod(y_shape)) if sigma_y_start is None else sigma_y_start
        x_sde = VESDE(sigma_min, _default_sigma_max(x_shape, sigma_max_x), schedule)
        return cls(x_sde, start, sigma_y_target, target_step, clamp, x_shape, y_shape, t_eps, sigma_data)

    def on_step(self, step: int) -> None:
        _check_step(step, "step")
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
        self._set(state["step"], _check_positive(state["sigma_y_max"], "state['sigma_y_max']"))


class MeanReverting(Estimator):
    """Mean-reverting (IR-SDE / DA-CLIP style) diffusion: x_t = mu + alpha (x0 - mu) + sigma z.

    y0 is mu, the degraded image. Network input cat(x_t - mu, mu), output like x. target:
    "noise" (||NN - z||^2), "data" (||NN - x0||^2), "residual" (||NN - (x0 - mu)||^2: the clean
    image is mu + NN) or "velocity" (||NN - v||^2 with
    v = (L alpha z - (sigma / L)(x0 - mu)) / sqrt(alpha^2 + (sigma / L)^2), L = lam_inf: the
    samplers' velocity, whose normaliser is 1 for MRSDE and on IR-SDE's grid), each with the
    uniform weight 1 / D_x. ``sampling_model(net)`` returns model(x_t, t, mu) giving the
    ``model_output`` kind: the target, except "data" (mu + NN) for "residual".

    Why "residual": near t = T the image signal is alpha_T = 0.005 of x_t - mu, so every target
    must come from mu there; a noise-predicting network's image estimate divides its error by
    alpha and a briefly trained one restores photographs in wrong colours. Predicting the
    difference from mu, with the network's zero-initialised output layer, starts training at
    "the restoration is mu" (e.g. the bicubic upsampling) and only has to learn the correction.
    """

    name = "mr"
    TARGETS = ("noise", "data", "residual", "velocity")

    def __init__(self, sde: LinearSDE, target: str = "noise", x_shape=None, t_eps: Optional[float] = None):
        if not isinstance(sde, LinearSDE) or not sde.mean_reverting:
            raise TypeError(f"sde: expected a mean-reverting SDE (MRSDE or MRSDE.from_irsde), got {type(sde).__name__}")
        if target not in self.TARGETS:
            raise ValueError(f"target: expected one of {self.TARGETS}, got {target!r}")
        self.target = target
        self.model_output = "data" if target == "residual" else target
        super().__init__(sde, x_shape, x_shape, t_eps)

    @classmethod
    def for_images(cls, x_shape: Sequence[int], y_shape: Optional[Sequence[int]] = None, *, sde: Optional[LinearSDE] = None, lam_inf: float = 50 / 255, schedule: str = "cosine", alpha_T: float = 0.005, target: str = "noise", t_eps: Optional[float] = None) -> "MeanReverting":
        """A continuous MRSDE(lam_inf 50/255 as DA-CLIP, cosine, alpha_T 0.005, T 1), or ``sde``."""
        x_shape = _check_shape(x_shape, "x_shape")
        if y_shape is not None and _check_shape(y_shape, "y_shape") != x_shape:
            raise ValueError(f"y_shape: expected mu shaped like x, {x_shape}, got {tuple(y_shape)}")
        return cls(MRSDE(lam_inf, schedule, alpha_T) if sde is None else sde, target, x_shape, t_eps)

    @property
    def sampler_sde(self) -> LinearSDE:
        return self.sde

    def model_input_channels(self, image_channels=None, cond_channels=None) -> int:
        image_channels, cond_channels = self._channels(image_channels, cond_channels)
        if cond_channels != image_channels:
            raise ValueError(f"cond_channels: expected {image_channels} (mu is shaped like x), got {cond_channels}")
        return 2 * image_channels

    def model_output_channels(self, image_channels=None, cond_channels=None) -> int:
        return self.model_input_channels(image_channels, cond_channels) // 2

    def state_dict(self) -> Dict:
        return {"name": self.name, "sde": repr(self.sde), "target": self.target}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        for key, mine in (("sde", repr(self.sde)), ("target", self.target)):
            if state.get(key) != mine:
                raise ValueError(f"state: the checkpoint was trained with {key} = {state.get(key)!r}, this estimator has {mine!r}; build the estimator with the checkpoint's")

    def loss_coefficients(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """[B, 1, 3] float64 (weight 1 / D, noise scale k, target scale c) for the target."""
        weight = torch.full_like(t, 1.0 / dim)
        zero, one = torch.zeros_like(t), torch.ones_like(t)
        if self.target == "noise":
            k, c = one, zero
        elif self.target in ("data", "residual"):
            k, c = zero, one
        else:
            alpha, sigma, scale = self.sde.alpha(t), self.sde.sigma(t), self.sde.velocity_scale
            norm = torch.sqrt(alpha**2 + (sigma / scale) ** 2)
            k, c = scale * alpha / norm, -sigma / (scale * norm)
        return torch.stack([weight, k, c], dim=1)[:, None, :]

    def loss(self, model: Callable, x0: torch.Tensor, y0: torch.Tensor, generator: Optional[torch.Generator] = None, step: Optional[int] = None, *, offset_samples: int = 0, global_batch: Optional[int] = None) -> torch.Tensor:
        """Mean over the batch of ||NN(cat(x_t - mu, mu), t) - target||^2 / D_x; y0 is mu."""
        if step is not None:
            self.on_step(step)
        global_batch = self._check_batch(model, x0, y0, generator, offset_samples, global_batch)
        if y0.shape != x0.shape:
            raise ValueError(f"y0: expected mu shaped like x0, {tuple(x0.shape)}, got {tuple(y0.shape)}")
        batch, dim = x0.shape[0], x0[0].numel()
        t, seed = self._draw(generator, batch, offset_samples, global_batch, x0.device)
        coef_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        offset = offset_samples * dim
        # x_t - mu = alpha (x0 - mu) + sigma z: diffusing x0 - mu with a clean y = mu writes the
        # network input cat(x_t - mu, mu) in one pass; x0 - mu is also the velocity target's
        data_minus_mu = x0 - y0
        x_coefs = torch.stack([self.sde.alpha(t), self.sde.sigma(t)], dim=1).to(coef_dtype)
        network_input = torch.empty((batch, 2 * x0.shape[1], *x0.shape[2:]), dtype=x0.dtype, device=x0.device)
        noise = stored_noise(seed, offset, x0, x0.shape)
        noise_inject(data_minus_mu, x_coefs, y0.contiguous(), None, seed=seed, offset=offset, noise=None if noise is None else (noise, None), out=network_input)
        output = model(network_input, t.to(coef_dtype))
        _check_output(output, tuple(x0.shape), f"{x0.shape[1]} channels like x, unet_preset(..., estimator='mr')")
        target = {"noise": None, "data": x0, "residual": data_minus_mu, "velocity": data_minus_mu}[self.target]
        coefs = self.loss_coefficients(t, dim).to(coef_dtype)
        return weighted_score_loss(output.contiguous(), coefs, seed=seed, offset=offset, noise=noise, target=None if target is None else target.contiguous(),
                                   reduction="mean")

    def sampling_model(self, model: Callable, y: Optional[torch.Tensor] = None, mode: Optional[str] = None, generator: Optional[torch.Generator] = None, times: Optional[torch.Tensor] = None) -> Callable:
        """model(x_t, t, mu) -> the ``model_output`` kind; mu is the sampler's condition (or ``y``).

        Use with ``MRSampler(est.sde, steps, model_output=est.model_output).sample(m, mu)``.
        mode, generator and times exist for interface symmetry: mu is never diffused.
        """
        if not callable(model):
            raise TypeError(f"model: expected a callable model(input, t), got {type(model).__name__}")
        if mode not in (None, "clean"):
            raise ValueError(f"mode: expected None or 'clean' for mean-reverting diffusion (mu is never diffused), got {mode!r}")
        if y is not None:
            _check_images(y, "y", self.y_shape, any_size=True)

        def predict(x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor]) -> torch.Tensor:
            mu = y if mu is None else mu
            if mu is None:
                raise ValueError("mu: expected the degraded image (pass it to the sampler or as y), got None")
            output = model(torch.cat([x_t - mu, mu], dim=1), t)
            _check_output(output, tuple(x_t.shape), f"{x_t.shape[1]} channels like x, unet_preset(..., estimator='mr')")
            return mu + output if self.target == "residual" else output

        return predict


ESTIMATORS = {"cde": CDE, "cdiffe": CDiffE, "cmde": CMDE, "vscmde": VSCMDE, "mr": MeanReverting}


def make_estimator(name: str, x_shape: Sequence[int], y_shape: Sequence[int], **overrides) -> Estimator:
    """``ESTIMATORS[name].for_images(x_shape, y_shape, **overrides)``; names as in ``unet_preset``."""
    if name not in ESTIMATORS:
        raise ValueError(f"name: expected one of {sorted(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name].for_images(x_shape, y_shape, **overrides)


def _check_positive(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return float(value)


def _check_step(step, name: str) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{name}: expected an int >= 0 (training step), got {step!r}")
    return step


def _check_shape(shape, name: str) -> Optional[Shape]:
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{name}: expected (C, H, W) of positive ints, got {shape!r}")
    return tuple(shape)


def _check_images(x, name: str, shape: Optional[Shape], any_size: bool = False) -> None:
    """any_size: only the channels must match ``shape`` (sampling whole images with a convolutional
    or tiled network trained on crops)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype in {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch [B, C, H, W], got shape {tuple(x.shape)}")
    if shape is not None and any_size and x.shape[1] != shape[0]:
        raise ValueError(f"{name}: expected [B, {shape[0]}, H, W] ({shape[0]} channels, the estimator's {name[0]}_shape), got shape {tuple(x.shape)}")
    if shape is not None and not any_size and tuple(x.shape[1:]) != shape:
        raise ValueError(f"{name}: expected [B, {', '.join(map(str, shape))}] (the estimator's {name[0]}_shape), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def _check_output(output, expected: Tuple[int, ...], description: str) -> None:
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"model: expected an output of shape {expected} ({description}), got {got}")


def _default_sigma_max(x_shape: Shape, sigma_max_x: Optional[float]) -> float:
    return math.sqrt(math.prod(x_shape)) if sigma_max_x is None else sigma_max_x


def _y_sde(sigma_min: float, sigma_y_max: float, schedule: str, what: str = "sigma_y_max") -> VESDE:
    _check_positive(sigma_y_max, what)
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
            raise ValueError(f"state[{key!r}]: the checkpoint was trained with {entry['repr']}, this estimator has {current!r}; build the estimator with the checkpoint's SDE")
        return current
    raise ValueError(f"state[{key!r}]: expected a dict with sigma_min, sigma_max, schedule (VE) or repr, got {entry!r}")
