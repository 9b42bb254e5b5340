"""weighted_score_loss: the MLE-weighted denoising score-matching loss and its gradient in one pass.

The noise is regenerated from (seed, offset) exactly as ``noise_inject`` drew it, so nothing of
the forward diffusion is stored; the gradient with respect to the network output comes out of
the same pass and the autograd backward only rescales it per sample (Liger-style fused loss).
"""

from typing import Optional, Tuple

import torch

from . import reference
from .dispatch import check_like, check_per_sample, describe, register, resolve
from .philox import check_seed_offset


def _torch_backend(loss, grad, output, coefs, split, seed, offset, noise, target):
    ref_loss, ref_grad = reference.weighted_score_loss(output, coefs, split, seed, offset, noise, target)
    loss.copy_(ref_loss)
    grad.copy_(ref_grad)


register("weighted_score_loss", "torch", _torch_backend)


def _loss_like(output: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
    return torch.empty(output.shape[0], dtype=dtype, device=output.device)


@torch.library.custom_op("msdiff_fast::weighted_score_loss", mutates_args=())
def _weighted_score_loss(
    output: torch.Tensor,
    coefs: torch.Tensor,
    split: Optional[int],
    seed: int,
    offset: int,
    noise: Optional[torch.Tensor],
    target: Optional[torch.Tensor],
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    loss = _loss_like(output)
    grad = torch.empty_like(output, memory_format=torch.contiguous_format)
    implementation = resolve("weighted_score_loss", backend, output.device, output.dtype)
    implementation(loss, grad, output, coefs, split, seed, offset, noise, target)
    return loss, grad


@_weighted_score_loss.register_fake
def _(output, coefs, split, seed, offset, noise, target, backend):
    return _loss_like(output), torch.empty_like(output, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    # Otherwise autograd fills an x-sized tensor of zeros for the gradient output's gradient.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    scale = grad_loss.reshape(grad.shape[0], *([1] * (grad.ndim - 1)))
    return (scale * grad).to(grad.dtype), None, None, None, None, None, None, None


_weighted_score_loss.register_autograd(_backward, setup_context=_setup_context)


def weighted_score_loss(
    output: torch.Tensor,
    coefs: torch.Tensor,
    *,
    split: Optional[int] = None,
    seed: int = 0,
    offset: int = 0,
    noise: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample loss [B]: sum over segments g of w * sum (output - k z - c target)^2.

    output: network output [B, ...] (its sample may be [x part | y part], split after ``split``
    elements); coefs: [B, S, 3] = (weight w, noise scale k, target scale c) per segment, S = 1
    without split, 2 with it. z for element j of sample b is stream position offset + b * D + j,
    or ``noise`` (like output). target: optional tensor like output (data/velocity targets).
    Differentiable in output; the gradient is computed in the forward pass.
    """
    check_like(output, "output", output, "output")
    if output.ndim < 1 or output.shape[0] == 0:
        raise ValueError(describe("output", "a non-empty batch [B, ...]", f"shape {tuple(output.shape)}"))
    batch, dim = output.shape[0], output[0].numel()
    segments = 1
    if split is not None:
        if not isinstance(split, int) or not 0 < split < dim:
            raise ValueError(describe("split", f"an int in (0, {dim}) (elements per sample)", repr(split)))
        segments = 2
    check_per_sample(coefs, "coefs", batch, output.device, (segments, 3))
    if noise is not None:
        check_like(noise, "noise", output, "output", same_dtype=False)
    else:
        check_seed_offset(seed, offset, output.numel())
    if target is not None:
        check_like(target, "target", output, "output", same_dtype=False)
    loss, _ = _weighted_score_loss(output, coefs, split, seed, offset, noise, target, backend)
    return loss
