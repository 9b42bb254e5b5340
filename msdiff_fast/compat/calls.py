"""What the adapters share: the time tensor a network receives and the check of its output."""

import torch


def time_for(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t as a [B] tensor on x's device in the dtype the samplers use for x."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = t.to(device=x.device, dtype=dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def check_network_output(output, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.shape != x.shape:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"{name}: expected an output of shape {tuple(x.shape)} (like x_t), got {got}")
    return output
