"""Backend registry: which implementation of a fused op runs, and why the others cannot.

Backends: ``torch`` (reference, always there), ``cpu`` (C++), ``cuda`` (C++/CUDA), ``triton``.
``auto`` takes the first one that can run for the tensors' device and dtype; an explicitly
requested backend (argument or MSDIFF_FAST_BACKEND) that cannot run raises with its reason.
"""

import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# op name -> backend -> implementation
_IMPLEMENTATIONS: Dict[str, Dict[str, Callable]] = {}
# backend -> function(device, dtype) returning None when it can run, else the reason
_AVAILABILITY: Dict[str, Callable[[torch.device, torch.dtype], Optional[str]]] = {"torch": lambda device, dtype: None}


def register(op: str, backend: str, implementation: Callable) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _IMPLEMENTATIONS.setdefault(op, {})[backend] = implementation


def register_availability(backend: str, check: Callable[[torch.device, torch.dtype], Optional[str]]) -> None:
    _AVAILABILITY[backend] = check


def reason_unavailable(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if backend not in _IMPLEMENTATIONS.get(op, {}):
        return f"{op} has no {backend} implementation in this build"
    check = _AVAILABILITY.get(backend)
    if check is None:
        return f"the {backend} backend is not built or not importable"
    return check(device, dtype)


def resolve(op: str, requested: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The implementation of ``op`` to run, following the rules in the module docstring."""
    if requested == "auto":
        requested = os.environ.get("MSDIFF_FAST_BACKEND", "auto") or "auto"
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {requested!r}")
        reason = reason_unavailable(op, requested, device, dtype)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run on {device} {dtype}: {reason}")
        return _IMPLEMENTATIONS[op][requested]
    reasons = []
    for backend in _PREFERENCE.get(device.type, ("triton", "torch")):
        reason = reason_unavailable(op, backend, device, dtype)
        if reason is None:
            return _IMPLEMENTATIONS[op][backend]
        reasons.append(f"{backend}: {reason}")
    raise RuntimeError(f"{op}: no backend can run on {device} {dtype}; " + "; ".join(reasons))


def backends(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Dict[str, Dict[str, str]]:
    """For every op and backend: 'ok' or the reason it cannot run on this device and dtype."""
    device = torch.device(device)
    table = {}
    for op in sorted(_IMPLEMENTATIONS):
        table[op] = {b: reason_unavailable(op, b, device, dtype) or "ok" for b in BACKENDS}
    return table


def check_no_grad(t: Optional[torch.Tensor], name: str, op: str, differentiable_in: Optional[str]) -> None:
    """Refuse an input the op cannot differentiate in while autograd would track it. The torch
    backend's eager path would carry such a gradient and the compiled ones would drop it; one
    clear error on every backend is what keeps them in agreement."""
    if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        scope = f"is differentiable in {differentiable_in} only" if differentiable_in else "is not differentiable"
        raise ValueError(
            describe(
                name,
                f"a tensor that does not require grad ({op} {scope}: detach it, or write the "
                f"expression with torch ops to differentiate in it)",
                "requires_grad=True",
            )
        )


def _span(t: torch.Tensor):
    """[first, last + 1) byte addresses a tensor's elements lie in, or None when it has none."""
    if t.numel() == 0:
        return None
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _element_addresses(t: torch.Tensor, base: int) -> torch.Tensor:
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets[..., None] + torch.arange(size, dtype=torch.int64) * stride
    return offsets.flatten() + (t.data_ptr() - base) // t.element_size()


def memory_overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """ "full" when a and b are the same elements in the same layout, "partial" when they share
    some memory otherwise, "none" when they share none (views of one buffer that interleave
    without sharing an element, e.g. the two halves of a cat buffer, are "none")."""
    span_a, span_b = _span(a), _span(b)
    if span_a is None or span_b is None or a.device != b.device or span_a[1] <= span_b[0] or span_b[1] <= span_a[0]:
        return "none"
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype:
        return "full"
    size = a.element_size()
    if b.element_size() == size and (a.data_ptr() - b.data_ptr()) % size == 0:
        # The byte ranges meet: compare element addresses exactly (only views of one buffer get here).
        base = min(a.data_ptr(), b.data_ptr())
        if not torch.isin(_element_addresses(a, base), _element_addresses(b, base)).any():
            return "none"
    return "partial"


def check_out_overlap(
    out: torch.Tensor, out_name: str, elementwise: Dict[str, Optional[torch.Tensor]], others: Dict[str, Optional[torch.Tensor]]
) -> None:
    """Raise ValueError when an input shares memory with ``out`` in a way the backends do not all
    survive: the ``elementwise`` inputs (element i read only to write element i) may be ``out``
    itself, laid out the same (``out is x``); any other shared memory would be read after some
    backend has already overwritten it, so results would differ between backends."""
    if torch.compiler.is_compiling() or out.device.type == "meta":
        return
    for name, t in list(elementwise.items()) + list(others.items()):
        if t is None:
            continue
        found = memory_overlap(out, t)
        if found == "partial" or (found == "full" and name not in elementwise):
            raise ValueError(
                describe(
                    out_name,
                    f"memory apart from {name}, or {name} itself in the same layout",
                    f"an {out_name} that {'partly ' if found == 'partial' else ''}overlaps {name}",
                )
            )


def describe(name: str, what: str, got: object) -> str:
    return f"{name}: expected {what}, got {got}"


def tensor_summary(t: torch.Tensor) -> str:
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float_tensor(t: object, name: str, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(describe(name, "a torch.Tensor", type(t).__name__))
    if t.dtype not in dtypes:
        raise TypeError(describe(name, f"dtype in {[str(d) for d in dtypes]}", t.dtype))


def check_like(t: object, name: str, ref: torch.Tensor, ref_name: str, same_dtype: bool = True) -> None:
    check_float_tensor(t, name)
    if t.shape != ref.shape:
        raise ValueError(describe(name, f"shape {tuple(ref.shape)} (like {ref_name})", tuple(t.shape)))
    if t.device != ref.device:
        raise ValueError(describe(name, f"device {ref.device} (like {ref_name})", t.device))
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(describe(name, f"dtype {ref.dtype} (like {ref_name})", t.dtype))


def check_per_sample(t: object, name: str, batch: int, device: torch.device, trailing=()) -> None:
    check_float_tensor(t, name, (torch.float32, torch.float64))
    shape = (batch, *trailing)
    if tuple(t.shape) != shape:
        raise ValueError(describe(name, f"shape {shape} (one row per sample)", tuple(t.shape)))
    if t.device != device:
        raise ValueError(describe(name, f"device {device}", t.device))
    # Checked where it costs no device synchronisation and no graph break; samplers check their
    # host copies.
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.isfinite(t).all():
        raise ValueError(describe(name, "finite values", "NaN or inf"))
