"""What the benchmark scripts share: the machine's description, the timing protocol and result
tables (the benchmarks import the library, never the CLI)."""

import os

import torch

from msdiff_fast.reports import cpu_model, markdown_table

__all__ = ["DATA_MEAN", "DATA_STD", "cpu_model", "device_name", "markdown_table", "per_dimension_w2", "synchronize"]


def device_name(device, threads: int = 0, extra: str = "") -> str:
    """The GPU's name, or the CPU's model, cores and torch threads (``threads``; 0: torch's own)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads{extra})"


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on a CPU): every timing starts and stops with it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# The data of the sampler benchmarks: GaussianData(DATA_MEAN, DATA_STD), whose exact denoiser
# stands in for a trained network.
DATA_MEAN, DATA_STD = 0.4, 0.2


def per_dimension_w2(samples: torch.Tensor, mean: float = DATA_MEAN, std: float = DATA_STD) -> float:
    """The 2-Wasserstein distance between each dimension's sample Gaussian and N(mean, std^2),
    averaged over the dimensions of ``samples`` [N, ...]."""
    flat = samples.reshape(samples.shape[0], -1).double()
    return float(torch.sqrt((flat.mean(0) - mean) ** 2 + (flat.std(0) - std) ** 2).mean())
