"""Argument checks every layer shares, one argument order for all: (value, name, ...). Each
raises a ValueError that names the argument, says what was expected and what came."""

import math
from numbers import Integral

import torch


def check_positive(value, name: str) -> float:
    """A finite positive number, as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return float(value)


def check_int(value, name: str, minimum: int):
    """An integer (not a bool) >= ``minimum``, returned as given."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [B] tensor of per-sample values shaped [B, 1, ...] to broadcast against [B, ...] tensors of ``ndim`` dims."""
    return values.reshape(-1, *([1] * (ndim - 1)))
