"""C++ (``cpu``) and CUDA (``cuda``) backends of the fused ops: thin wrappers over the nanobind
modules ``msdiff_fast._C`` and ``msdiff_fast._C_cuda`` (sources in csrc/, built by CMakeLists.txt).

The modules take tensors through DLPack and know nothing of torch, so this file does what a
torch extension would do in C++: it reads each input in place where the kernel can (each sample
contiguous; a batch stride of anything, 0 included) and copies it once otherwise, converts the
per-sample coefficients to the compute dtype (float32, float64 for float64 tensors), passes
torch's current CUDA stream and intra-op thread count, and allocates scratch memory through
torch's allocator. Outputs are written in place; the modules refuse, rather than copy, an
output they cannot write directly.

Explicit noise and targets are read in the op's dtype or in its compute dtype; other dtypes
are converted to the compute dtype first, which is exactly what the reference does with them.

The package imports without either module: each backend then reports why it cannot run.
"""

import functools
from typing import Optional

import torch

from .dispatch import register, register_availability

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

try:
    from .. import _C
except ImportError as error:  # a source checkout without a build, or a failed build
    _C = None
    _CPU_FAILURE: Optional[str] = f"msdiff_fast._C is not importable ({error}); reinstall msdiff_fast with a C++ compiler"
else:
    _CPU_FAILURE = None

try:
    from .. import _C_cuda
except ImportError as error:
    _C_cuda = None
    _CUDA_FAILURE: Optional[str] = (
        f"msdiff_fast._C_cuda is not importable ({error}); it is built when nvcc is found at install time (MSDIFF_FAST_CUDA=ON requires it)"
    )
else:
    _CUDA_FAILURE = None


def _dtype_reason(dtype: torch.dtype) -> Optional[str]:
    if dtype not in DTYPES:
        return f"the compiled kernels take float16, bfloat16, float32 or float64, got {dtype}"
    return None


def _cpu_availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if _CPU_FAILURE is not None:
        return _CPU_FAILURE
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got {device}"
    return _dtype_reason(dtype)


@functools.lru_cache(maxsize=None)
def _cuda_unusable() -> Optional[str]:
    return _C_cuda.unusable_reason()


def _cuda_availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if _CUDA_FAILURE is not None:
        return _CUDA_FAILURE
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device}"
    return _cuda_unusable() or _dtype_reason(dtype)


# ----------------------------------------------------------------------------- argument preparation


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coefficients(coefs: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if coefs is None else coefs.to(_compute(dtype)).contiguous()


def sample_rows(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor itself when each sample is contiguous (any batch stride), else a contiguous copy."""
    if tensor is None or tensor.is_contiguous() or tensor.shape[0] == 0 or tensor[0].is_contiguous():
        return tensor
    return tensor.contiguous()


def _side_inputs(dtype: torch.dtype, *tensors: Optional[torch.Tensor]):
    """Explicit noise / targets in one dtype the kernels read: the op's own when all have it, else the compute dtype."""
    present = [t for t in tensors if t is not None]
    side = dtype if all(t.dtype == dtype for t in present) else _compute(dtype)
    return [None if t is None else sample_rows(t.to(side)) for t in tensors]


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _mr_step_args(out, x, terms, coefs, noise_coef, noise):
    (noise,) = _side_inputs(x.dtype, noise)
    return (
        out,
        x.contiguous(),
        [term.contiguous() for term in terms],
        _coefficients(coefs, x.dtype),
        _coefficients(noise_coef, x.dtype),
        None if noise is None else noise.contiguous(),
    )


def _noise_inject_args(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, noise_x, noise_y):
    noise_x, noise_y = _side_inputs(x0.dtype, noise_x, noise_y if y_coefs is not None else None)
    return (
        out_x, sample_rows(x0), _coefficients(x_coefs, x0.dtype), sample_rows(mu), noise_x,
        out_y, sample_rows(y0), _coefficients(y_coefs, x0.dtype), noise_y,
    )


# ----------------------------------------------------------------------------- cpu


def _cpu_mr_step(out, x, terms, coefs, noise_coef, seed: int, offset: int, noise):
    _C.mr_step(*_mr_step_args(out, x, terms, coefs, noise_coef, noise), seed, offset, torch.get_num_threads())


def _cpu_noise_inject(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed: int, offset: int, noise_x, noise_y):
    args = _noise_inject_args(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, noise_x, noise_y)
    _C.noise_inject(*args, seed, offset, torch.get_num_threads())


def _cpu_weighted_score_loss(loss, grad, output, coefs, split: Optional[int], seed: int, offset: int, noise, target):
    noise, target = _side_inputs(output.dtype, noise, target)
    _C.weighted_score_loss(loss, grad, sample_rows(output), _coefficients(coefs, output.dtype), split or 0, noise, target,
                           seed, offset, torch.get_num_threads())


# ----------------------------------------------------------------------------- cuda


def _cuda_mr_step(out, x, terms, coefs, noise_coef, seed: int, offset: int, noise):
    _C_cuda.mr_step(*_mr_step_args(out, x, terms, coefs, noise_coef, noise), seed, offset, _stream(x))


def _cuda_noise_inject(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed: int, offset: int, noise_x, noise_y):
    args = _noise_inject_args(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, noise_x, noise_y)
    _C_cuda.noise_inject(*args, seed, offset, _stream(x0))


def _cuda_weighted_score_loss(loss, grad, output, coefs, split: Optional[int], seed: int, offset: int, noise, target):
    batch = output.shape[0]
    numel = output.numel() // batch if batch else 0
    if numel == 0:
        loss.zero_()
        return
    noise, target = _side_inputs(output.dtype, noise, target)
    tiles = -(-numel // _C_cuda.LOSS_TILE)
    partials = torch.empty(batch * tiles, dtype=loss.dtype, device=output.device)
    _C_cuda.weighted_score_loss(loss, grad, sample_rows(output), _coefficients(coefs, output.dtype), split or 0, noise, target,
                                partials, seed, offset, _stream(output))


register("mr_step", "cpu", _cpu_mr_step)
register("noise_inject", "cpu", _cpu_noise_inject)
register("weighted_score_loss", "cpu", _cpu_weighted_score_loss)
register_availability("cpu", _cpu_availability)
register("mr_step", "cuda", _cuda_mr_step)
register("noise_inject", "cuda", _cuda_noise_inject)
register("weighted_score_loss", "cuda", _cuda_weighted_score_loss)
register_availability("cuda", _cuda_availability)
