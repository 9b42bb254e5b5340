"""The C++ (``cpu``) and CUDA (``cuda``) backends of the fused ops: thin wrappers over the
nanobind modules ``msdiff_fast._C`` and ``msdiff_fast._C_cuda`` (sources in csrc/).

The modules take arrays through DLPack and know nothing of torch, so this file does what a
torch extension would do in C++: it converts the per-sample coefficients to contiguous float32
on the tensors' device, makes non-contiguous inputs contiguous (inputs only: outputs are written
in place or refused), passes noise_inject's per-sample batch strides through (its outputs may be
views into a concatenated buffer), and hands over torch's intra-op thread count (CPU) or current
stream (CUDA). Explicit noise and targets are passed as stored when they have the op's dtype or
float32 and converted to float32 otherwise, which is what the reference does with them.

float64 is left to the torch reference backend. The package imports without either module;
each backend then says why it cannot run.
"""

import functools
import importlib
from typing import List, Optional

import torch

from .dispatch import register, register_availability

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# importlib rather than "from .. import _C": the latter's error during package import blames a
# circular import instead of saying that the module is missing.
_PACKAGE = __name__.rsplit(".", 2)[0]

try:
    _C = importlib.import_module(f"{_PACKAGE}._C")
except ImportError as error:  # a source checkout without a build, or a failed build
    _C = None
    CPU_IMPORT_ERROR: Optional[str] = f"msdiff_fast._C is not built: {error}"
else:
    CPU_IMPORT_ERROR = None

try:
    _C_cuda = importlib.import_module(f"{_PACKAGE}._C_cuda")
except ImportError as error:  # built without nvcc (MSDIFF_FAST_CUDA=0 or none found)
    _C_cuda = None
    CUDA_IMPORT_ERROR: Optional[str] = f"msdiff_fast._C_cuda is not built: {error}"
else:
    CUDA_IMPORT_ERROR = None


def _dtype_reason(dtype: torch.dtype) -> Optional[str]:
    if dtype == torch.float64:
        return "float64 runs on the torch reference backend"
    if dtype not in SUPPORTED_DTYPES:
        return f"{dtype} is not supported (float32, float16, bfloat16)"
    return None


def _cpu_availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if CPU_IMPORT_ERROR is not None:
        return CPU_IMPORT_ERROR
    if device.type != "cpu":
        return f"tensors are on {device.type}"
    return _dtype_reason(dtype)


@functools.lru_cache(maxsize=None)
def cuda_device_reason(index: int) -> Optional[str]:
    """None when the CUDA kernels can run on GPU ``index``, else why not (asked once per process)."""
    return _C_cuda.device_status(index)


def _cuda_availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if CUDA_IMPORT_ERROR is not None:
        return CUDA_IMPORT_ERROR
    if device.type != "cuda":
        return f"tensors are on {device.type}"
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return cuda_device_reason(index) or _dtype_reason(dtype)


# ----------------------------------------------------------------------------- argument preparation
# DLPack refuses tensors that require grad, hence detach() (a view: writes still land in place).


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().contiguous()


def _rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor itself when each sample is contiguous (any batch stride), else a contiguous copy."""
    if t is None:
        return None
    t = t.detach()
    if t.is_contiguous() or t.shape[0] == 0 or t[0].is_contiguous():
        return t
    return t.contiguous()


def _coefficients(coefs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if coefs is None else coefs.detach().to(torch.float32).contiguous()


def _side_inputs(dtype: torch.dtype, tensors: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """Explicit noise / targets in one dtype the kernels read: the op's own when all have it, else float32."""
    present = [t for t in tensors if t is not None]
    side = dtype if all(t.dtype == dtype for t in present) else torch.float32
    return [None if t is None else t.to(side) for t in tensors]


def _mr_step_args(out, x, terms, coefs, noise_coef, noise):
    (noise,) = _side_inputs(x.dtype, [noise if noise_coef is not None else None])
    return (
        out.detach(),
        _contiguous(x),
        [_contiguous(t) for t in terms],
        _coefficients(coefs),
        _coefficients(noise_coef),
        _contiguous(noise),
    )


def _noise_inject_args(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, noise_x, noise_y):
    noisy_y = y0 is not None and y_coefs is not None
    noise_x, noise_y = _side_inputs(x0.dtype, [noise_x, noise_y if noisy_y else None])
    return (
        out_x.detach(),
        _rows(x0),
        _coefficients(x_coefs),
        _rows(mu),
        _rows(noise_x),
        None if out_y is None else out_y.detach(),
        _rows(y0),
        _coefficients(y_coefs) if noisy_y else None,
        _rows(noise_y),
    )


def _loss_args(loss, grad, output, coefs, split, noise, target):
    noise, target = _side_inputs(output.dtype, [noise, target])
    return (
        loss.detach(),
        grad.detach(),
        _contiguous(output),
        _coefficients(coefs),
        split or 0,
        _contiguous(noise),
        _contiguous(target),
    )


# ----------------------------------------------------------------------------- cpu


# Empty tensors: nothing to compute, and the kernels' shape checks would refuse them (an empty
# result is what every backend returns).


def _cpu_mr_step(out, x, terms, coefs, noise_coef, seed, offset, noise):
    if x.numel() == 0:
        return
    _C.mr_step(*_mr_step_args(out, x, terms, coefs, noise_coef, noise), seed, offset, torch.get_num_threads())


def _cpu_noise_inject(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed, offset, noise_x, noise_y):
    if x0.shape[0] == 0:
        return
    args = _noise_inject_args(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, noise_x, noise_y)
    _C.noise_inject(*args, seed, offset, torch.get_num_threads())


def _cpu_weighted_score_loss(loss, grad, output, coefs, split, seed, offset, noise, target):
    if output.numel() == 0:
        loss.zero_()
        return
    loss_out, grad_out, output, coefs, split, noise, target = _loss_args(loss, grad, output, coefs, split, noise, target)
    _C.weighted_score_loss(loss_out, grad_out, output, coefs, split, noise, target, seed, offset, torch.get_num_threads())


# ----------------------------------------------------------------------------- cuda


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _cuda_mr_step(out, x, terms, coefs, noise_coef, seed, offset, noise):
    if x.numel() == 0:
        return
    with torch.cuda.device(x.device):
        _C_cuda.mr_step(*_mr_step_args(out, x, terms, coefs, noise_coef, noise), seed, offset, _stream(x))


def _cuda_noise_inject(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed, offset, noise_x, noise_y):
    if x0.shape[0] == 0:
        return
    with torch.cuda.device(x0.device):
        args = _noise_inject_args(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, noise_x, noise_y)
        _C_cuda.noise_inject(*args, seed, offset, _stream(x0))


def _cuda_weighted_score_loss(loss, grad, output, coefs, split, seed, offset, noise, target):
    if output.numel() == 0:
        loss.zero_()
        return
    with torch.cuda.device(output.device):
        loss_out, grad_out, output, coefs, split, noise, target = _loss_args(loss, grad, output, coefs, split, noise, target)
        batch = output.shape[0]
        per_sample = output.numel() // batch if batch else 0
        # Per-block partial sums, reduced in a fixed order by a second kernel: no float atomics,
        # so the loss is the same from run to run.
        tiles = -(-per_sample // _C_cuda.LOSS_TILE)
        partial_sums = torch.empty(batch * tiles, dtype=torch.float32, device=output.device)
        _C_cuda.weighted_score_loss(
            loss_out, grad_out, output, coefs, split, noise, target, partial_sums, seed, offset, _stream(output)
        )


def cpu_stream_normals(seed: int, offset: int, numel: int) -> Optional[torch.Tensor]:
    """The noise stream at positions offset .. offset + numel - 1 as a float32 CPU tensor, from
    the C++ kernels (the values the cpu backend's ops draw internally, bit for bit), or None when
    msdiff_fast._C is not built."""
    if _C is None:
        return None
    out = torch.empty(numel, dtype=torch.float32)
    _C.philox_normals(out, seed, offset, torch.get_num_threads())
    return out


register("mr_step", "cpu", _cpu_mr_step)
register("noise_inject", "cpu", _cpu_noise_inject)
register("weighted_score_loss", "cpu", _cpu_weighted_score_loss)
register_availability("cpu", _cpu_availability)
register("mr_step", "cuda", _cuda_mr_step)
register("noise_inject", "cuda", _cuda_noise_inject)
register("weighted_score_loss", "cuda", _cuda_weighted_score_loss)
register_availability("cuda", _cuda_availability)
