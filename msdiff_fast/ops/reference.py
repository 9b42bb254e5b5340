"""Pure-PyTorch references of the fused ops: the fallback backend and the test oracle. Each takes
the arguments of the public op of its name (``msdiff_fast.ops``), checked there, in the order of
the backends' functions (less ``out``).

Math runs in float32 for float32/float16/bfloat16 inputs and in float64 for float64 inputs,
which is what every compiled backend does too; calling with float64 copies of the inputs gives
the float64 oracle the kernels are tested against.
"""

import math
from typing import Optional, Tuple

import torch

from ..checks import per_sample
from .philox import philox_normal


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample(values: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    return per_sample(values.to(dtype), ndim)


def mr_step(x, terms, coefs, noise_coef=None, seed=0, offset=0, noise=None) -> torch.Tensor:
    """coefs[:, 0] * x + sum_k coefs[:, k + 1] * terms[k] + noise_coef * z, per sample."""
    dtype = compute_dtype(x.dtype)
    result = _per_sample(coefs[:, 0], x.ndim, dtype) * x.to(dtype)
    for k, term in enumerate(terms):
        result = result + _per_sample(coefs[:, k + 1], x.ndim, dtype) * term.to(dtype)
    if noise_coef is not None:
        z = (
            noise.to(dtype)
            if noise is not None
            else philox_normal(seed, offset, x.numel(), device=x.device, dtype=dtype).view(x.shape)
        )
        result = result + _per_sample(noise_coef, x.ndim, dtype) * z
    return result.to(x.dtype)


def noise_inject(
    x0, x_coefs, y0=None, y_coefs=None, mu=None, seed=0, offset=0, noise=None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x_t = a_x x0 + (1 - a_x) mu + s_x z_x and y_t = a_y y0 + s_y z_y, per sample.

    x_coefs / y_coefs are [B, 2] = (mean scale a, std s). Sample b draws its x noise at stream
    positions offset + b * D + j and its y noise at offset + b * D + D_x + k, D = D_x + D_y, which
    is the flat index in the concatenated network input cat(x_t, y_t). A y without y_coefs is a
    clean condition: copied, and it takes no stream positions (D = D_x).
    """
    dtype = compute_dtype(x0.dtype)
    batch = x0.shape[0]
    x_dim = math.prod(x0.shape[1:])
    y_dim = math.prod(y0.shape[1:]) if (y0 is not None and y_coefs is not None) else 0
    if noise is not None:
        z_x, z_y = noise[0].to(dtype), (noise[1].to(dtype) if noise[1] is not None else None)
    else:
        z = philox_normal(seed, offset, batch * (x_dim + y_dim), device=x0.device, dtype=dtype).view(batch, x_dim + y_dim)
        z_x = z[:, :x_dim].reshape(x0.shape)
        z_y = z[:, x_dim:].reshape(y0.shape) if y_dim else None
    scale, std = _per_sample(x_coefs[:, 0], x0.ndim, dtype), _per_sample(x_coefs[:, 1], x0.ndim, dtype)
    x_t = scale * x0.to(dtype) + std * z_x
    if mu is not None:
        x_t = x_t + (1 - scale) * mu.to(dtype)
    if y0 is None:
        return x_t.to(x0.dtype), None
    if y_coefs is None:
        return x_t.to(x0.dtype), y0.clone()
    y_scale, y_std = _per_sample(y_coefs[:, 0], y0.ndim, dtype), _per_sample(y_coefs[:, 1], y0.ndim, dtype)
    y_t = y_scale * y0.to(dtype) + y_std * z_y
    return x_t.to(x0.dtype), y_t.to(y0.dtype)


def weighted_score_loss(
    output, coefs, split=None, seed=0, offset=0, noise=None, target=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weighted squared error against a noise-based target, and its gradient.

    Sample b is split into segments (the first ``split`` elements of each sample and the rest,
    or one segment); segment g has coefs[b, g] = (weight w, noise scale k, target scale c):
    r = output - (k z + c target), loss_b = sum_g w sum r^2, grad = 2 w r.
    z for element j of sample b is stream position offset + b * D + j, D = output[0].numel():
    the same noise ``noise_inject`` drew for the network input, regenerated instead of stored.
    Returns (loss [B] in float32, or float64 for float64 output; grad like output).
    """
    dtype = compute_dtype(output.dtype)
    batch = output.shape[0]
    dim = math.prod(output.shape[1:])
    flat = output.reshape(batch, dim).to(dtype)
    if noise is not None:
        z = noise.reshape(batch, dim).to(dtype)
    else:
        z = philox_normal(seed, offset, batch * dim, device=output.device, dtype=dtype).view(batch, dim)
    bounds = [0, dim] if split is None else [0, split, dim]
    weights = torch.empty(batch, dim, dtype=dtype, device=output.device)
    wanted = torch.empty_like(weights)
    for g, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        c = coefs[:, g].to(dtype)
        weights[:, start:stop] = c[:, 0:1]
        wanted[:, start:stop] = c[:, 1:2] * z[:, start:stop]
        if target is not None:
            wanted[:, start:stop] += c[:, 2:3] * target.reshape(batch, dim)[:, start:stop].to(dtype)
    residual = flat - wanted
    loss = (weights * residual * residual).sum(dim=1)
    grad = (2 * weights * residual).to(output.dtype).reshape(output.shape)
    return loss, grad
