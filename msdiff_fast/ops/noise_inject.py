"""noise_inject: the forward (multi-speed) diffusion of a training batch in one pass.

    x_t = a_x x0 + (1 - a_x) mu + s_x z_x,     y_t = a_y y0 + s_y z_y      (per sample)

Noise positions follow the concatenated network input cat(x_t, y_t): see
``reference.noise_inject``. With ``out`` = a [B, C_x + C_y, ...] buffer both halves are written
straight into it and the concatenation disappears.
"""

from typing import Optional, Tuple

import torch

from . import reference
from .dispatch import check_like, check_no_grad, check_out_overlap, check_per_sample, describe, register, resolve
from .philox import check_seed_offset


def _torch_backend(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed, offset, noise_x, noise_y):
    noise = None if noise_x is None else (noise_x, noise_y)
    x_t, y_t = reference.noise_inject(x0, x_coefs, y0, y_coefs, mu, seed, offset, noise)
    out_x.copy_(x_t)
    if out_y is not None:
        out_y.copy_(y_t)


register("noise_inject", "torch", _torch_backend)


@torch.library.custom_op("msdiff_fast::noise_inject", mutates_args=("out_x", "out_y"))
def _noise_inject(
    out_x: torch.Tensor,
    out_y: Optional[torch.Tensor],
    x0: torch.Tensor,
    x_coefs: torch.Tensor,
    y0: Optional[torch.Tensor],
    y_coefs: Optional[torch.Tensor],
    mu: Optional[torch.Tensor],
    seed: int,
    offset: int,
    noise_x: Optional[torch.Tensor],
    noise_y: Optional[torch.Tensor],
    backend: str,
) -> None:
    resolve("noise_inject", backend, x0.device, x0.dtype)(
        out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed, offset, noise_x, noise_y
    )


@_noise_inject.register_fake
def _(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed, offset, noise_x, noise_y, backend):
    return None


def _check_sample_contiguous(t: torch.Tensor, name: str) -> None:
    """Each sample contiguous; the batch stride may be anything (views into a cat buffer)."""
    if t.numel() and not t[0].is_contiguous():
        raise ValueError(describe(name, "each sample contiguous (t[0].is_contiguous())", f"strides {t.stride()}"))


def noise_inject(
    x0: torch.Tensor,
    x_coefs: torch.Tensor,
    y0: Optional[torch.Tensor] = None,
    y_coefs: Optional[torch.Tensor] = None,
    *,
    mu: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
    noise: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Diffuse x0 (and y0) to time t in one pass; returns (x_t, y_t or None).

    x_coefs, y_coefs: [B, 2] per-sample (mean scale, std), float32/float64. mu (like x0): the
    mean-reverting target of x. y0 without y_coefs is a clean condition (copied, no noise).
    noise: optional explicit (z_x, z_y). out: optional [B, C_x + C_y, *spatial] buffer (or
    [B, C_x, ...] without y) of x0's dtype; x_t and y_t are then views into it. Its x part may be
    x0, mu or z_x itself and its y part y0 or z_y itself (same layout); any other overlap with an
    input is refused. Not differentiable: inputs that require grad are refused. An empty batch
    gives empty results.
    """
    check_like(x0, "x0", x0, "x0")
    if x0.ndim < 2:
        raise ValueError(describe("x0", "a batch [B, C, ...]", f"shape {tuple(x0.shape)}"))
    batch = x0.shape[0]
    check_per_sample(x_coefs, "x_coefs", batch, x0.device, (2,))
    if mu is not None:
        check_like(mu, "mu", x0, "x0")
    if y0 is not None:
        check_float_y(y0, x0)
        if y_coefs is not None:
            check_per_sample(y_coefs, "y_coefs", batch, x0.device, (2,))
    elif y_coefs is not None:
        raise ValueError(describe("y_coefs", "None when y0 is None", "a tensor"))
    noisy_y = y0 is not None and y_coefs is not None
    noise_x = noise_y = None
    if noise is not None:
        noise_x, noise_y = noise
        check_like(noise_x, "noise[0]", x0, "x0", same_dtype=False)
        if noisy_y:
            check_like(noise_y, "noise[1]", y0, "y0", same_dtype=False)
        else:
            noise_y = None
    else:
        check_seed_offset(seed, offset, x0.numel() + (y0.numel() if noisy_y else 0))
    for name, t in (
        ("x0", x0),
        ("x_coefs", x_coefs),
        ("y0", y0),
        ("y_coefs", y_coefs),
        ("mu", mu),
        ("noise[0]", noise_x),
        ("noise[1]", noise_y),
    ):
        check_no_grad(t, name, "noise_inject", None)
    if out is None:
        out_x = torch.empty_like(x0, memory_format=torch.contiguous_format)
        out_y = None if y0 is None else torch.empty_like(y0, memory_format=torch.contiguous_format)
    else:
        out_x, out_y = _split_out(out, x0, y0)
        coefs = {"x_coefs": x_coefs, "y_coefs": y_coefs}
        check_out_overlap(
            out_x, "out (its x part)", {"x0": x0, "mu": mu, "noise[0]": noise_x}, {"y0": y0, "noise[1]": noise_y, **coefs}
        )
        if out_y is not None:
            check_out_overlap(
                out_y, "out (its y part)", {"y0": y0, "noise[1]": noise_y}, {"x0": x0, "mu": mu, "noise[0]": noise_x, **coefs}
            )
    if torch.compiler.is_compiling() or x0.device.type == "meta":
        _noise_inject(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed, offset, noise_x, noise_y, backend)
    else:
        # Plain eager call: skip the custom-op dispatcher's per-call cost.
        resolve("noise_inject", backend, x0.device, x0.dtype)(
            out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed, offset, noise_x, noise_y
        )
    return out_x, out_y


def check_float_y(y0: torch.Tensor, x0: torch.Tensor) -> None:
    check_like(y0, "y0", y0, "y0")
    if y0.shape[0] != x0.shape[0] or y0.device != x0.device or y0.dtype != x0.dtype:
        raise ValueError(
            describe(
                "y0",
                f"batch {x0.shape[0]}, device {x0.device}, dtype {x0.dtype} (like x0)",
                f"shape {tuple(y0.shape)}, {y0.device}, {y0.dtype}",
            )
        )


def _split_out(out: torch.Tensor, x0: torch.Tensor, y0: Optional[torch.Tensor]):
    channels = x0.shape[1] + (0 if y0 is None else y0.shape[1])
    expected = (x0.shape[0], channels, *x0.shape[2:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        raise ValueError(
            describe(
                "out",
                f"a tensor of shape {expected} (x0 and y0 concatenated on dim 1)",
                tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__,
            )
        )
    if y0 is not None and y0.shape[2:] != x0.shape[2:]:
        raise ValueError(describe("y0", f"spatial shape {tuple(x0.shape[2:])} to share the out buffer", tuple(y0.shape[2:])))
    if out.dtype != x0.dtype or out.device != x0.device:
        raise TypeError(describe("out", f"dtype {x0.dtype} on {x0.device}", f"{out.dtype} on {out.device}"))
    if not out.is_contiguous():
        raise ValueError(describe("out", "a contiguous buffer", f"strides {out.stride()}"))
    out_x = out[:, : x0.shape[1]]
    out_y = None if y0 is None else out[:, x0.shape[1] :]
    return out_x, out_y
