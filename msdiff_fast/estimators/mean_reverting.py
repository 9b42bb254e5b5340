"""Mean-reverting (IR-SDE / DA-CLIP style) diffusion towards the degraded image, and its settings."""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from ..ops import noise_inject, weighted_score_loss
from ..samplers.parameterization import velocity_norm_squared
from ..sde import MRSDE, LinearSDE
from .base import Estimator, check_images, check_output, check_shape


@dataclass(frozen=True)
class MROptions:
    """``MeanReverting.for_images``: a continuous MRSDE(lam_inf 50/255 as DA-CLIP, cosine, alpha_T
    0.005, T 1), or ``sde``; ``target``: what the network predicts (see ``MeanReverting``)."""

    lam_inf: float = 50 / 255
    schedule: str = "cosine"
    alpha_T: float = 0.005
    target: str = "noise"
    t_eps: Optional[float] = None
    sde: Optional[LinearSDE] = None

    def mr_sde(self) -> LinearSDE:
        return MRSDE(self.lam_inf, self.schedule, self.alpha_T) if self.sde is None else self.sde


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
    def for_images(cls, x_shape: Sequence[int], y_shape: Optional[Sequence[int]] = None, **settings) -> "MeanReverting":
        """A continuous MRSDE(lam_inf 50/255 as DA-CLIP, cosine, alpha_T 0.005, T 1), or ``sde`` (``MROptions``)."""
        options = MROptions(**settings)
        x_shape = check_shape(x_shape, "x_shape")
        if y_shape is not None and check_shape(y_shape, "y_shape") != x_shape:
            raise ValueError(f"y_shape: expected mu shaped like x, {x_shape}, got {tuple(y_shape)}")
        return cls(options.mr_sde(), options.target, x_shape, options.t_eps)

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
                raise ValueError(
                    f"state: the checkpoint was trained with {key} = {state.get(key)!r}, this estimator has {mine!r}; build the estimator with the checkpoint's"
                )

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
            norm = torch.sqrt(velocity_norm_squared(self.sde, t))
            k, c = scale * alpha / norm, -sigma / (scale * norm)
        return torch.stack([weight, k, c], dim=1)[:, None, :]

    def _check_batch(self, model, x0, y0, generator, offset_samples, global_batch) -> int:
        global_batch = super()._check_batch(model, x0, y0, generator, offset_samples, global_batch)
        if y0.shape != x0.shape:
            raise ValueError(f"y0: expected mu shaped like x0, {tuple(x0.shape)}, got {tuple(y0.shape)}")
        return global_batch

    def _loss(
        self, model: Callable, x0: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, seed: int, offset_samples: int
    ) -> torch.Tensor:
        """||NN(cat(x_t - mu, mu), t) - target||^2 / D_x; y0 is mu."""
        batch, dim = x0.shape[0], x0[0].numel()
        coef_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        offset = offset_samples * dim
        # x_t - mu = alpha (x0 - mu) + sigma z: diffusing x0 - mu with a clean y = mu writes the
        # network input cat(x_t - mu, mu) in one pass; x0 - mu is also the velocity target's
        data_minus_mu = x0 - y0
        x_coefs = torch.stack([self.sde.alpha(t), self.sde.sigma(t)], dim=1).to(coef_dtype)
        network_input = torch.empty((batch, 2 * x0.shape[1], *x0.shape[2:]), dtype=x0.dtype, device=x0.device)
        noise = self._stored_noise(seed, offset, x0, x0.shape)
        noise_inject(
            data_minus_mu,
            x_coefs,
            y0.contiguous(),
            None,
            seed=seed,
            offset=offset,
            noise=None if noise is None else (noise, None),
            out=network_input,
        )
        output = model(network_input, t.to(coef_dtype))
        check_output(output, tuple(x0.shape), f"{x0.shape[1]} channels like x, unet_preset(..., estimator='mr')")
        target = {"noise": None, "data": x0, "residual": data_minus_mu, "velocity": data_minus_mu}[self.target]
        coefs = self.loss_coefficients(t, dim).to(coef_dtype)
        return weighted_score_loss(
            output.contiguous(),
            coefs,
            seed=seed,
            offset=offset,
            noise=noise,
            target=None if target is None else target.contiguous(),
            reduction="mean",
        )

    def sampling_model(
        self,
        model: Callable,
        y: Optional[torch.Tensor] = None,
        mode: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        times: Optional[torch.Tensor] = None,
    ) -> Callable:
        """model(x_t, t, mu) -> the ``model_output`` kind; mu is the sampler's condition (or ``y``).

        Use with ``MRSampler(est.sde, steps, model_output=est.model_output).sample(m, mu)``.
        mode, generator and times exist for interface symmetry: mu is never diffused.
        """
        if not callable(model):
            raise TypeError(f"model: expected a callable model(input, t), got {type(model).__name__}")
        if mode not in (None, "clean"):
            raise ValueError(f"mode: expected None or 'clean' for mean-reverting diffusion (mu is never diffused), got {mode!r}")
        if y is not None:
            check_images(y, "y", self.y_shape, any_size=True)

        def predict(x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor]) -> torch.Tensor:
            mu = y if mu is None else mu
            if mu is None:
                raise ValueError("mu: expected the degraded image (pass it to the sampler or as y), got None")
            output = model(torch.cat([x_t - mu, mu], dim=1), t)
            check_output(output, tuple(x_t.shape), f"{x_t.shape[1]} channels like x, unet_preset(..., estimator='mr')")
            return mu + output if self.target == "residual" else output

        return predict
