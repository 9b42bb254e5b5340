"""``TrainConfig``: every setting of a training run, checked when it is made, and the optimizer it asks for."""

from __future__ import annotations

import dataclasses
import math
import os
from numbers import Real
from typing import Optional, Tuple

import torch

from ..checks import check_int

AMP_MODES = ("none", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for")
# Config fields that only steer bookkeeping: changing them on resume is expected, not worth a warning.
BOOKKEEPING_FIELDS = (
    "steps",
    "log_every",
    "preview_every",
    "checkpoint_every",
    "keep_checkpoints",
    "out_dir",
    "device",
    "num_workers",
    "progress",
    "compile",
    "channels_last",
    "optimizer_impl",
)


def _check_real(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"TrainConfig.{name}: expected a finite number in {interval}, got {value!r}")


@dataclasses.dataclass
class TrainConfig:
    """Training settings (defaults: the paper's Adam 2e-4, warm-up 2500, clip 1, EMA 0.999).

    batch_size is the GLOBAL batch: under DDP each of the world processes takes batch_size / world.
    warmup: the learning rate of step k (0-based) is lr * min(1, (k + 1) / warmup); 0 disables it.
    lr_schedule: after the warm-up, "constant" keeps lr; "cosine" decays it to 0 at ``steps``
    along half a cosine (so a resumed run that raises ``steps`` changes the schedule from there).
    grad_clip: max global grad norm, None disables clipping.
    ema_warmup: use min(ema_decay, (1 + n) / (10 + n)) for the n-th update (score_sde's EMA), so
    short runs are not dominated by the initial weights; False uses ema_decay from the start.
    amp: "none" (fp32), "bf16" (autocast; CPU or GPU), "fp16" (autocast + GradScaler; GPU only).
    Throughput switches (the same training up to float rounding, except that dropout draws other
    masks from the same per-step seed; a resumed run still repeats the uninterrupted one bit for
    bit): compile: torch.compile the network's forward and backward (the first step compiles,
    minutes on a CPU for the paper U-Net; dropout masks come from Inductor's generator);
    channels_last: the network's weights, and so its activations, in channels-last memory format
    (dropout masks are drawn in memory order);
    optimizer_impl: Adam's implementation: "fused" (fused kernels, CPU and CUDA), "foreach"
    (multi-tensor kernels, CUDA; a per-tensor fallback on a CPU), "for" (one tensor at a time) or
    "auto" (fused on CPU and CUDA, torch's choice elsewhere).
    log_every / preview_every / checkpoint_every count optimizer steps; 0 turns previews or
    periodic checkpoints off (a checkpoint is always written at the end).
    keep_checkpoints: how many newest checkpoints to keep (0 keeps all).
    device: "auto" (cuda when available, then cuda:LOCAL_RANK under DDP), "cpu", "cuda", "cuda:N".
    """

    steps: int
    batch_size: int
    lr: float = 2e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup: int = 2500
    lr_schedule: str = "constant"
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    amp: str = "none"
    compile: bool = False
    channels_last: bool = False
    optimizer_impl: str = "auto"
    seed: int = 0
    log_every: int = 100
    preview_every: int = 0
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    out_dir: str = "runs/train"
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        check_int(self.steps, "TrainConfig.steps", 1)
        check_int(self.batch_size, "TrainConfig.batch_size", 1)
        _check_real("lr", self.lr, 0.0, math.inf, True, True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas: expected two numbers in [0, 1), got {self.betas!r}")
        for beta in self.betas:
            _check_real("betas", beta, 0.0, 1.0, False, True)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        check_int(self.warmup, "TrainConfig.warmup", 0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.grad_clip is not None:
            _check_real("grad_clip", self.grad_clip, 0.0, math.inf, True, True)
        _check_real("ema_decay", self.ema_decay, 0.0, 1.0, False, True)
        if not isinstance(self.ema_warmup, bool):
            raise ValueError(f"TrainConfig.ema_warmup: expected a bool, got {self.ema_warmup!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp: expected one of {AMP_MODES}, got {self.amp!r}")
        for name in ("compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"TrainConfig.optimizer_impl: expected one of {OPTIMIZER_IMPLS}, got {self.optimizer_impl!r}")
        check_int(self.seed, "TrainConfig.seed", 0)
        check_int(self.log_every, "TrainConfig.log_every", 1)
        check_int(self.preview_every, "TrainConfig.preview_every", 0)
        check_int(self.checkpoint_every, "TrainConfig.checkpoint_every", 0)
        check_int(self.keep_checkpoints, "TrainConfig.keep_checkpoints", 0)
        if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
            raise ValueError(f"TrainConfig.out_dir: expected a non-empty path, got {self.out_dir!r}")
        self.out_dir = str(self.out_dir)  # plain types only: the config is stored in checkpoints
        if not isinstance(self.device, str):
            raise ValueError(f"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        try:
            torch.device("cpu" if self.device == "auto" else self.device)
        except RuntimeError as err:
            raise ValueError(f"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from err
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("TrainConfig.amp: 'fp16' needs a GPU (GradScaler); on the CPU use 'bf16' or 'none'")
        check_int(self.num_workers, "TrainConfig.num_workers", 0)
        if not isinstance(self.progress, bool):
            raise ValueError(f"TrainConfig.progress: expected a bool, got {self.progress!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based step ``step``: linear warm-up to ``lr`` over ``warmup`` steps,
        then constant or a cosine decay to 0 at ``steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay used after 0-based step ``step`` (its update number is step + 1)."""
        updates = step + 1
        return min(self.ema_decay, (1 + updates) / (10 + updates)) if self.ema_warmup else self.ema_decay


def make_adam(parameters, config: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with ``config``'s learning rate at step 0, betas and implementation on ``device``."""
    impl = config.optimizer_impl
    if impl == "auto":
        # torch picks foreach on CUDA and for on a CPU; its fused kernels are faster on both
        impl = "fused" if device.type in ("cpu", "cuda") else None
    return torch.optim.Adam(
        parameters,
        lr=config.lr_at(0),
        betas=config.betas,
        eps=1e-8,
        fused=impl == "fused" or None,
        foreach={"foreach": True, "for": False}.get(impl),
    )
