"""What every sampler loop does around its steps: the start state, the model call with its
checks, the divergence guard, clipping of the data prediction and the noise seed. The MR Sampler
(eager and static loops) and the baselines share these."""

import math
from typing import Callable, Optional, Union

import torch

from ..ops.philox import draw_seed
from ..sde import LinearSDE

Model = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def seed_from(generator: Optional[torch.Generator]) -> int:
    """A Philox seed for the fused ops, drawn from ``generator`` (or torch's default one)."""
    check_generator(generator)
    return draw_seed(generator)


def limit_data(x0: torch.Tensor, clip, threshold) -> torch.Tensor:
    if threshold is not None:
        # Imagen's dynamic thresholding: clamp to the per-sample quantile s (>= 1) and rescale
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), threshold, dim=1).clamp_min(1.0).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        x0 = x0.clamp(-s, s) / s
    if clip is not None:
        x0 = x0.clamp(*clip)
    return x0


def _check_batch(name: str, t) -> None:
    """A floating-point [B, ...] tensor of finite values (NaN in mu is the caller's, not the solver's)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor [B, ...], got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}"
        )
    if t.ndim < 1:
        raise ValueError(f"{name}: expected a tensor with a batch dimension [B, ...], got a 0-dim tensor")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf (shape {tuple(t.shape)})")


def initial_state(sde: LinearSDE, mu, x_T, shape, generator, device=None) -> torch.Tensor:
    if mu is not None:
        _check_batch("mu", mu)
    if x_T is not None:
        _check_batch("x_T", x_T)
        if mu is not None and x_T.shape != mu.shape:
            raise ValueError(f"x_T: expected shape {tuple(mu.shape)} (like mu), got {tuple(x_T.shape)}")
        return x_T
    if mu is not None:
        return sde.prior(mu, generator)
    if shape is None:
        raise ValueError("shape: expected the sample shape [B, C, H, W] when neither mu nor x_T is given, got None")
    prior = sde.prior(shape, generator)
    return prior if device is None else prior.to(device)


def time_tensor(x: torch.Tensor, s: float) -> torch.Tensor:
    """The [B] time tensor the model receives at time s (float64 for float64 states)."""
    return torch.full((x.shape[0],), s, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)


def call_model(
    model: Model,
    x: torch.Tensor,
    s: Union[float, torch.Tensor],
    condition,
    i: int = 0,
    steps: int = 1,
    name: str = "sampler",
    check: bool = True,
) -> torch.Tensor:
    """model(x, t, condition) for step i, checked: shape of x, a floating dtype (cast to x's), and
    (``check``) finite values, so that a network producing NaN is named as the cause, not the solver.
    s is the time, or its ready-made ``time_tensor``."""
    t = s if isinstance(s, torch.Tensor) else time_tensor(x, s)
    output = model(x, t, condition)
    if not isinstance(output, torch.Tensor) or output.shape != x.shape:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"model: expected an output of shape {tuple(x.shape)} (like x_t), got {got}")
    if not output.is_floating_point():
        raise TypeError(f"model: expected a floating-point output (like x_t, {x.dtype}), got {output.dtype}")
    if check and not bool(torch.isfinite(output).all()):
        time = float(t.reshape(-1)[0]) if t.numel() else float("nan")
        raise FloatingPointError(
            f"{name}: the model's output at step {i + 1}/{steps} (t = {time:.4g}) holds NaN or inf; the network "
            f"or its weights produce non-finite values (not a solver problem: more steps will not help)"
        )
    if output.dtype != x.dtype:
        output = output.to(x.dtype)
    return output


def divergence_limit(sde: LinearSDE, mu: Optional[torch.Tensor]) -> float:
    """A bound no healthy sample exceeds: far beyond the prior's and the data's range."""
    return 1e3 * max(sde.prior_std, 1.0) + (float(mu.abs().max()) if mu is not None and mu.numel() else 0.0)


def check_state(x: torch.Tensor, limit: float, i: int, steps: int, s: float, t: float, name: str) -> None:
    if x.numel() == 0:
        return
    largest = float(x.abs().max())
    if not math.isfinite(largest) or largest > limit:
        what = "NaN or inf" if not math.isfinite(largest) else f"values up to {largest:.3g} (limit {limit:.3g})"
        raise FloatingPointError(
            f"{name}: step {i + 1}/{steps} (t {s:.4g} -> {t:.4g}) produced {what}; the solver diverged (try more steps, prediction='data', or a lower order)"
        )
