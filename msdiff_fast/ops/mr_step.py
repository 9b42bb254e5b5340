"""mr_step: one batched exponential-integrator update with per-sample coefficients.

    out = coefs[:, 0] * x + sum_k coefs[:, k + 1] * terms[k] + noise_coef * z

z is the shared Philox stream at positions offset + flat index (see ``philox``), or an
explicit ``noise`` tensor. Every sampler step in the package is one call of this op.
"""

from typing import List, Optional, Sequence

import torch

from . import reference
from .dispatch import check_like, check_no_grad, check_out_overlap, check_per_sample, describe, register, resolve
from .philox import check_seed_offset

MAX_TERMS = 8


def _torch_backend(out, x, terms, coefs, noise_coef, seed, offset, noise):
    out.copy_(reference.mr_step(x, terms, coefs, noise_coef, seed, offset, noise))


register("mr_step", "torch", _torch_backend)


@torch.library.custom_op("msdiff_fast::mr_step", mutates_args=())
def _mr_step(
    x: torch.Tensor,
    terms: List[torch.Tensor],
    coefs: torch.Tensor,
    noise_coef: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: int,
    offset: int,
    backend: str,
) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    resolve("mr_step", backend, x.device, x.dtype)(out, x, terms, coefs, noise_coef, seed, offset, noise)
    return out


@_mr_step.register_fake
def _(x, terms, coefs, noise_coef, noise, seed, offset, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, terms, coefs = inputs[0], inputs[1], inputs[2]
    ctx.coefs = coefs
    ctx.num_terms = len(terms)
    ctx.ndim = x.ndim


def _backward(ctx, grad):
    shape = (grad.shape[0],) + (1,) * (ctx.ndim - 1)
    scaled = [(ctx.coefs[:, k].reshape(shape) * grad).to(grad.dtype) for k in range(ctx.num_terms + 1)]
    return scaled[0], scaled[1:], None, None, None, None, None, None


_mr_step.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("msdiff_fast::mr_step_out", mutates_args=("out",))
def _mr_step_out(
    out: torch.Tensor,
    x: torch.Tensor,
    terms: List[torch.Tensor],
    coefs: torch.Tensor,
    noise_coef: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: int,
    offset: int,
    backend: str,
) -> None:
    resolve("mr_step", backend, x.device, x.dtype)(out, x, terms, coefs, noise_coef, seed, offset, noise)


@_mr_step_out.register_fake
def _(out, x, terms, coefs, noise_coef, noise, seed, offset, backend):
    return None


def mr_step(
    x: torch.Tensor,
    terms: Sequence[torch.Tensor],
    coefs: torch.Tensor,
    noise_coef: Optional[torch.Tensor] = None,
    *,
    seed: int = 0,
    offset: int = 0,
    noise: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``coefs[:, 0] * x + sum_k coefs[:, k + 1] * terms[k] + noise_coef * z`` for each sample.

    x: [B, ...] float16/bfloat16/float32/float64; terms: 1..8 tensors like x; coefs: [B, K + 1]
    float32/float64 on x's device; noise_coef: [B] or None; z: the Philox stream at positions
    offset + flat index, or ``noise`` (like x). ``out`` (like x, contiguous; may be x itself, or a
    term or the noise, but must not partly overlap any input) receives the result. Math in float32
    (float64 for float64 x). Differentiable in x and terms; coefs, noise_coef and noise that
    require grad are refused. An empty batch gives an empty result.
    """
    check_like(x, "x", x, "x")
    if x.ndim < 1:
        raise ValueError(describe("x", "a tensor with a batch dimension", "a 0-dim tensor"))
    if not isinstance(terms, (list, tuple)) or not 1 <= len(terms) <= MAX_TERMS:
        raise ValueError(
            describe(
                "terms",
                f"a list of 1 to {MAX_TERMS} tensors",
                repr(type(terms).__name__) if not isinstance(terms, (list, tuple)) else f"{len(terms)} tensors",
            )
        )
    for k, term in enumerate(terms):
        check_like(term, f"terms[{k}]", x, "x")
    batch = x.shape[0]
    check_per_sample(coefs, "coefs", batch, x.device, (len(terms) + 1,))
    if noise_coef is not None:
        check_per_sample(noise_coef, "noise_coef", batch, x.device)
        if noise is not None:
            check_like(noise, "noise", x, "x", same_dtype=False)
        else:
            check_seed_offset(seed, offset, x.numel())
    elif noise is not None:
        raise ValueError(describe("noise", "None when noise_coef is None (nothing would use it)", "a tensor"))
    for name, t in (("coefs", coefs), ("noise_coef", noise_coef), ("noise", noise)):
        check_no_grad(t, name, "mr_step", "x and terms")
    if out is not None:
        check_like(out, "out", x, "x")
        if not out.is_contiguous():
            raise ValueError(describe("out", "a contiguous tensor", f"strides {out.stride()}"))
        elementwise = {"x": x, **{f"terms[{k}]": t for k, t in enumerate(terms)}, "noise": noise}
        check_out_overlap(out, "out", elementwise, {"coefs": coefs, "noise_coef": noise_coef})
    terms = list(terms)
    if _needs_dispatcher(x, terms):
        if out is None:
            return _mr_step(x, terms, coefs, noise_coef, noise, seed, offset, backend)
        _mr_step_out(out, x, terms, coefs, noise_coef, noise, seed, offset, backend)
        return out
    # Plain eager call: the custom-op dispatcher would add tens of microseconds per sampler step.
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    resolve("mr_step", backend, x.device, x.dtype)(out, x, terms, coefs, noise_coef, seed, offset, noise)
    return out


def _needs_dispatcher(x: torch.Tensor, terms: List[torch.Tensor]) -> bool:
    """torch.compile, autograd and fake/meta tensors need the registered custom op."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return True
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in terms))
