"""What every estimator shares: the interface, the draw of t and the Philox seed, the noise
policy, and the checks of shapes, images and model outputs (see the package docstring)."""

from abc import ABC, abstractmethod
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..checks import check_positive
from ..ops import stored_noise
from ..ops.philox import draw_seed
from ..sde import LinearSDE

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VE_T_EPS = 1e-5
Shape = Tuple[int, int, int]


class Estimator(ABC):
    """Common interface; see the module docstring. Subclasses set ``name`` and ``model_output`` and
    define ``_loss``, ``sampling_model`` and ``model_output_channels``."""

    name = ""
    # what sampling_model's callable returns (the MR Sampler's ``model_output``)
    model_output = "noise"

    def __init__(self, sde, x_shape: Optional[Sequence[int]], y_shape: Optional[Sequence[int]], t_eps: Optional[float]):
        self.sde = sde
        self.x_shape = check_shape(x_shape, "x_shape")
        self.y_shape = check_shape(y_shape, "y_shape")
        if self.x_shape is not None and self.y_shape is not None and self.x_shape[1:] != self.y_shape[1:]:
            raise ValueError(
                f"y_shape: expected the spatial size {self.x_shape[1:]} of x_shape (y is concatenated to x), got {self.y_shape[1:]}"
            )
        self.t_eps = VE_T_EPS * float(sde.T) if t_eps is None else check_positive(t_eps, "t_eps")
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
        check_step(step, "step")

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
        """Mean over the batch of the per-sample training loss (the subclass's ``_loss``).

        model(input, t [B]) -> the network output; x0 [B, C_x, H, W] clean images, y0 [B, C_y, H, W]
        their conditions. step: the training step (VS-CMDE applies its schedule; the others ignore
        it). offset_samples / global_batch: see the package docstring.
        """
        if step is not None:
            self.on_step(step)
        global_batch = self._check_batch(model, x0, y0, generator, offset_samples, global_batch)
        t, seed = self._draw(generator, x0.shape[0], offset_samples, global_batch, x0.device)
        return self._loss(model, x0, y0, t, seed, offset_samples)

    @abstractmethod
    def _loss(
        self, model: Callable, x0: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, seed: int, offset_samples: int
    ) -> torch.Tensor:
        """The loss at the drawn times t [B] (float64) with the Philox seed ``seed``."""

    def _check_batch(self, model, x0, y0, generator, offset_samples, global_batch) -> int:
        if not callable(model):
            raise TypeError(f"model: expected a callable model(input, t), got {type(model).__name__}")
        check_images(x0, "x0", self.x_shape)
        check_images(y0, "y0", self.y_shape)
        if y0.shape[0] != x0.shape[0] or y0.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"y0: expected batch {x0.shape[0]} and spatial size {tuple(x0.shape[2:])} (like x0), got shape {tuple(y0.shape)}"
            )
        if y0.dtype != x0.dtype or y0.device != x0.device:
            raise TypeError(f"y0: expected dtype {x0.dtype} on {x0.device} (like x0), got {y0.dtype} on {y0.device}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        batch = x0.shape[0]
        if not isinstance(offset_samples, int) or isinstance(offset_samples, bool) or offset_samples < 0:
            raise ValueError(
                f"offset_samples: expected an int >= 0 (index of this batch's first sample in the global batch), got {offset_samples!r}"
            )
        if global_batch is None:
            if offset_samples:
                raise ValueError(
                    f"global_batch: expected the global batch size when offset_samples = {offset_samples} > 0 (all ranks draw t for it), got None"
                )
            global_batch = batch
        if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < offset_samples + batch:
            raise ValueError(
                f"global_batch: expected an int >= offset_samples + batch = {offset_samples + batch}, got {global_batch!r}"
            )
        return global_batch

    def _draw(self, generator, batch: int, offset_samples: int, global_batch: int, device) -> Tuple[torch.Tensor, int]:
        """(t [batch] float64 on ``device``, Philox seed), in the order the module docstring gives."""
        source = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(global_batch, generator=generator, dtype=torch.float64, device=source)
        seed = draw_seed(generator)
        T = float(self.sde.T)
        t = self.t_eps + (T - self.t_eps) * u[offset_samples : offset_samples + batch]
        return t.to(device), seed

    def _stored_noise(self, seed: int, offset: int, like: torch.Tensor, shape: Sequence[int]) -> Optional[torch.Tensor]:
        """The batch's noise drawn once where the backend reads it faster than it regenerates it
        (``ops.stored_noise``), else None: the ops then regenerate it from (seed, offset)."""
        return stored_noise(seed, offset, like, shape)


def check_step(step, name: str) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{name}: expected an int >= 0 (training step), got {step!r}")
    return step


def check_shape(shape, name: str) -> Optional[Shape]:
    if shape is None:
        return None
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise ValueError(f"{name}: expected (C, H, W) of positive ints, got {shape!r}")
    return tuple(shape)


def check_images(x, name: str, shape: Optional[Shape], any_size: bool = False) -> None:
    """any_size: only the channels must match ``shape`` (sampling whole images with a convolutional
    or tiled network trained on crops)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype in {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch [B, C, H, W], got shape {tuple(x.shape)}")
    if shape is not None and any_size and x.shape[1] != shape[0]:
        raise ValueError(
            f"{name}: expected [B, {shape[0]}, H, W] ({shape[0]} channels, the estimator's {name[0]}_shape), got shape {tuple(x.shape)}"
        )
    if shape is not None and not any_size and tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{name}: expected [B, {', '.join(map(str, shape))}] (the estimator's {name[0]}_shape), got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def check_output(output, expected: Tuple[int, ...], description: str) -> None:
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"model: expected an output of shape {expected} ({description}), got {got}")
