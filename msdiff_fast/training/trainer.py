"""The training loop: Adam with linear warm-up, grad-norm clipping, EMA, AMP, atomic checkpoints,
exact resume and multi-process DDP (launched by torchrun).

Reproducibility without hidden state: everything random in step k is a function of (seed, k):

* data: the items form one endless stream, epoch after epoch, each epoch a permutation of the
  data set drawn from a generator seeded by (seed, epoch) (sampling without replacement within
  an epoch). The global batch of step k is positions [k B, (k+1) B) of that stream; under DDP
  rank r takes the r-th contiguous slice of B / world items. Each item is fetched with torch's
  global RNG seeded by (seed, index, epoch) (e.g. random crops) and, when the data set has
  ``set_epoch`` (ConditionalPairs), with its epoch set (fresh degradations every epoch).
* loss noise: a CPU torch.Generator seeded by (seed, k), the same on every rank, passed to
  ``estimator.loss`` with ``offset_samples = rank * B / world`` and ``global_batch = B``.
* dropout: torch's global RNG forked and seeded by (seed, k, rank) around the forward pass.

So a resumed run repeats the uninterrupted one bit for bit, and no RNG state is checkpointed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..distributed import distributed_env
from .batches import DROPOUT_STREAM, LOSS_STREAM, PositionedItems, StepBatches, check_item, collate, stream_seed
from .checkpoint import (
    PathLike,
    atomic_write,
    check_compatible,
    check_description,
    check_same_description,
    latest_checkpoint,
    prune_checkpoints,
    read_optimizer_state,
    read_state,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import BOOKKEEPING_FIELDS, TrainConfig, make_adam


# ---------------------------------------------------------------------------- distributed
def _resolve_device(name: str, local_rank: int, world: int) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device: {name!r} requested but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    return device


def _scalars(state: Mapping) -> Dict[str, Any]:
    """The numeric scalar entries of an estimator state (e.g. sigma_y_max) for the metrics log."""
    values = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float)):
            values[str(key)] = value
    return values


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Trains ``model`` with ``estimator.loss`` on (x, y) items of ``dataset``.

    ``estimator`` provides loss(model, x0, y0, generator=None, step=None, offset_samples=0,
    global_batch=None) -> scalar, on_step(step), state_dict(), load_state_dict(d) and name. The
    model it receives may be a DDP wrapper: call it, do not read its attributes.
    ``preview(trainer, step)`` runs on rank 0 every ``preview_every`` steps (use ``trainer.ema``).
    ``description`` (a JSON-able dict, e.g. {"preset": "tiny", "estimator": "cmde"}) is stored in
    every checkpoint; resuming from a checkpoint with another description raises ValueError.

    Under torchrun (WORLD_SIZE > 1) the process group is initialised here (nccl on CUDA, gloo on
    CPU), the model wrapped in DDP, and only rank 0 logs and writes. Call ``close()`` (or use the
    trainer as a context manager) to tear down a process group it created.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        estimator,
        dataset: Dataset,
        config: TrainConfig,
        preview: Optional[Callable[[Trainer, int], None]] = None,
        description: Optional[Mapping[str, Any]] = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        missing = [
            name for name in ("loss", "on_step", "state_dict", "load_state_dict") if not callable(getattr(estimator, name, None))
        ]
        if missing or not isinstance(getattr(estimator, "name", None), str):
            raise TypeError(
                f"estimator: expected an object with loss, on_step, state_dict, load_state_dict "
                f"and a str name (e.g. msdiff_fast.estimators.CMDE), got {type(estimator).__name__} "
                f"lacking {missing or ['name']}"
            )
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if preview is not None and not callable(preview):
            raise TypeError(f"preview: expected a callable preview(trainer, step) or None, got {type(preview).__name__}")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset: expected a map-style data set with __len__ and __getitem__, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset: expected at least one item, got an empty data set")
        self.description = check_description(description)
        self.config, self.estimator, self.dataset, self.preview = config, estimator, dataset, preview

        self.rank, self.local_rank, self.world_size = distributed_env()
        if config.batch_size % self.world_size:
            raise ValueError(
                f"TrainConfig.batch_size: expected a multiple of the world size {self.world_size}, got {config.batch_size}"
            )
        self.device = _resolve_device(config.device, self.local_rank, self.world_size)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"TrainConfig.amp: 'fp16' needs a CUDA device, the trainer runs on {self.device}; use 'bf16' or 'none'"
            )
        with torch.random.fork_rng(devices=[]):
            check_item(PositionedItems(dataset, config.seed)[(0, 0)], 0)

        self._owns_process_group = False
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_process_group = True
        self.model = model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.network = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world_size > 1
            else self.model
        )
        if config.compile:
            self.network = torch.compile(self.network)
        # Copied after the DDP wrap, which broadcast rank 0's weights, so every rank's EMA agrees.
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = make_adam(self.model.parameters(), config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.step = 0
        self.seconds = 0.0
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.last_metrics: Dict[str, Any] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // self.world_size

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (rank 0; other ranks return None)."""
        if not self.is_main:
            return None
        for name, module in (("model", self.model), ("ema", self.ema)):
            if not all(torch.isfinite(p).all() for p in module.parameters()):
                raise FloatingPointError(f"refusing to checkpoint step {self.step}: the {name} weights hold NaN/inf")
        path = save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self.model,
            self.ema,
            {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()},
            {
                "estimator": self.estimator.state_dict(),
                "config": dataclasses.asdict(self.config),
                "seconds": self.seconds,
                "world_size": self.world_size,
                "torch_version": str(torch.__version__),
            },
            self.description,
            self.estimator.name,
        )
        prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
        return path

    def load(self, checkpoint: PathLike) -> Path:
        """Restore weights, EMA, optimizer, scaler, estimator state and step from a checkpoint.
        Everything is read and checked first: on any mismatch nothing here changes."""
        directory = resolve_checkpoint(checkpoint)
        where = str(directory)
        state = read_state(directory)
        check_same_description(state["description"], self.description, where)
        if state["estimator_name"] != self.estimator.name:
            raise ValueError(
                f"checkpoint {where} was trained with estimator {state['estimator_name']!r}, "
                f"this trainer uses {self.estimator.name!r}"
            )
        weights = read_weights(directory, ema=False, description=self.description)
        ema_weights = read_weights(directory, ema=True, description=self.description)
        check_compatible(weights, self.model, where)
        check_compatible(ema_weights, self.model, where)
        optimizer_state = read_optimizer_state(directory)
        saved_groups = optimizer_state["optimizer"]["param_groups"]
        own_groups = self.optimizer.param_groups
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in own_groups]:
            raise ValueError(f"checkpoint {where}: optimizer parameter groups do not match this model")
        changed = {
            k: (v, getattr(self.config, k))
            for k, v in state["config"].items()
            if k not in BOOKKEEPING_FIELDS and hasattr(self.config, k) and _plain(getattr(self.config, k)) != _plain(v)
        }
        if changed and self.is_main:
            warnings.warn(
                f"resuming {where} with changed settings (checkpoint -> now): "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()),
                stacklevel=3,
            )
        self.model.load_state_dict(weights)
        self.ema.load_state_dict(ema_weights)
        self.optimizer.load_state_dict(optimizer_state["optimizer"])
        self.scaler.load_state_dict(optimizer_state["scaler"])
        self.estimator.load_state_dict(state["estimator"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        return directory

    def _resume_from(self, resume) -> Optional[Path]:
        existing = latest_checkpoint(self.checkpoint_dir)
        if resume is False:
            if existing is not None:
                raise ValueError(
                    f"resume: {self.out_dir} already holds checkpoints ({existing.name}); pass "
                    f"resume=True to continue that run or choose another out_dir"
                )
            return None
        if resume is True:
            if existing is None:
                raise FileNotFoundError(f"resume: no checkpoint under {self.checkpoint_dir} to resume from")
            return existing
        if resume == "auto":
            return existing
        if isinstance(resume, (str, os.PathLike)):
            return resolve_checkpoint(resume)
        raise TypeError(f"resume: expected False, True, 'auto' or a checkpoint path, got {resume!r}")

    # ------------------------------------------------------------------ metrics
    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step (written by the run that was interrupted)."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
        atomic_write(self.metrics_path, lambda handle: handle.write("".join(kept).encode()))

    def _write_metrics(self, record: Dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ training
    def _train_step(self, step: int, x0: torch.Tensor, y0: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        config = self.config
        self.estimator.on_step(step)
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(stream_seed(config.seed, LOSS_STREAM, step))
        on_cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if on_cuda else [], device_type="cuda"):
            torch.manual_seed(stream_seed(config.seed, DROPOUT_STREAM, step, self.rank))
            with torch.autocast(
                self.device.type, dtype=torch.float16 if config.amp == "fp16" else torch.bfloat16, enabled=config.amp != "none"
            ):
                loss = self.estimator.loss(
                    self.network,
                    x0,
                    y0,
                    generator=generator,
                    step=step,
                    offset_samples=self.rank * self.local_batch,
                    global_batch=config.batch_size,
                )
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise TypeError(
                f"estimator.loss: expected a scalar tensor that requires grad, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        self.scaler.scale(loss).backward()
        grad_norm = None
        if config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update_ema(step)
        return loss.detach().float(), grad_norm

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        weight = 1.0 - self.config.ema_decay_at(step)
        ema_params, params = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], weight)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    def _grad_norm_now(self) -> float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _loader(self, start: int) -> DataLoader:
        config = self.config
        sampler = StepBatches(start, config.steps, config.batch_size, len(self.dataset), config.seed, self.rank, self.world_size)
        return DataLoader(
            PositionedItems(self.dataset, config.seed),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def fit(self, resume: Union[bool, str, PathLike] = False) -> Trainer:
        """Train up to ``config.steps`` optimizer steps; return self.

        resume: False starts fresh (and refuses an out_dir that already holds checkpoints), True
        continues from the latest complete checkpoint (error if none), "auto" continues when there
        is one, a path continues from that checkpoint.
        """
        config = self.config
        checkpoint = self._resume_from(resume)
        if checkpoint is not None:
            self.load(checkpoint)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics()
        self.model.train()
        self.ema.eval()
        window_loss = torch.zeros((), device=self.device)
        window_finite = torch.zeros((), device=self.device)
        window_steps, window_seconds = 0, 0.0
        grad_norm = None
        progress = tqdm(
            total=config.steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (config.progress and self.is_main),
        )
        try:
            tick = time.perf_counter()
            for x0, y0 in self._loader(self.step):
                step = self.step
                loss, grad_norm = self._train_step(
                    step, x0.to(self.device, non_blocking=True), y0.to(self.device, non_blocking=True)
                )
                finite = torch.isfinite(loss)
                window_loss += torch.where(finite, loss, torch.zeros_like(loss))
                window_finite += finite.float()
                window_steps += 1
                self.step = step + 1
                progress.update(1)
                logging = self.step % config.log_every == 0 or self.step == config.steps
                checkpointing = (
                    config.checkpoint_every and self.step % config.checkpoint_every == 0
                ) or self.step == config.steps
                if logging or checkpointing:
                    totals = self._check_finite(window_loss, window_finite, window_steps)
                # Wall time of training proper (data included, previews and checkpoints not); on a
                # GPU it is exact at the synchronising steps, which are the ones that report it.
                now = time.perf_counter()
                self.seconds += now - tick
                window_seconds += now - tick
                if logging:
                    self._log(step, totals, window_steps, window_seconds, grad_norm, progress)
                    window_loss.zero_()
                    window_finite.zero_()
                    window_steps, window_seconds = 0, 0.0
                if self.preview is not None and config.preview_every and self.step % config.preview_every == 0 and self.is_main:
                    self.preview(self, self.step)
                    self.model.train()
                    self.ema.eval()
                if checkpointing:
                    self.save()
                tick = time.perf_counter()
        finally:
            progress.close()
        if self.step >= config.steps and self.is_main and latest_checkpoint(self.checkpoint_dir) is None:
            self.save()  # resumed at or past the target: still leave a checkpoint behind
        return self

    def _check_finite(self, window_loss: torch.Tensor, window_finite: torch.Tensor, window_steps: int) -> Tuple[float, float]:
        """(sum of finite losses, number of finite losses) of the window over all ranks. Raises on
        NaN/inf losses (under fp16 only when every step overflowed: the GradScaler skips those)."""
        totals = torch.stack([window_loss, window_finite])
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, finite_count = totals.tolist()
        expected = window_steps * self.world_size
        if finite_count < expected and (self.config.amp != "fp16" or finite_count == 0):
            raise FloatingPointError(
                f"loss was NaN/inf in {expected - finite_count:.0f} of the last {window_steps} steps (at or "
                f"before step {self.step}): training diverged; lower lr, keep grad_clip, or use amp='none'; "
                f"the last good checkpoint is {latest_checkpoint(self.checkpoint_dir)}"
            )
        return loss_sum, finite_count

    def _log(
        self,
        step: int,
        totals: Tuple[float, float],
        window_steps: int,
        window_seconds: float,
        grad_norm: Optional[torch.Tensor],
        progress,
    ) -> None:
        loss_sum, finite_count = totals
        clipped_norm = self._grad_norm_now()
        record = {
            "step": self.step,
            "loss": loss_sum / max(finite_count, 1),
            "lr": self.config.lr_at(step),
            "grad_norm": float(grad_norm) if grad_norm is not None else clipped_norm,
            "grad_norm_clipped": clipped_norm,
            "nonfinite_steps": int(window_steps * self.world_size - finite_count),
            "samples_per_second": window_steps * self.config.batch_size / max(window_seconds, 1e-9),
            "seconds": self.seconds,
        }
        record.update({k: v for k, v in _scalars(self.estimator.state_dict()).items() if k not in record})
        self.last_metrics = record
        if self.is_main:
            self._write_metrics(record)
            progress.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")

    def close(self) -> None:
        """Tear down the process group if this trainer created it."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def train(
    model: torch.nn.Module,
    estimator,
    dataset: Dataset,
    config: Optional[TrainConfig] = None,
    *,
    preview: Optional[Callable[[Trainer, int], None]] = None,
    description: Optional[Mapping[str, Any]] = None,
    resume: Union[bool, str, PathLike] = False,
    **settings,
) -> Trainer:
    """Build a Trainer (``settings`` override fields of ``config``, or build one), fit, close it."""
    if config is None:
        config = TrainConfig(**settings)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig or None, got {type(config).__name__}")
    elif settings:
        config = dataclasses.replace(config, **settings)
    trainer = Trainer(model, estimator, dataset, config, preview=preview, description=description)
    try:
        return trainer.fit(resume)
    finally:
        trainer.close()
