"""IR-SDE and DA-CLIP networks (Algolzw/image-restoration-sde, Algolzw/daclip-uir) as msdiff
models: ``irsde_model`` wraps one, ``IRSDESampler`` samples with it on an ``MRSDE.from_irsde``
schedule."""

import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from ..samplers.mr_sampler import MRSampler
from ..sde import MRSDE, DiscreteMRSDE, LinearSDE, check_sde
from .calls import check_network_output, time_for

NETWORK_SIGNATURES = ("irsde", "concat", "msdiff")


class IntegerTimeWarning(UserWarning):
    """A network trained on integer time indices received a rounded off-grid time."""


class _IRSDEModel:
    """model(x_t, t, mu) for a network with an IR-SDE-style signature (see ``irsde_model``)."""

    def __init__(self, network, network_signature: str, integer_time: bool, network_kwargs: Mapping):
        self.network, self.signature = network, network_signature
        self.integer_time, self.network_kwargs = integer_time, dict(network_kwargs)
        self.warned = False

    def network_time(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = time_for(x, t)
        if not self.integer_time:
            return t
        index = t.round()
        if not self.warned and bool((index - t).abs().max() > 1e-6):
            self.warned = True
            warnings.warn(
                f"irsde_model: the network was trained on integer t, and the sampler asked for t = {float(t[0]):.4g}: "
                f"it is called at the nearest grid index {int(index[0])} (the solver still uses the exact schedule at t). "
                "Use a time grid on integers (e.g. timesteps='uniform_t' with steps dividing T) to avoid the rounding.",
                IntegerTimeWarning,
                stacklevel=4,
            )
        return index.long()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, mu: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mu is None:
            raise ValueError("mu: expected the degraded image (IR-SDE networks are conditioned on it), got None")
        time = self.network_time(x_t, t)
        if self.signature == "irsde":
            output = self.network(x_t, mu, time, **self.network_kwargs)
        elif self.signature == "concat":
            output = self.network(torch.cat([x_t - mu, mu], dim=1), time, **self.network_kwargs)
        else:
            output = self.network(x_t, time, mu, **self.network_kwargs)
        return check_network_output(output, x_t, "network")


def irsde_model(
    network: Callable, sde: LinearSDE, network_signature: str = "irsde", integer_time: bool = False, **network_kwargs
) -> Callable:
    """An IR-SDE / DA-CLIP network as an msdiff model(x_t, t, mu), unchanged.

    network_signature: "irsde": ``network(x_t, mu, t, **network_kwargs)`` (IR-SDE's and DA-CLIP's
    ConditionalUNet, which builds cat(x_t - mu, mu) itself); "concat": ``network(cat(x_t - mu, mu),
    t, **network_kwargs)`` (a plain U-Net with that input, e.g. ``unet_preset(..., estimator="mr")``);
    "msdiff": ``network(x_t, t, mu, **network_kwargs)``. t is a [B] tensor in the SDE's units
    (grid indices 0..T for ``MRSDE.from_irsde``). integer_time=True (discrete schedules only) calls
    the network with the nearest integer index (a long tensor, as in IR-SDE training) and warns once
    when that rounds.
    network_kwargs (e.g. DA-CLIP's text_context=..., image_context=...) go to every call.

    Example::

        sde = MRSDE.from_irsde(50, T=100, schedule="cosine", eps=0.005)   # DA-CLIP's training schedule
        model = irsde_model(daclip_unet, sde, "irsde", text_context=degra, image_context=image)
        x0 = MRSampler(sde, 10, solver="sde", order=2, model_output="noise").sample(model, lq_image)
    """
    if not callable(network):
        raise TypeError(f"network: expected a callable (an nn.Module), got {type(network).__name__}")
    check_sde(sde)
    if network_signature not in NETWORK_SIGNATURES:
        raise ValueError(f"network_signature: expected one of {NETWORK_SIGNATURES}, got {network_signature!r}")
    if not isinstance(integer_time, bool):
        raise TypeError(f"integer_time: expected a bool, got {type(integer_time).__name__}")
    if integer_time and not isinstance(sde, DiscreteMRSDE):
        raise ValueError(
            f"integer_time: integer time indices exist on a discrete IR-SDE schedule (MRSDE.from_irsde), got sde {sde!r}"
        )
    return _IRSDEModel(network, network_signature, integer_time, network_kwargs)


class IRSDESampler:
    """MR Sampler for an IR-SDE / DA-CLIP checkpoint: its schedule, its network, 5-20 evaluations.

    max_sigma, T, eps, schedule: the checkpoint's ``sde`` options (max_sigma >= 1 is on the 0-255
    scale); convention "irsde" is the schedule IR-SDE / DA-CLIP train with (thetabar_0 = 0), "mrs"
    the one the official MR Sampler code samples with (shifted by theta_0); interpolation between
    grid points "linear" (the MR Sampler code's) or "exact" (see DiscreteMRSDE). steps, solver, order,
    prediction, timesteps and ``options`` go to ``MRSampler``; model_output is what the network
    predicts ("noise" for IR-SDE / DA-CLIP). network_signature, integer_time: see ``irsde_model``.

    Example (DA-CLIP universal image restoration, batched)::

        sampler = IRSDESampler(max_sigma=50, T=100, eps=0.005, schedule="cosine", steps=10)
        restored = sampler.sample(unet, lq_batch, generator=torch.Generator("cuda").manual_seed(0),
                                  text_context=degra_context, image_context=image_context).clamp(0, 1)
    """

    def __init__(
        self,
        max_sigma: float,
        T: int = 100,
        eps: float = 0.005,
        schedule: str = "cosine",
        convention: str = "irsde",
        interpolation: str = "linear",
        steps: int = 10,
        solver: str = "sde",
        order: int = 2,
        prediction: str = "data",
        model_output: str = "noise",
        network_signature: str = "irsde",
        integer_time: bool = False,
        timesteps: Union[str, Sequence[float], torch.Tensor] = "uniform_lambda",
        **options,
    ):
        if network_signature not in NETWORK_SIGNATURES:
            raise ValueError(f"network_signature: expected one of {NETWORK_SIGNATURES}, got {network_signature!r}")
        if not isinstance(integer_time, bool):
            raise TypeError(f"integer_time: expected a bool, got {type(integer_time).__name__}")
        self.sde = MRSDE.from_irsde(max_sigma, T, schedule, eps, convention, interpolation)
        self.sampler = MRSampler(
            self.sde,
            steps,
            solver=solver,
            order=order,
            prediction=prediction,
            model_output=model_output,
            timesteps=timesteps,
            **options,
        )
        self.network_signature, self.integer_time = network_signature, integer_time

    def __repr__(self):
        return f"IRSDESampler({self.sampler!r}, network_signature={self.network_signature!r}, integer_time={self.integer_time})"

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def model(self, network: Callable, **network_kwargs) -> Callable:
        """The network as an msdiff model(x_t, t, mu) on this sampler's schedule."""
        return irsde_model(network, self.sde, self.network_signature, self.integer_time, **network_kwargs)

    def sample(
        self,
        network: Callable,
        mu: torch.Tensor,
        x_T: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        callback=None,
        progress: bool = False,
        **network_kwargs,
    ) -> torch.Tensor:
        """Restore the degraded batch ``mu`` [B, C, H, W]; x_T defaults to mu + max_sigma * z."""
        with torch.no_grad():
            return self.sampler.sample(
                self.model(network, **network_kwargs), mu, x_T=x_T, generator=generator, callback=callback, progress=progress
            )
