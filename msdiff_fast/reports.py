"""What reports are made of, shared by ``msdiff evaluate`` / ``bench``, the demo and the benchmarks:
numbers formatted for a table, markdown tables, strict JSON written atomically, and the machine
a measurement ran on."""

import json
import math
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

from .training.checkpoint import atomic_write

METRIC_LABELS = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "consistency": "consistency (dB)",
    "diversity": "diversity (0-255)",
    "lpips": "LPIPS",
    "fid_small": "FID (SmallFeatureNet)",
    "fid_inception": "FID (Inception)",
}


def format_number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(format_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def json_ready(value):
    """``value`` with non-finite floats as strings ("inf") and other objects as their str: strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def json_text(data) -> str:
    return json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, data) -> None:
    """Write ``data`` as strict JSON, atomically (temp file in the same folder, then rename)."""
    text = json_text(data).encode()
    atomic_write(path, lambda handle: handle.write(text))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temp file in the same folder, then rename)."""
    data = text.encode()
    atomic_write(path, lambda handle: handle.write(data))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def describe_machine(device: torch.device) -> str:
    """Device, operating system, Python and torch: the line a report names its machine with."""
    return f"{device_name(device)}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}"
