"""Restoring images with a trained model: the description a checkpoint carries (task, estimator,
network), the sampler choice, and batch and whole-image restoration, with the memory it needs.

``msdiff train`` stores a ``ModelSpec`` in every checkpoint; ``load_trained`` rebuilds the model
from it; ``restore_images`` restores conditions of any size with a ``SamplerSpec``. The demo and
the benchmarks use the same functions the ``msdiff`` command does.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .distributed import shard
from .errors import UsageError, one_line
from .estimators import make_estimator
from .models import unet_preset
from .samplers import MRSampler, euler_maruyama, get_timesteps, pc_sample, posterior_sample
from .samplers.timesteps import MAX_STEPS
from .tiling import TiledNetwork, TileLayout
from .training.batches import stream_seed
from .training.checkpoint import load_checkpoint, read_state, resolve_checkpoint
from .training.tasks import TASKS

DESCRIPTION_FORMAT = "msdiff_fast.cli/1"
SAMPLERS = ("mr-sde", "mr-ode", "posterior", "pc", "euler")
ESTIMATOR_NAMES = ("cde", "cdiffe", "cmde", "vscmde", "mr")
TIMESTEPS = ("uniform_lambda", "uniform_t", "karras")


# ---------------------------------------------------------------------------- estimator settings
@dataclass(frozen=True)
class EstimatorSetting:
    """A setting of the estimator that ``msdiff train`` and ``msdiff bench`` take as ``--<name>``
    (``name`` with dashes) and a checkpoint stores in its description's estimator_options."""

    name: str
    type: type
    help: str
    choices: Optional[Tuple[str, ...]] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


ESTIMATOR_SETTINGS = (
    EstimatorSetting("sigma_y", float, "cmde: sigma_y_max; vscmde: its final value (default 0.5 for sr, 1 otherwise)"),
    EstimatorSetting("vs_target_step", int, "vscmde: step at which sigma_y reaches --sigma-y (default steps/2)"),
    EstimatorSetting(
        "sigma_data",
        float,
        "cde/cdiffe/cmde/vscmde: EDM preconditioning of x with this data std (0.5 suits images in [0, 1]); "
        "far faster to train than the paper's plain noise prediction (default: none, as the paper)",
    ),
    EstimatorSetting("mr_sigma", float, "mr: stationary noise std on the 0-255 scale (default 50, as DA-CLIP)"),
    EstimatorSetting(
        "mr_target",
        str,
        "mr: what the network predicts. residual (default): the clean image minus mu, so an untrained network "
        "already restores to mu and training learns the correction; data: the clean image; noise: as IR-SDE / "
        "DA-CLIP, which needs far longer training (a warning says why)",
        ("residual", "data", "noise", "velocity"),
    ),
)

# Targets that need far more training than the demo's minutes before their samples are usable.
UNSTABLE_MR_TARGETS = {
    "noise": "near t = T the image is 0.5% of x_t - mu, so a noise-predicting network's image estimate divides its error by "
    "alpha_T = 0.005: after minutes to hours of training it restores photographs in wrong colours (measured: 6-13 dB "
    "where bicubic scores 31). It is what IR-SDE / DA-CLIP checkpoints use; to train a new model prefer residual"
}


def no_estimator_settings(given: Mapping) -> bool:
    """Whether ``given`` (setting name -> value) sets none of the ``ESTIMATOR_SETTINGS``."""
    return all(given.get(setting.name) is None for setting in ESTIMATOR_SETTINGS)


def estimator_options(estimator: str, task: str, given: Mapping, steps: int) -> Dict:
    """Keyword arguments of ``<Estimator>.for_images`` from the ``ESTIMATOR_SETTINGS`` in ``given``
    (JSON-able, stored in checkpoints); ``steps``: the training's, VS-CMDE's default target step."""
    sigma_y = given.get("sigma_y")
    sigma_y = TASKS[task].default_sigma_y if sigma_y is None else sigma_y
    sigma_data = given.get("sigma_data")
    if sigma_data is not None and estimator == "mr":
        raise UsageError(
            "--sigma-data: preconditions the VE estimators (cde, cdiffe, cmde, vscmde); for mr choose --mr-target data instead", 2
        )
    preconditioning = {} if sigma_data is None else {"sigma_data": sigma_data}
    if estimator == "cmde":
        return {"sigma_y_max": sigma_y, **preconditioning}
    if estimator == "vscmde":
        target_step = given.get("vs_target_step")
        target_step = max(1, steps // 2) if target_step is None else target_step
        return {"sigma_y_target": sigma_y, "target_step": target_step, **preconditioning}
    if estimator == "mr":
        mr_sigma = given.get("mr_sigma")
        target = given.get("mr_target") or "residual"
        if target in UNSTABLE_MR_TARGETS:
            print(f"msdiff: warning: --mr-target {target}: {UNSTABLE_MR_TARGETS[target]}", file=sys.stderr)
        return {"lam_inf": (50.0 if mr_sigma is None else mr_sigma) / 255.0, "target": target}
    return preconditioning


# ---------------------------------------------------------------------------- model description
@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained model: stored as the checkpoint's description."""

    task: str
    task_options: Dict
    estimator: str
    estimator_options: Dict
    preset: str
    image_size: int
    channels: int

    def description(self) -> Dict:
        return {
            "format": DESCRIPTION_FORMAT,
            "task": self.task,
            "task_options": dict(self.task_options),
            "estimator": self.estimator,
            "estimator_options": dict(self.estimator_options),
            "preset": self.preset,
            "image_size": self.image_size,
            "channels": self.channels,
        }

    @classmethod
    def from_description(cls, description: Dict, where: str) -> "ModelSpec":
        if not isinstance(description, dict) or description.get("format") != DESCRIPTION_FORMAT:
            raise UsageError(
                f"checkpoint {where} was not written by `msdiff train` (its description has no "
                f"{DESCRIPTION_FORMAT!r} format); load it from Python with msdiff_fast.training.checkpoint.load_checkpoint"
            )
        names = ("task", "task_options", "estimator", "estimator_options", "preset", "image_size", "channels")
        try:
            spec = cls(**{name: description[name] for name in names})
        except KeyError as err:
            raise UsageError(
                f"checkpoint {where}: its description lacks {err.args[0]!r}; it is damaged or from another version"
            ) from None
        if spec.task not in TASKS or spec.estimator not in ESTIMATOR_NAMES:
            raise UsageError(
                f"checkpoint {where}: unknown task {spec.task!r} or estimator {spec.estimator!r} (from a newer msdiff_fast?)"
            )
        return spec

    @property
    def x_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def degradation(self):
        return TASKS[self.task].degradation(self.task_options)

    def network(self, seed: Optional[int] = None) -> torch.nn.Module:
        """The U-Net; seed: of its initial weights (torch's global generator is left as it was;
        without a seed it draws them, and its state differs from process to process)."""

        def build():
            channels = self.channels
            return unet_preset(
                self.preset, self.estimator, image_channels=channels, cond_channels=channels, image_size=self.image_size
            )

        if seed is None:
            return build()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    def build_estimator(self):
        return make_estimator(self.estimator, self.x_shape, self.x_shape, **self.estimator_options)


@dataclass
class TrainedModel:
    spec: ModelSpec
    network: torch.nn.Module
    estimator: object
    step: int
    path: Path


def load_trained(checkpoint, device: torch.device, ema: bool = True) -> TrainedModel:
    """A checkpoint written by ``msdiff train`` (a run directory or one of its checkpoints), ready to sample."""
    try:
        directory = resolve_checkpoint(checkpoint)
    except FileNotFoundError:
        raise UsageError(
            f"no checkpoint at {checkpoint}: expected a run directory written by `msdiff train --out DIR` "
            f"or one of its checkpoints/step_* directories"
        ) from None
    try:
        state = read_state(directory)
    except Exception as err:  # a damaged state.pt can fail in many ways inside torch.load
        raise UsageError(f"cannot read checkpoint {directory}: {one_line(err)}") from None
    spec = ModelSpec.from_description(state.get("description"), str(directory))
    network = spec.network()
    estimator = spec.build_estimator()
    try:
        load_checkpoint(directory, network, ema=ema)
        estimator.load_state_dict(state["estimator"])
    except Exception as err:  # damaged weights: safetensors and torch raise their own types
        raise UsageError(f"cannot load checkpoint {directory}: {one_line(err)}") from None
    return TrainedModel(spec, network.to(device).eval(), estimator, int(state["step"]), directory)


# ---------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its settings. name: mr-sde / mr-ode (the fast MR Sampler family), posterior
    (IR-SDE's posterior sampling), pc (predictor-corrector: 2 network calls per step), euler
    (Euler-Maruyama). nfe: network evaluations per sample. conditioning: how a multi-speed
    model sees y (None: the estimator's default)."""

    name: str
    nfe: int
    order: int = 2
    prediction: str = "data"
    timesteps: str = "uniform_lambda"
    conditioning: Optional[str] = None
    multistep: str = "heun"
    loop: str = "eager"

    @property
    def steps(self) -> int:
        return self.nfe // 2 if self.name == "pc" else self.nfe

    @property
    def label(self) -> str:
        if self.name.startswith("mr-"):
            return f"{self.name} (order {self.order}, {self.prediction} prediction)"
        return self.name

    def check(self, estimator) -> None:
        if self.name not in SAMPLERS:
            raise UsageError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {self.name!r}", 2)
        if not isinstance(self.nfe, int) or self.nfe < 1:
            raise UsageError(f"--nfe: expected an integer >= 1, got {self.nfe!r}", 2)
        most = 2 * MAX_STEPS if self.name == "pc" else MAX_STEPS
        if self.nfe > most:
            raise UsageError(f"--nfe: expected at most {most} ({MAX_STEPS} steps, the samplers' maximum), got {self.nfe}", 2)
        if self.name == "pc" and (self.nfe < 2 or self.nfe % 2):
            raise UsageError(
                f"--nfe: pc makes 2 network calls per step (corrector + predictor), so NFE must be even and >= 2, got {self.nfe}",
                2,
            )
        max_order = 3 if self.name == "mr-ode" else 2
        if self.name.startswith("mr-") and not 1 <= self.order <= max_order:
            raise UsageError(f"--order: expected 1..{max_order} for {self.name}, got {self.order}", 2)
        estimator_name = getattr(estimator, "name", "")
        if self.name == "pc" and estimator_name == "mr":
            raise UsageError(
                "--sampler pc: predictor-corrector is the VE reference sampler; for a mean-reverting model use posterior, mr-sde or mr-ode",
                2,
            )
        if self.conditioning is not None and estimator_name == "mr" and self.conditioning != "clean":
            raise UsageError(
                f"--conditioning: a mean-reverting model's condition is never diffused, expected 'clean', got {self.conditioning!r}",
                2,
            )
        if self.conditioning is not None and estimator_name == "cde" and self.conditioning != "clean":
            raise UsageError(
                f"--conditioning: CDE is trained with the clean condition, expected 'clean', got {self.conditioning!r}", 2
            )

    def time_grid(self, sde) -> torch.Tensor:
        """The times at which this sampler calls the model (for the 'consistent' conditioning)."""
        return get_timesteps(sde, self.steps, self.timesteps if self.name.startswith("mr-") else "uniform_t")


@torch.no_grad()
def restore_batch(
    network: torch.nn.Module, estimator, y: torch.Tensor, spec: SamplerSpec, generator: torch.Generator
) -> torch.Tensor:
    """One sample of x given the conditions y [B, C, H, W] (on the network's device), in [0, 1]."""
    if estimator.name == "mr":
        sde, mu, output_kind = estimator.sde, y, estimator.model_output
        model = estimator.sampling_model(network)
        x_T = sde.prior(mu, generator)
    else:
        sde, mu, output_kind = estimator.sde.x, None, "noise"
        times = spec.time_grid(sde) if spec.conditioning == "consistent" else None
        model = estimator.sampling_model(network, y, mode=spec.conditioning, generator=generator, times=times)
        x_T = sde.prior(torch.zeros_like(y[:, : estimator.x_shape[0]] if estimator.x_shape else y), generator)
    if spec.name.startswith("mr-"):
        sampler = MRSampler(
            sde,
            spec.steps,
            solver=spec.name[3:],
            order=spec.order,
            prediction=spec.prediction,
            model_output=output_kind,
            timesteps=spec.timesteps,
            clip=(0.0, 1.0),
            multistep=spec.multistep,
            loop=spec.loop,
        )
        x = sampler.sample(model, mu, x_T=x_T, generator=generator)
    elif spec.name == "posterior":
        x = posterior_sample(model, sde, mu, spec.steps, model_output=output_kind, x_T=x_T, generator=generator)
    elif spec.name == "euler":
        x = euler_maruyama(model, sde, mu, spec.steps, model_output=output_kind, x_T=x_T, generator=generator)
    else:
        x = pc_sample(model, sde, y, spec.steps, model_output=output_kind, x_T=x_T, generator=generator)
    return x.clamp(0.0, 1.0)


def restoration_batches(shapes: Sequence[Tuple[int, ...]], tile: int, overlap: int, batch: int) -> List[List[int]]:
    """The indices of the images restored together, in order: images of one size, as many as
    give at most ``batch`` tiles per network call (at least one). Depends on nothing but its
    arguments, so every process of a sharded run forms the same batches."""
    by_size: Dict[Tuple[int, ...], List[int]] = {}
    for index, shape in enumerate(shapes):
        by_size.setdefault(tuple(shape), []).append(index)
    batches = []
    for shape, indices in by_size.items():
        per_call = max(1, batch // len(TileLayout.for_image(shape[-2], shape[-1], tile, overlap)))
        batches += [indices[start : start + per_call] for start in range(0, len(indices), per_call)]
    return batches


def restore_images(
    network: torch.nn.Module,
    estimator,
    conditions: Sequence[torch.Tensor],
    spec: SamplerSpec,
    seed: int,
    tile: int,
    overlap: int,
    batch: int,
    progress: bool = False,
    description: str = "restore",
    rank: int = 0,
    world_size: int = 1,
) -> List[Optional[torch.Tensor]]:
    """Restore conditions [C, H, W] of any sizes (on the network's device): one sample each, in order.

    The sampler runs on whole images and only the network is evaluated tile by tile
    (``tiling.TiledNetwork``: one noise draw per image, so neighbouring tiles agree and no seams
    show); images of one size are restored together (``restoration_batches``), ``batch`` tiles per
    network call. Batch k draws its noise from ``stream_seed(seed, k)``, so the result does not
    depend on how the batches are shared out: with ``rank`` / ``world_size`` this process restores
    batches rank, rank + world_size, ... and returns None for the images of the others."""
    tiled = TiledNetwork(network, tile, overlap, batch)
    batches = restoration_batches([condition.shape for condition in conditions], tile, overlap, batch)
    mine = shard(list(enumerate(batches)), rank, world_size)
    restored: List[Optional[torch.Tensor]] = [None] * len(conditions)
    total = sum(len(chosen) for _, chosen in mine)
    with tqdm(total=total, desc=description, unit="image", disable=not progress) as bar:
        for index, chosen in mine:
            generator = torch.Generator().manual_seed(stream_seed(seed, index))
            output = restore_batch(tiled, estimator, torch.stack([conditions[i] for i in chosen]), spec, generator)
            for i, image in zip(chosen, output):
                restored[i] = image
            bar.update(len(chosen))
    return restored


# ---------------------------------------------------------------------------- memory
# float32 tensors of an image's size that a sampler holds at once: x, mu, the network output,
# the newest prediction and two older ones (order 3), the next x and its noise
SAMPLER_STATE_TENSORS = 8


def sampling_memory(sizes: Sequence[Tuple[int, int]], channels: int, tile: int, overlap: int, batch: int) -> int:
    """Bytes that ``restore_images`` certainly allocates for images of ``sizes`` (float32): every
    condition and every restored image (kept until written), and for the largest call the
    sampler's state of the images restored together and the tiles of one network call (input
    [batch, 2C, tile, tile] and output). A lower bound: the network's own activations come on top."""
    floats = 2 * channels * sum(height * width for height, width in sizes)
    largest_call = 0
    for height, width in set(sizes):
        tiles = len(TileLayout.for_image(height, width, tile, overlap))
        together = min(sizes.count((height, width)), max(1, batch // tiles))
        state = SAMPLER_STATE_TENSORS * together * channels * max(height, tile) * max(width, tile)
        tiled = together * tiles * 3 * channels * tile * tile
        largest_call = max(largest_call, state + tiled)
    return 4 * (floats + largest_call)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the system's available
    memory (MemAvailable of /proc/meminfo, else free pages); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(needed: int, device: torch.device, what: str) -> None:
    available = available_memory(device)
    if available is not None and needed > available:
        raise UsageError(
            f"{what} needs at least {needed / 2**30:.2f} GiB of memory on {device}, but {available / 2**30:.2f} GiB "
            f"are available; restore fewer or smaller images at a time"
        )
