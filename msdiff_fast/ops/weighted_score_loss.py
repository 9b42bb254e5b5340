"""weighted_score_loss: the MLE-weighted denoising score-matching loss and its gradient in one pass.

The noise is regenerated from (seed, offset) exactly as ``noise_inject`` drew it, so nothing of
the forward diffusion is stored; the gradient with respect to the network output comes out of
the same pass and the autograd backward only rescales it per sample (Liger-style fused loss), in
place when the op reduces the batch itself (``reduction="mean"`` or ``"sum"``).
"""

import math
from typing import Optional, Tuple

import torch

from . import reference
from .dispatch import check_like, check_no_grad, check_per_sample, describe, register, resolve
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
    scale_grad_in_place: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    loss = _loss_like(output)
    grad = torch.empty_like(output, memory_format=torch.contiguous_format)
    implementation = resolve("weighted_score_loss", backend, output.device, output.dtype)
    implementation(loss, grad, output, coefs, split, seed, offset, noise, target)
    return loss, grad


@_weighted_score_loss.register_fake
def _(output, coefs, split, seed, offset, noise, target, backend, scale_grad_in_place=False):
    return _loss_like(output), torch.empty_like(output, memory_format=torch.contiguous_format)


def _traced(t: torch.Tensor) -> bool:
    """Under torch.compile, export or AOT tracing (which see fake or functional tensors)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.scale_grad_in_place = inputs[-1]
    # Otherwise autograd fills an x-sized tensor of zeros for the gradient output's gradient.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    scale = grad_loss.reshape(grad.shape[0], *([1] * (grad.ndim - 1)))
    if ctx.scale_grad_in_place and not torch.is_grad_enabled() and not _traced(grad):
        # The reductions' path, as Liger's fused losses do: the wrapper never hands out the op's
        # gradient, so it is scaled where it lies, without a second x-sized tensor (on the CPU
        # its fresh pages cost more than the multiply). A second backward through a retained
        # graph then fails autograd's version check instead of scaling twice. Traced graphs are
        # functional, and create_graph=True records the backward: there the multiply is out of
        # place (and the compiler may fuse it).
        return grad.mul_(scale), None, None, None, None, None, None, None, None
    return (scale * grad).to(grad.dtype), None, None, None, None, None, None, None, None


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
    reduction: str = "none",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample loss [B]: sum over segments g of w * sum (output - k z - c target)^2.

    output: network output [B, ...] (its sample may be [x part | y part], split after ``split``
    elements); coefs: [B, S, 3] = (weight w, noise scale k, target scale c) per segment, S = 1
    without split, 2 with it. z for element j of sample b is stream position offset + b * D + j,
    or ``noise`` (like output). target: optional tensor like output (data/velocity targets).
    Differentiable in output; the gradient is computed in the forward pass.
    reduction: "none" (the [B] losses), "mean" or "sum" over the batch (a scalar; "mean" puts the
    1/B into the weights). The reductions' backward scales the forward's gradient in place: no
    second x-sized tensor, but a graph kept with retain_graph=True cannot be differentiated twice
    (autograd says so); "none" can, and create_graph=True works with both. Not differentiable in
    coefs, noise or target (refused when they require grad). An empty batch gives an empty loss
    ("none"), 0 ("sum"), or ValueError ("mean": the mean of nothing is undefined).
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(describe("reduction", '"none", "mean" or "sum"', repr(reduction)))
    check_like(output, "output", output, "output")
    if output.ndim < 1:
        raise ValueError(describe("output", "a batch [B, ...]", "a 0-dim tensor"))
    if output.shape[0] == 0 and reduction == "mean":
        raise ValueError(
            describe(
                "output",
                'a non-empty batch for reduction="mean" (the mean of no samples is undefined)',
                f"shape {tuple(output.shape)}",
            )
        )
    batch, dim = output.shape[0], math.prod(output.shape[1:])
    segments = 1
    if split is not None:
        if not isinstance(split, int) or isinstance(split, bool) or not 0 < split < dim:
            raise ValueError(describe("split", f"an int in (0, {dim}) (elements per sample)", repr(split)))
        segments = 2
    check_per_sample(coefs, "coefs", batch, output.device, (segments, 3))
    if noise is not None:
        check_like(noise, "noise", output, "output", same_dtype=False)
    else:
        check_seed_offset(seed, offset, output.numel())
    if target is not None:
        check_like(target, "target", output, "output", same_dtype=False)
    for name, t in (("coefs", coefs), ("noise", noise), ("target", target)):
        check_no_grad(t, name, "weighted_score_loss", "output")
    if reduction == "mean":
        coefs = coefs * coefs.new_tensor([1.0 / batch, 1.0, 1.0])
    loss, _ = _weighted_score_loss(output, coefs, split, seed, offset, noise, target, backend, reduction != "none")
    return loss if reduction == "none" else loss.sum()
