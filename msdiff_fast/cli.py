"""The ``msdiff`` command: demo, train, sample, evaluate, bench.

Every subcommand is configured by flags and, optionally, a JSON or TOML file (``--config``)
whose keys are the flags' long names (``batch-size`` or ``batch_size``); flags given on the
command line win over the file. A file may hold one table per subcommand ([train], [sample], ...);
otherwise its top-level keys are used. User errors (a missing checkpoint, an unreadable image,
a bad flag value, ...) print one line ``msdiff: error: ...`` and exit non-zero; set
MSDIFF_TRACEBACK=1 to see the Python traceback instead.

The pieces the subcommands share live here too: tasks (which degradation makes the condition),
the description a checkpoint carries (task, estimator, network), the sampler specification and
the metrics of a set of restored images.
"""

import argparse
import contextlib
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

PROG = "msdiff"
DESCRIPTION_FORMAT = "msdiff_fast.cli/1"
SAMPLERS = ("mr-sde", "mr-ode", "posterior", "pc", "euler")
ESTIMATOR_NAMES = ("cde", "cdiffe", "cmde", "vscmde", "mr")
TIMESTEPS = ("uniform_lambda", "uniform_t", "karras")


class CLIError(Exception):
    """A user error: printed as one line ``msdiff: error: <message>``, exit status ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """An inverse problem: how the condition y is made from a clean image x, and its options."""

    name: str
    summary: str
    options: Tuple[str, ...]  # the task's entries of ``TASK_OPTION_DEFAULTS``
    default_sigma_y: float  # CMDE / VS-CMDE sigma_y_max (the paper: 0.5 for SR, 1 otherwise)

    def degradation(self, options: Dict):
        from .training import make_degradation

        builders = {
            "sr": lambda: make_degradation("sr", factor=options["scale"], up=options.get("upsample", "nearest")),
            "inpaint": lambda: make_degradation("inpaint", hole_fraction=options["hole_fraction"]),
            "edges": lambda: make_degradation("edges"),
            "denoise": lambda: make_degradation("noise", sigma=options["noise_sigma"]),
            "blur": lambda: make_degradation("blur"),
            "motion_blur": lambda: make_degradation("motion_blur"),
            "lowlight": lambda: make_degradation("lowlight"),
            "jpeg": lambda: make_degradation("jpeg", quality=options["quality"]),
        }
        return builders[self.name]()


TASKS: Dict[str, Task] = {
    task.name: task
    for task in (
        Task("sr", "super-resolution by --scale (the condition is the low-resolution image upsampled by --upsample)", ("scale", "upsample"), 0.5),
        Task("inpaint", "fill a square hole covering --hole-fraction of the image", ("hole_fraction",), 1.0),
        Task("edges", "image from its Canny edge map (black edges on white)", (), 1.0),
        Task("denoise", "remove white Gaussian noise of --noise-sigma (0-255 scale)", ("noise_sigma",), 1.0),
        Task("blur", "remove a Gaussian blur (kernel 9, sigma 2)", (), 1.0),
        Task("motion_blur", "remove a linear motion blur of 9 pixels at a random angle", (), 1.0),
        Task("lowlight", "brighten a dark, noisy image", (), 1.0),
        Task("jpeg", "remove JPEG artefacts of --quality", ("quality",), 1.0),
    )
}
TASK_OPTION_DEFAULTS = {"scale": 2, "upsample": None, "hole_fraction": 0.25, "noise_sigma": 25.0, "quality": 10}
UPSAMPLING = ("nearest", "bicubic")


def default_upsampling(estimator: Optional[str]) -> str:
    """How an sr condition is brought to the output size: nearest for the VE estimators (as the
    CMDE paper), bicubic for mean-reverting models, whose condition mu is where the diffusion
    starts (IR-SDE): the closer mu is to the image, the less the network has to correct."""
    return "bicubic" if estimator == "mr" else "nearest"


def task_options(task: str, args: argparse.Namespace, estimator: Optional[str] = None) -> Dict:
    """The options of ``task`` from parsed flags (None: the default), checked."""
    options = {}
    for name in TASKS[task].options:
        value = getattr(args, name, None)
        options[name] = TASK_OPTION_DEFAULTS[name] if value is None else value
    if "upsample" in options and options["upsample"] is None:
        options["upsample"] = default_upsampling(estimator)
    if "scale" in options and options["scale"] < 1:
        raise CLIError(f"--scale: expected an integer >= 1, got {options['scale']}", 2)
    if "hole_fraction" in options and not 0 < options["hole_fraction"] < 1:
        raise CLIError(f"--hole-fraction: expected a number in (0, 1), got {options['hole_fraction']}", 2)
    if "noise_sigma" in options and not options["noise_sigma"] > 0:
        raise CLIError(f"--noise-sigma: expected a positive number (0-255 scale), got {options['noise_sigma']}", 2)
    if "quality" in options and not 1 <= options["quality"] <= 100:
        raise CLIError(f"--quality: expected an integer in 1..100, got {options['quality']}", 2)
    return options


def consistency_operator(task: str, options: Dict, mask: Optional[torch.Tensor] = None) -> Optional[Callable]:
    """The forward operator A of the consistency metric PSNR(A(x_hat), A(x)), or None when the
    task has none (noise, JPEG, low light, motion blur: random or not invertible in a useful sense).
    Inpainting needs the hole ``mask`` [B, 1, H, W] (1 = observed)."""
    from .training import make_degradation

    if task == "sr":
        return make_degradation("sr", factor=options["scale"]).operator
    if task == "blur":
        return make_degradation("blur").operator
    if task == "edges":
        return make_degradation("edges").operator
    if task == "inpaint" and mask is not None:
        inpainting = make_degradation("inpaint", hole_fraction=options["hole_fraction"])
        return lambda x: inpainting.operator(x, mask)
    return None


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
            raise CLIError(f"checkpoint {where} was not written by `msdiff train` (its description has no "
                           f"{DESCRIPTION_FORMAT!r} format); load it from Python with msdiff_fast.training.checkpoint.load_checkpoint")
        try:
            spec = cls(**{name: description[name] for name in ("task", "task_options", "estimator", "estimator_options", "preset", "image_size", "channels")})
        except KeyError as err:
            raise CLIError(f"checkpoint {where}: its description lacks {err.args[0]!r}; it is damaged or from another version") from None
        if spec.task not in TASKS or spec.estimator not in ESTIMATOR_NAMES:
            raise CLIError(f"checkpoint {where}: unknown task {spec.task!r} or estimator {spec.estimator!r} (from a newer msdiff_fast?)")
        return spec

    @property
    def x_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def degradation(self):
        return TASKS[self.task].degradation(self.task_options)

    def network(self, seed: Optional[int] = None) -> torch.nn.Module:
        """The U-Net; seed: of its initial weights (torch's global generator is left as it was;
        without a seed it draws them, and its state differs from process to process)."""
        from .models import unet_preset

        def build():
            return unet_preset(self.preset, self.estimator, image_channels=self.channels, cond_channels=self.channels, image_size=self.image_size)

        if seed is None:
            return build()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    def build_estimator(self):
        from .estimators import make_estimator

        return make_estimator(self.estimator, self.x_shape, self.x_shape, **self.estimator_options)


# Targets that need far more training than the demo's minutes before their samples are usable.
UNSTABLE_MR_TARGETS = {
    "noise": "near t = T the image is 0.5% of x_t - mu, so a noise-predicting network's image estimate divides its error by "
             "alpha_T = 0.005: after minutes to hours of training it restores photographs in wrong colours (measured: 6-13 dB "
             "where bicubic scores 31). It is what IR-SDE / DA-CLIP checkpoints use; to train a new model prefer residual",
}


def estimator_options(estimator: str, task: str, args: argparse.Namespace, steps: int) -> Dict:
    """Keyword arguments of ``<Estimator>.for_images`` from flags (JSON-able, stored in checkpoints)."""
    sigma_y = getattr(args, "sigma_y", None)
    sigma_y = TASKS[task].default_sigma_y if sigma_y is None else sigma_y
    sigma_data = getattr(args, "sigma_data", None)
    if sigma_data is not None and estimator == "mr":
        raise CLIError("--sigma-data: preconditions the VE estimators (cde, cdiffe, cmde, vscmde); for mr choose --mr-target data instead", 2)
    preconditioning = {} if sigma_data is None else {"sigma_data": sigma_data}
    if estimator == "cmde":
        return {"sigma_y_max": sigma_y, **preconditioning}
    if estimator == "vscmde":
        target_step = getattr(args, "vs_target_step", None)
        return {"sigma_y_target": sigma_y, "target_step": max(1, steps // 2) if target_step is None else target_step, **preconditioning}
    if estimator == "mr":
        mr_sigma = getattr(args, "mr_sigma", None)
        target = getattr(args, "mr_target", None) or "residual"
        if target in UNSTABLE_MR_TARGETS:
            print(f"msdiff: warning: --mr-target {target}: {UNSTABLE_MR_TARGETS[target]}", file=sys.stderr)
        return {"lam_inf": (50.0 if mr_sigma is None else mr_sigma) / 255.0, "target": target}
    return preconditioning


@dataclass
class TrainedModel:
    spec: ModelSpec
    network: torch.nn.Module
    estimator: object
    step: int
    path: Path


def load_trained(checkpoint, device: torch.device, ema: bool = True) -> TrainedModel:
    """A checkpoint written by ``msdiff train`` (a run directory or one of its checkpoints), ready to sample."""
    from .training.checkpoint import load_checkpoint, read_state, resolve_checkpoint

    try:
        directory = resolve_checkpoint(checkpoint)
    except FileNotFoundError:
        raise CLIError(f"no checkpoint at {checkpoint}: expected a run directory written by `msdiff train --out DIR` "
                       f"or one of its checkpoints/step_* directories") from None
    try:
        state = read_state(directory)
    except Exception as err:  # a damaged state.pt can fail in many ways inside torch.load
        raise CLIError(f"cannot read checkpoint {directory}: {_one_line(err)}") from None
    spec = ModelSpec.from_description(state.get("description"), str(directory))
    network = spec.network()
    estimator = spec.build_estimator()
    try:
        load_checkpoint(directory, network, ema=ema)
        estimator.load_state_dict(state["estimator"])
    except Exception as err:  # damaged weights: safetensors and torch raise their own types
        raise CLIError(f"cannot load checkpoint {directory}: {_one_line(err)}") from None
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
            raise CLIError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {self.name!r}", 2)
        from .samplers.timesteps import MAX_STEPS

        if not isinstance(self.nfe, int) or self.nfe < 1:
            raise CLIError(f"--nfe: expected an integer >= 1, got {self.nfe!r}", 2)
        most = 2 * MAX_STEPS if self.name == "pc" else MAX_STEPS
        if self.nfe > most:
            raise CLIError(f"--nfe: expected at most {most} ({MAX_STEPS} steps, the samplers' maximum), got {self.nfe}", 2)
        if self.name == "pc" and (self.nfe < 2 or self.nfe % 2):
            raise CLIError(f"--nfe: pc makes 2 network calls per step (corrector + predictor), so NFE must be even and >= 2, got {self.nfe}", 2)
        max_order = 3 if self.name == "mr-ode" else 2
        if self.name.startswith("mr-") and not 1 <= self.order <= max_order:
            raise CLIError(f"--order: expected 1..{max_order} for {self.name}, got {self.order}", 2)
        mean_reverting = getattr(estimator, "name", "") == "mr"
        if self.name == "pc" and mean_reverting:
            raise CLIError("--sampler pc: predictor-corrector is the VE reference sampler; for a mean-reverting model use posterior, mr-sde or mr-ode", 2)
        if self.conditioning is not None and mean_reverting and self.conditioning != "clean":
            raise CLIError(f"--conditioning: a mean-reverting model's condition is never diffused, expected 'clean', got {self.conditioning!r}", 2)
        if self.conditioning is not None and getattr(estimator, "name", "") == "cde" and self.conditioning != "clean":
            raise CLIError(f"--conditioning: CDE is trained with the clean condition, expected 'clean', got {self.conditioning!r}", 2)

    def time_grid(self, sde) -> torch.Tensor:
        """The times at which this sampler calls the model (for the 'consistent' conditioning)."""
        from .samplers import get_timesteps

        if self.name == "pc":
            return get_timesteps(sde, self.steps, "uniform_t")
        if self.name.startswith("mr-"):
            return get_timesteps(sde, self.steps, self.timesteps)
        return get_timesteps(sde, self.steps, "uniform_t")


@torch.no_grad()
def restore_batch(network: torch.nn.Module, estimator, y: torch.Tensor, spec: SamplerSpec, generator: torch.Generator) -> torch.Tensor:
    """One sample of x given the conditions y [B, C, H, W] (on the network's device), in [0, 1]."""
    from .samplers import MRSampler, euler_maruyama, pc_sample, posterior_sample

    mean_reverting = estimator.name == "mr"
    if mean_reverting:
        sde, mu, output_kind = estimator.sde, y, estimator.model_output
        model = estimator.sampling_model(network)
        x_T = sde.prior(mu, generator)
    else:
        sde, mu, output_kind = estimator.sde.x, None, "noise"
        times = spec.time_grid(sde) if spec.conditioning == "consistent" else None
        model = estimator.sampling_model(network, y, mode=spec.conditioning, generator=generator, times=times)
        x_T = sde.prior(torch.zeros_like(y[:, : estimator.x_shape[0]] if estimator.x_shape else y), generator)
    if spec.name.startswith("mr-"):
        sampler = MRSampler(sde, spec.steps, solver=spec.name[3:], order=spec.order, prediction=spec.prediction,
                            model_output=output_kind, timesteps=spec.timesteps, clip=(0.0, 1.0), multistep=spec.multistep, loop=spec.loop)
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
    from .tiling import TileLayout

    by_size: Dict[Tuple[int, ...], List[int]] = {}
    for index, shape in enumerate(shapes):
        by_size.setdefault(tuple(shape), []).append(index)
    batches = []
    for shape, indices in by_size.items():
        per_call = max(1, batch // len(TileLayout.for_image(shape[-2], shape[-1], tile, overlap)))
        batches += [indices[start:start + per_call] for start in range(0, len(indices), per_call)]
    return batches


def restore_images(network: torch.nn.Module, estimator, conditions: Sequence[torch.Tensor], spec: SamplerSpec, seed: int,
                   tile: int, overlap: int, batch: int, progress: bool = False, description: str = "restore",
                   rank: int = 0, world_size: int = 1) -> List[Optional[torch.Tensor]]:
    """Restore conditions [C, H, W] of any sizes (on the network's device): one sample each, in order.

    The sampler runs on whole images and only the network is evaluated tile by tile
    (``tiling.TiledNetwork``: one noise draw per image, so neighbouring tiles agree and no seams
    show); images of one size are restored together (``restoration_batches``), ``batch`` tiles per
    network call. Batch k draws its noise from ``stream_seed(seed, k)``, so the result does not
    depend on how the batches are shared out: with ``rank`` / ``world_size`` this process restores
    batches rank, rank + world_size, ... and returns None for the images of the others."""
    from .distributed import shard
    from .tiling import TiledNetwork
    from .training.trainer import stream_seed

    tiled = TiledNetwork(network, tile, overlap, batch)
    batches = restoration_batches([condition.shape for condition in conditions], tile, overlap, batch)
    mine = shard(list(enumerate(batches)), rank, world_size)
    restored: List[Optional[torch.Tensor]] = [None] * len(conditions)
    with tqdm(total=sum(len(chosen) for _, chosen in mine), desc=description, unit="image", disable=not progress) as bar:
        for index, chosen in mine:
            generator = torch.Generator().manual_seed(stream_seed(seed, index))
            output = restore_batch(tiled, estimator, torch.stack([conditions[i] for i in chosen]), spec, generator)
            for i, image in zip(chosen, output):
                restored[i] = image
            bar.update(len(chosen))
    return restored


def upsample_condition(low_resolution: torch.Tensor, scale: int, mode: str = "nearest") -> torch.Tensor:
    """The SR condition from a low-resolution image [C, h, w], upsampled as in training."""
    if mode == "nearest":
        return low_resolution.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    size = (low_resolution.shape[-2] * scale, low_resolution.shape[-1] * scale)
    return torch.nn.functional.interpolate(low_resolution[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)


# ---------------------------------------------------------------------------- metrics
def image_metrics(samples: torch.Tensor, reference: torch.Tensor, operator: Optional[Callable] = None,
                  feature_net: Optional[Callable] = None, lpips_net: Optional[Callable] = None,
                  inception: Optional[Callable] = None) -> Dict[str, Optional[float]]:
    """Metrics of restored ``samples`` [S, B, C, H, W] (S samples of each of B inputs) against
    ``reference`` [B, C, H, W]: PSNR / SSIM / consistency / LPIPS averaged over every sample,
    diversity (mean per-pixel std over the S samples, 0-255; None when S = 1), FID of all samples
    vs the references with the SmallFeatureNet (``feature_net``; a demo statistic, not comparable
    with published FID) and with Inception (``inception``). Missing metrics are None."""
    from .metrics import consistency, diversity, fid, psnr, ssim

    count = samples.shape[0]
    flat = samples.reshape(-1, *samples.shape[2:]).float()
    repeated = reference.float().repeat(count, 1, 1, 1)
    values: Dict[str, Optional[float]] = {
        "psnr": float(psnr(flat, repeated).mean()),
        "ssim": float(ssim(flat, repeated).mean()) if min(reference.shape[-2:]) >= 11 else None,
        "consistency": float(consistency(flat, repeated, operator).clamp(max=100).mean()) if operator is not None else None,
        "diversity": float(diversity(samples.float()).mean()) if count > 1 else None,
        "fid_small": fid(reference.float(), flat, feature_net) if feature_net is not None and reference.shape[0] >= 2 else None,
        "fid_inception": fid(reference.float(), flat, inception) if inception is not None and reference.shape[0] >= 2 else None,
        "lpips": float(torch.cat([lpips_net(flat[i:i + 16], repeated[i:i + 16]) for i in range(0, flat.shape[0], 16)]).mean()) if lpips_net is not None else None,
    }
    return values


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


def cpu_model() -> str:
    """The CPU's model name for reports (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(format_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- files and folders
@contextlib.contextmanager
def output_folder(path, overwrite: bool = False, flag: str = "--out", overwrite_flag: Optional[str] = "--overwrite"):
    """``outputs.OutputFolder`` (created if needed, locked against other runs, atomic writes that
    never replace a file unless ``overwrite``) with its errors as one-line CLIErrors."""
    from .outputs import FolderBusyError, OutputFolder

    folder = OutputFolder(path, flag, overwrite, overwrite_flag)
    try:
        folder.__enter__()
    except FolderBusyError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise CLIError(f"{flag} {path}: cannot write there ({reason}); choose a directory you can write to") from None
    try:
        yield folder
    except FileExistsError as err:  # OutputFolder.check_new / write refusing to replace a file
        raise CLIError(_one_line(err)) from None
    finally:
        folder.__exit__(None, None, None)


def check_apart(output, output_flag: str, source, source_flag: str) -> None:
    from .outputs import check_separate_folders

    try:
        check_separate_folders(output, output_flag, source, source_flag)
    except ValueError as err:
        raise CLIError(_one_line(err), 2) from None


def relative_names(files: Sequence[Path], root, flag: str, suffix: Optional[str] = None) -> List[str]:
    """Each file's path relative to ``root`` (with ``suffix`` instead of its extension; without
    one, with no extension); raises CLIError naming two files that share a name (a.png, a.jpg)."""
    from .outputs import check_no_collisions

    names = [(p.relative_to(root).with_suffix(suffix or "")).as_posix() for p in files]
    try:
        check_no_collisions(names, files, flag)
    except ValueError as err:
        raise CLIError(_one_line(err)) from None
    return names


def check_seed(seed: Optional[int], flag: str = "--seed") -> None:
    if seed is not None and not 0 <= seed < 2**63:
        raise CLIError(f"{flag}: expected an integer in [0, 2**63), got {seed}", 2)


def list_images(folder, flag: str) -> List[Path]:
    from .training import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise CLIError(f"{flag} {root}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise CLIError(f"{flag} {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return files


def load_image(path: Path, channels: int) -> torch.Tensor:
    from .training import read_image

    try:
        return read_image(path, channels)
    except (ValueError, OSError) as err:
        raise CLIError(f"{_one_line(err)}; convert or remove that file") from None


def device_from(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}", 2) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    return " ".join(text.split())


# ---------------------------------------------------------------------------- train
def command_train(args: argparse.Namespace) -> int:
    from .training import ConditionalPairs
    from .training.checkpoint import latest_checkpoint, read_optimizer_state, read_state, read_weights
    from .training.trainer import TrainConfig, Trainer

    # Every flag is checked before --out is created: a refused command leaves nothing behind.
    out = Path(args.out)
    check_seed(args.seed)
    existing = latest_checkpoint(out)
    if existing is not None and not args.resume:
        raise CLIError(f"--out {out} already holds a run (latest checkpoint {existing.name}); pass --resume to continue it or choose another --out")
    if args.resume and existing is None:
        raise CLIError(f"--resume: no checkpoint under {out} to resume from; drop --resume to start a new run")
    if existing is None and (out / "msdiff_train.json").exists():
        raise CLIError(f"--out {out} holds msdiff_train.json of an earlier run that left no checkpoint; choose another --out or delete that run")
    if existing is not None:  # every file of the checkpoint checked now, before anything is written
        read_optimizer_state(existing)
        read_weights(existing, ema=False)
        read_weights(existing, ema=True)
    stored_state = read_state(existing) if existing is not None else {}
    stored = ModelSpec.from_description(stored_state["description"], str(existing)) if existing is not None else None
    stored_config = stored_state.get("config", {}) if existing is not None else {}

    def chosen(name: str, default):
        """A flag's value; when resuming and the flag was not given, the run's stored value."""
        value = getattr(args, name)
        if value is not None:
            return value
        if stored is not None and hasattr(stored, name):
            return getattr(stored, name)
        if name in stored_config:
            return stored_config[name]
        return default

    task = chosen("task", "sr")
    estimator_name = chosen("estimator", "cmde")
    steps = args.steps
    spec = ModelSpec(
        task=task,
        task_options=stored.task_options if stored is not None and _no_task_flags(args) else task_options(task, args, estimator_name),
        estimator=estimator_name,
        estimator_options=stored.estimator_options if stored is not None and _no_estimator_flags(args) else estimator_options(estimator_name, task, args, steps),
        preset=chosen("preset", "tiny"),
        image_size=chosen("image_size", None) or _preset_size(chosen("preset", "tiny")),
        channels=chosen("channels", 3),
    )
    if spec.image_size % 4:
        raise CLIError(f"--image-size: the U-Net halves the image twice, so it must be a multiple of 4, got {spec.image_size}", 2)
    if stored is not None:
        _check_resumed_spec(spec, stored, existing)
    device = device_from(args.device)
    try:
        config = TrainConfig(
            steps=steps, batch_size=chosen("batch_size", 16), lr=chosen("lr", 2e-4), warmup=chosen("warmup", 100),
            lr_schedule=chosen("lr_schedule", "constant"), compile=chosen("compile", False),
            channels_last=chosen("channels_last", False), optimizer_impl=chosen("optimizer_impl", "auto"),
            grad_clip=chosen("grad_clip", 1.0), ema_decay=chosen("ema_decay", 0.999), amp=chosen("amp", "none"),
            seed=chosen("seed", 0), log_every=args.log_every, checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints, out_dir=str(out), device=str(device), num_workers=args.workers,
            progress=not args.no_progress, preview_every=args.preview_every,
        )
    except ValueError as err:
        raise CLIError(_flag_message(err), 2) from None
    images = training_images(args.data, spec, config.seed, args.synthetic_count, args.data_resize, args.downscale)
    dataset = ConditionalPairs(images, spec.degradation(), seed=config.seed)
    model = spec.network(seed=config.seed)
    estimator = spec.build_estimator()
    preview = _preview_writer(spec, dataset, out, device) if args.preview_every else None
    data_name = describe_data(args.data, args.synthetic_count, args.downscale)
    # Held for the whole run: a second `msdiff train` into the same --out fails at once.
    with output_folder(out, overwrite=bool(args.resume), overwrite_flag=None) as folder:
        folder.write_text("msdiff_train.json", json_text({"command": _command_line(), "spec": spec.description(), "data": data_name}))
        print(f"msdiff train: {spec.estimator} for {spec.task} on {data_name} "
              f"at {spec.image_size}x{spec.image_size}, {spec.preset} U-Net ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
              f"{config.steps} steps of {config.batch_size} on {device}", file=sys.stderr)
        trainer = Trainer(model, estimator, dataset, config, preview=preview, description=spec.description())
        try:
            trainer.fit(resume=True if args.resume else False)
        finally:
            trainer.close()
    checkpoint = latest_checkpoint(out)
    loss = trainer.last_metrics.get("loss")
    print(f"trained to step {trainer.step} in {trainer.seconds:.0f} s (last logged loss {format_number(loss, 4)}); checkpoint {checkpoint}")
    print(f"next: msdiff sample --checkpoint {out} --input DEGRADED_IMAGES --out RESTORED")
    return 0


def _check_resumed_spec(spec: ModelSpec, stored: ModelSpec, checkpoint: Path) -> None:
    """A resumed run must train the model it holds: name every flag that asks for another one."""
    found, wanted = stored.description(), spec.description()
    differences = [f"{key} {found[key]!r} (asked: {wanted[key]!r})" for key in found if key != "format" and found[key] != wanted[key]]
    if differences:
        raise CLIError(f"--resume: the run in {checkpoint.parent.parent} was trained with {', '.join(differences)}; drop those "
                       f"flags to continue it, or train the new model into another --out", 2)


DATA_SOURCES = ("synthetic", "photos")


def training_images(data: Optional[str], spec: ModelSpec, seed: int, synthetic_count: int = 4096, resize: bool = False, downscale: int = 4):
    """The clean training images of ``--data``: synthetic (the default), photos (scikit-image's
    photographs, downscaled, random patches at their own resolution) or a folder (random patches)."""
    from .training import ImageFolder, SyntheticImages
    from .training.data import ImagePatches

    if data is None or data == "synthetic":
        return SyntheticImages(synthetic_count, spec.image_size, spec.channels, seed=seed)
    if data in DATA_SOURCES and Path(data).exists():
        raise CLIError(f"--data {data}: ambiguous, it names both a data source and a folder here; write ./{data} for the folder", 2)
    if downscale < 1:
        raise CLIError(f"--downscale: expected an integer >= 1, got {downscale}", 2)
    if data == "photos":
        from .training.photos import TRAINING_PHOTOS, load_photos

        try:
            photos = load_photos(TRAINING_PHOTOS, spec.channels, downscale)
        except ImportError as err:
            raise CLIError(f"--data photos: {_one_line(err)}") from None
        return ImagePatches(list(photos.values()), spec.image_size, "random", patches_per_image=64)
    try:
        return ImageFolder(data, size=spec.image_size, crop="random", channels=spec.channels, resize=resize)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"--data: {_one_line(err)}") from None


def describe_data(data: Optional[str], synthetic_count: int, downscale: int) -> str:
    if data is None or data == "synthetic":
        return f"{synthetic_count} synthetic images"
    if data == "photos":
        return f"scikit-image's training photographs (downscaled {downscale}x)"
    return f"images in {data}"


def _preset_size(preset: str) -> int:
    from .models import PRESETS

    if preset not in PRESETS:
        raise CLIError(f"--preset: expected one of {', '.join(sorted(PRESETS))}, got {preset!r}", 2)
    return PRESETS[preset].image_size


def _no_task_flags(args) -> bool:
    return all(getattr(args, name, None) is None for name in TASK_OPTION_DEFAULTS)


def _no_estimator_flags(args) -> bool:
    return all(getattr(args, name, None) is None for name in ("sigma_y", "sigma_data", "vs_target_step", "mr_sigma", "mr_target"))


def _flag_message(error: ValueError) -> str:
    """TrainConfig.batch_size: ... -> --batch-size: ..."""
    text = _one_line(error)
    if text.startswith("TrainConfig."):
        name, _, rest = text[len("TrainConfig."):].partition(":")
        return f"--{'workers' if name == 'num_workers' else name.replace('_', '-')}:{rest}"
    return text


def _preview_writer(spec: ModelSpec, dataset, out: Path, device: torch.device):
    """A preview(trainer, step) that writes previews/step_N.png: condition / EMA sample (mr-sde, NFE 10) / truth."""
    from .training import save_grid

    count = min(8, len(dataset))
    truth = torch.stack([dataset[i][0] for i in range(count)])
    condition = torch.stack([dataset[i][1] for i in range(count)])
    sampler = SamplerSpec("mr-sde", 10)

    def preview(trainer, step: int) -> None:
        generator = torch.Generator().manual_seed(0)
        sample = restore_batch(trainer.ema, trainer.estimator, condition.to(device), sampler, generator).cpu()
        save_grid(out / "previews" / f"step_{step:08d}.png", [condition, sample, truth])

    return preview


# ---------------------------------------------------------------------------- sample
def command_sample(args: argparse.Namespace) -> int:
    """Restore every image under --input. Under torchrun each process restores its share of the
    batches a single process would form (each batch seeded from its own index, so the files are
    the same whatever the number of processes); rank 0 holds the output folder's lock."""
    from .distributed import distributed_env
    from .models import FastNetwork
    from .training import write_image
    from .training.trainer import stream_seed

    check_seed(args.seed)
    rank, local_rank, world = distributed_env()
    device = device_from(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    trained = load_trained(args.checkpoint, device, ema=not args.raw_weights)
    spec = trained.spec
    if args.task is not None and args.task != spec.task:
        raise CLIError(f"--task {args.task}: checkpoint {trained.path} was trained for task {spec.task!r}; "
                       f"use a checkpoint trained for {args.task!r} or drop --task")
    sampler = SamplerSpec(args.sampler, args.nfe, args.order, args.prediction, args.timesteps, args.conditioning, args.multistep, args.loop)
    sampler.check(trained.estimator)
    try:
        network = FastNetwork(trained.network, channels_last=not args.no_channels_last, bf16=args.bf16, compile=args.compile)
    except ValueError as err:
        raise CLIError(f"--bf16: {_one_line(err)}", 2) from None
    tile = spec.image_size
    overlap = tile // 4 if args.overlap is None else args.overlap
    if not 0 <= overlap < tile:
        raise CLIError(f"--overlap: expected 0 <= overlap < tile size {tile}, got {overlap}", 2)
    if args.batch < 1 or args.num_samples < 1:
        raise CLIError(f"--batch, --num-samples: expected integers >= 1, got {args.batch}, {args.num_samples}", 2)
    files = list_images(args.input, "--input")
    check_apart(args.out, "--out", args.input, "--input")
    names = relative_names(files, args.input, "--input", suffix=".png")
    folders = [f"sample_{k}/" for k in range(args.num_samples)] if args.num_samples > 1 else [""]
    destinations = [folder + name for folder in folders for name in names]
    upsampling = spec.task_options["scale"] if spec.task == "sr" and not args.inputs_upsampled else 1
    sizes = [(height * upsampling, width * upsampling) for height, width in map(image_size, files)]
    largest = max(sizes, key=lambda size: size[0] * size[1])
    check_memory(sampling_memory(sizes, spec.channels, tile, overlap, args.batch), device,
                 f"--input {args.input}: restoring {len(files)} images (the largest {largest[0]}x{largest[1]} after upsampling)")
    with _ProcessGroup(world, device) as group, contextlib.ExitStack() as stack:
        # rank 0 locks the folder and checks every destination before any work; the others
        # learn its verdict, so a refused run changes nothing and every process stops with it
        refusal = None
        if rank == 0:
            try:
                out = stack.enter_context(output_folder(args.out, overwrite=args.overwrite))
                out.check_new(destinations)
            except CLIError as err:
                refusal = err
        message = group.broadcast(None if refusal is None else str(refusal))
        if message is not None:
            raise refusal if refusal is not None else CLIError(message)
        conditions = []
        for path in files:
            image = load_image(path, spec.channels)
            if upsampling > 1:
                image = upsample_condition(image, upsampling, spec.task_options.get("upsample", "nearest"))
            conditions.append(image.to(device))
        if rank == 0:
            print(f"msdiff sample: {len(files)} images from {args.input} with {sampler.label}, NFE {sampler.nfe}, "
                  f"{spec.estimator} model for {spec.task} (step {trained.step}) on {device}{f' x {world} processes' if world > 1 else ''}, "
                  f"tiles {tile}px overlap {overlap}", file=sys.stderr)
        started = time.perf_counter()
        written = 0
        for sample_index, folder in enumerate(folders):
            restored = restore_images(network, trained.estimator, conditions, sampler, stream_seed(args.seed, sample_index), tile, overlap,
                                      args.batch, progress=not args.no_progress and rank == 0,
                                      description=f"sample {sample_index + 1}/{args.num_samples}", rank=rank, world_size=world)
            for name, image in zip(names, restored):
                if image is None:  # another process's
                    continue
                destination = Path(args.out) / (folder + name)
                if rank == 0:
                    out.check_new([folder + name])
                try:
                    write_image(destination, image.cpu())
                except OSError as err:
                    raise CLIError(f"cannot write {destination}: {err.strerror or _one_line(err)}") from None
                written += 1
        written = group.total(written)  # and every process has finished writing before rank 0 unlocks
    seconds = time.perf_counter() - started
    if rank == 0:
        print(f"wrote {written} images to {args.out} in {seconds:.1f} s ({sampler.nfe} network evaluations per tile)")
    return 0


class _ProcessGroup:
    """The processes of a torchrun launch as one group for the duration of a command (a
    gloo/nccl group is created if none exists, and destroyed after); one process: no-ops."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device, self.created = world, device, False

    def __enter__(self) -> "_ProcessGroup":
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.created = True
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        if self.created:
            dist.destroy_process_group()

    def broadcast(self, value):
        """Rank 0's ``value``, on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, count: int) -> int:
        """The sum of ``count`` over the processes (a barrier too)."""
        if self.world == 1:
            return count
        import torch.distributed as dist

        tensor = torch.tensor([count], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return int(tensor.item())


def image_size(path: Path) -> Tuple[int, int]:
    """(height, width) of an image file from its header (nothing decoded)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # a huge size is refused when the image is read, with our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CLIError(f"cannot read image {path}: {_one_line(err)}; convert or remove that file") from None


# float32 tensors of an image's size that a sampler holds at once: x, mu, the network output,
# the newest prediction and two older ones (order 3), the next x and its noise
SAMPLER_STATE_TENSORS = 8


def sampling_memory(sizes: Sequence[Tuple[int, int]], channels: int, tile: int, overlap: int, batch: int) -> int:
    """Bytes that ``restore_images`` certainly allocates for images of ``sizes`` (float32): every
    condition and every restored image (kept until written), and for the largest call the
    sampler's state of the images restored together and the tiles of one network call (input
    [batch, 2C, tile, tile] and output). A lower bound: the network's own activations come on top."""
    from .tiling import TileLayout

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
        raise CLIError(f"{what} needs at least {needed / 2**30:.2f} GiB of memory on {device}, but {available / 2**30:.2f} GiB "
                       f"are available; restore fewer or smaller images at a time")


# ---------------------------------------------------------------------------- evaluate
def command_evaluate(args: argparse.Namespace) -> int:
    from .inception import load_inception
    from .metrics import LPIPS, SmallFeatureNet, load_inception_torchscript

    if args.inception and args.inception_torchscript:
        raise CLIError("--inception, --inception-torchscript: expected one of them (the same network), got both", 2)
    reference_files = list_images(args.reference, "--reference")
    restored_root = Path(args.restored)
    if not restored_root.is_dir():
        raise CLIError(f"--restored {restored_root}: no such directory")
    sample_dirs = sorted(p for p in restored_root.iterdir() if p.is_dir() and p.name.startswith("sample_")) or [restored_root]
    by_stem = _stems(reference_files, args.reference, "--reference")
    samples = []
    for folder in sample_dirs:
        found = _stems(list_images(folder, "--restored"), folder, f"--restored {folder}")
        missing = sorted(by_stem.keys() - found.keys())
        if missing:
            raise CLIError(f"--restored {folder}: no restored image for {len(missing)} reference image(s), e.g. {missing[0]!r}; "
                           f"file names (without extension) must match those under --reference")
        samples.append(_same_size([load_image(found[stem], args.channels) for stem in sorted(by_stem)], f"--restored {folder}"))
    reference = _same_size([load_image(by_stem[stem], args.channels) for stem in sorted(by_stem)], "--reference")
    if samples[0].shape != reference.shape:
        raise CLIError(f"--restored: images of shape {tuple(samples[0].shape[1:])} vs --reference {tuple(reference.shape[1:])}; they must match")
    mask = None
    options = task_options(args.task, args) if args.task else {}
    if args.task == "inpaint":
        if args.degraded is None:
            raise CLIError("--task inpaint: consistency needs the hole of each image: pass --degraded DIR (the inputs given to `msdiff sample`)")
        degraded_files = _stems(list_images(args.degraded, "--degraded"), args.degraded, "--degraded")
        missing = sorted(by_stem.keys() - degraded_files.keys())
        if missing:
            raise CLIError(f"--degraded {args.degraded}: no degraded image for {len(missing)} reference image(s), e.g. {missing[0]!r}")
        degraded = _same_size([load_image(degraded_files[stem], args.channels) for stem in sorted(by_stem)], "--degraded")
        if degraded.shape != reference.shape:
            raise CLIError(f"--degraded: images of shape {tuple(degraded.shape[1:])} vs --reference {tuple(reference.shape[1:])}; they must match")
        # the hole is where every channel holds the fill value 0 (an observed black pixel is
        # counted as hole too: it is then excluded from the consistency, never misjudged)
        mask = (degraded.amax(dim=1, keepdim=True) > 0).float()
    operator = consistency_operator(args.task, options, mask) if args.task else None
    lpips_net = None
    if args.lpips_weights:
        try:
            lpips_net = LPIPS(weights=args.lpips_weights)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise CLIError(f"--lpips-weights: {_one_line(err)}") from None
    inception = None
    try:
        if args.inception:
            inception = load_inception(args.inception)
        elif args.inception_torchscript:
            inception = load_inception_torchscript(args.inception_torchscript, trust_code=True)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise CLIError(f"{'--inception' if args.inception else '--inception-torchscript'}: {_one_line(err)}") from None
    feature_net = SmallFeatureNet(reference.shape[1]) if args.small_fid else None
    out_path = args.out or restored_root
    with output_folder(out_path, overwrite=args.overwrite) as out:
        out.check_new(["metrics.json", "metrics.md"])  # before the metrics are computed
        with torch.no_grad():
            values = image_metrics(torch.stack(samples), reference, operator, feature_net, lpips_net, inception)
        _write_metrics(out, values, reference.shape[0], len(samples), restored_root, args, options)
    rows = [(METRIC_LABELS[name], value) for name, value in values.items() if value is not None]
    print(markdown_table(["metric", "value"], rows), end="")
    print(f"wrote {Path(out_path) / 'metrics.json'} and {Path(out_path) / 'metrics.md'}")
    return 0


def _write_metrics(out, values: Dict, images: int, samples: int, restored_root: Path, args: argparse.Namespace, options: Dict) -> None:
    report = {"restored": str(restored_root), "reference": str(args.reference), "images": images,
              "samples_per_image": samples, "task": args.task, "task_options": options, "metrics": values,
              "notes": {"fid_small": "FID with a fixed random SmallFeatureNet: for comparing runs here only, not comparable with published FID"}}
    out.write_text("metrics.json", json_text(report))
    rows = [(METRIC_LABELS[name], value) for name, value in values.items() if value is not None]
    text = (f"# msdiff evaluate\n\n{images} images, {samples} sample(s) each; restored `{restored_root}` vs reference `{args.reference}`"
            f"{f'; task {args.task}' if args.task else ''}.\n\n" + markdown_table(["metric", "value"], rows))
    if values.get("fid_small") is not None:
        text += "\nFID (SmallFeatureNet) uses a small fixed random network: compare runs with it, never with published FID.\n"
    out.write_text("metrics.md", text)


def _same_size(images: List[torch.Tensor], flag: str) -> torch.Tensor:
    sizes = sorted({tuple(image.shape[1:]) for image in images})
    if len(sizes) > 1:
        raise CLIError(f"{flag}: evaluate compares images of one size, found {len(sizes)} sizes ({sizes[0][0]}x{sizes[0][1]}, {sizes[1][0]}x{sizes[1][1]}, ...); "
                       f"evaluate each size in its own folder")
    return torch.stack(images)


def _stems(files: Sequence[Path], root, flag: str) -> Dict[str, Path]:
    """Files by relative name without extension; two files of one name (img0.png, img0.jpg) are refused."""
    return dict(zip(relative_names(files, root, flag), files))


# ---------------------------------------------------------------------------- bench
def benchmarks_directory(given: Optional[str]) -> Path:
    if given is not None:
        return Path(given)
    return Path(__file__).resolve().parent.parent / "benchmarks"


def command_bench(args: argparse.Namespace) -> int:
    if args.list or args.script:
        return _run_benchmark_script(args)
    if args.batch < 1 or args.repeats < 1:
        raise CLIError(f"--batch, --repeats: expected integers >= 1, got {args.batch}, {args.repeats}", 2)
    check_seed(args.seed)
    if args.image_size is not None and (args.image_size < 4 or args.image_size % 4):
        raise CLIError(f"--image-size: expected a multiple of 4 (the U-Net halves the image twice), got {args.image_size}", 2)
    device = device_from(args.device)
    if args.checkpoint:
        trained = load_trained(args.checkpoint, device)
        network, estimator, spec = trained.network, trained.estimator, trained.spec
    else:
        estimator_name = args.estimator or "cmde"
        task = args.task or "sr"
        spec = ModelSpec(task, task_options(task, args, estimator_name), estimator_name, estimator_options(estimator_name, task, args, 1000),
                         "tiny", args.image_size or 32, 3)
        torch.manual_seed(args.seed)
        network, estimator = spec.network().to(device).eval(), spec.build_estimator()
    # Taken before minutes of timing: a busy --out or an existing bench.json fails at once.
    with output_folder(args.out, overwrite=args.overwrite) if args.out else contextlib.nullcontext() as out:
        if out is not None:
            out.check_new(["bench.json", "bench.md"])
        title, table, rows = _time_samplers(args, network, estimator, spec, device)
        print(title)
        print(table, end="")
        if out is not None:
            out.write_text("bench.json", json_text({"title": title, "command": _command_line(), "torch": torch.__version__,
                                                    "rows": [dict(zip(["sampler", "nfe", "seconds", "ms_per_image", "ms_per_nfe", "speedup"], row)) for row in rows]}))
            out.write_text("bench.md", f"# {title}\n\n`{_command_line()}`\n\n{table}")
    if args.out:
        print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")
    return 0


def _time_samplers(args: argparse.Namespace, network, estimator, spec: ModelSpec, device: torch.device):
    """(title, markdown table, rows) of the median time of every sampler of ``args`` on one batch."""
    reference = SamplerSpec("posterior", args.reference_nfe) if estimator.name == "mr" else SamplerSpec("pc", args.reference_nfe + args.reference_nfe % 2)
    runs = [SamplerSpec(name, nfe, args.order) for name in args.samplers for nfe in args.nfe] + [reference]
    for run in runs:
        run.check(estimator)
    size = spec.image_size
    condition = torch.rand(args.batch, spec.channels, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    rows, timings = [], {}
    restore_batch(network, estimator, condition, SamplerSpec("mr-ode", 1, 1), torch.Generator().manual_seed(0))  # warm-up
    for run in tqdm(runs, desc="bench", unit="sampler", disable=args.no_progress):
        seconds = []
        for repeat in range(args.repeats):
            _synchronize(device)
            started = time.perf_counter()
            restore_batch(network, estimator, condition, run, torch.Generator().manual_seed(args.seed + repeat))
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
        timings[(run.name, run.nfe)] = sorted(seconds)[len(seconds) // 2]
    reference_time = timings[(reference.name, reference.nfe)]
    for run in runs:
        median = timings[(run.name, run.nfe)]
        rows.append((run.label, run.nfe, median, 1000 * median / args.batch, 1000 * median / run.nfe, reference_time / median))
    header = ["sampler", "NFE", "seconds per batch", "ms per image", "ms per NFE", f"speed-up vs {reference.name} {reference.nfe}"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    title = (f"msdiff bench: {spec.estimator} {spec.preset} U-Net at {size}x{size}, batch {args.batch}, {device_name}, "
             f"median of {args.repeats}, {'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'random weights (timing only)'}")
    return title, markdown_table(header, rows), rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_benchmark_script(args: argparse.Namespace) -> int:
    folder = benchmarks_directory(args.benchmarks_dir)
    scripts = sorted(folder.glob("benchmark_*.py")) if folder.is_dir() else []
    if args.list:
        if not scripts:
            raise CLIError(f"no benchmark scripts in {folder}: they live in the source checkout's benchmarks/ folder; pass --benchmarks-dir")
        for script in scripts:
            print(script.stem[len("benchmark_"):])
        return 0
    name = args.script[len("benchmark_"):] if args.script.startswith("benchmark_") else args.script
    name = name[:-3] if name.endswith(".py") else name
    script = folder / f"benchmark_{name}.py"
    if not script.is_file():
        available = ", ".join(s.stem[len("benchmark_"):] for s in scripts) or "none found"
        raise CLIError(f"--script {args.script}: no {script} (available: {available}); see `msdiff bench --list`")
    extra = list(args.script_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call([sys.executable, str(script), *extra])


# ---------------------------------------------------------------------------- demo
def command_demo(args: argparse.Namespace) -> int:
    from .demo import DATA, DemoSettings, run_demo

    if args.data not in DATA:
        raise CLIError(f"--data: expected one of {', '.join(DATA)}, got {args.data!r}", 2)
    settings = DemoSettings.quick(args.data) if args.quick else DemoSettings.full(args.data)
    overrides = {name: getattr(args, name) for name in ("train_steps", "batch_size", "test_images", "pc_nfe", "posterior_nfe", "image_size", "seed") if getattr(args, name) is not None}
    if args.nfe is not None:
        overrides["nfe"] = tuple(args.nfe)
    try:
        settings = settings.replace(**overrides)
    except ValueError as err:
        raise CLIError(_one_line(err), 2) from None
    check_seed(settings.seed)
    device = device_from(args.device)
    with output_folder(args.out, overwrite_flag=None) as out:  # the demo writes each file once: it never replaces one
        out.check_new(DEMO_OUTPUTS)
        run_demo(settings, out.path, device, progress=not args.no_progress, command=_command_line())
    return 0


# what `msdiff demo` writes (besides runs/, which it refuses to reuse)
DEMO_OUTPUTS = ("report.md", "metrics.json", "samples.png", "nfe_curve.png")


# ---------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as CLIError, printed by main)."""

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')", 2)


def _add_common(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (keys: these flags' long names); flags given here win")
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=int, help=f"sr: upscaling factor (default {TASK_OPTION_DEFAULTS['scale']})")
    parser.add_argument("--upsample", choices=UPSAMPLING, help="sr: how the low-resolution condition is brought to the output size "
                        "(default: bicubic for --estimator mr, whose diffusion starts from it; nearest for the others, as the CMDE paper)")
    parser.add_argument("--hole-fraction", dest="hole_fraction", type=float, help=f"inpaint: hole area fraction (default {TASK_OPTION_DEFAULTS['hole_fraction']})")
    parser.add_argument("--noise-sigma", dest="noise_sigma", type=float, help=f"denoise: noise std on the 0-255 scale (default {TASK_OPTION_DEFAULTS['noise_sigma']:g})")
    parser.add_argument("--quality", type=int, help=f"jpeg: JPEG quality 1-100 (default {TASK_OPTION_DEFAULTS['quality']})")


def build_parser() -> argparse.ArgumentParser:
    tasks = "\n".join(f"  {task.name:<12} {task.summary}" for task in TASKS.values())
    parser = _Parser(
        prog=PROG,
        formatter_class=_HelpFormatter,
        description="Conditional score-based diffusion for image inverse problems, sampled in 5-20 network evaluations.",
        epilog=("start here:\n  msdiff demo --out demo_out        trains, samples and evaluates small models on a CPU (~15 min)\n\n"
                "a full round trip:\n  msdiff train --task sr --estimator cmde --steps 20000 --out runs/sr\n"
                "  msdiff sample --checkpoint runs/sr --input low_res/ --out restored/ --sampler mr-sde --nfe 10\n"
                "  msdiff evaluate --restored restored/ --reference high_res/ --task sr\n\n"
                "errors print one line; set MSDIFF_TRACEBACK=1 to see the traceback"),
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"msdiff_fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser("demo", formatter_class=_HelpFormatter, help="train, sample and evaluate three restoration models on a CPU; write a report",
                               description=("Trains a mean-reverting denoiser, a mean-reverting x2 super-resolution model and the paper's CMDE x2\n"
                                            "super-resolution model (tiny U-Net) on random patches of real photographs (scikit-image ships them;\n"
                                            "nothing is downloaded), restores whole photographs it never trained on with the fast MR Sampler\n"
                                            "(NFE 1/5/10/20) and the reference samplers (posterior sampling, predictor-corrector), evaluates\n"
                                            "them against the input (noisy image, bicubic upsampling) and writes to --out:\n"
                                            "  report.md     what was run, metrics table, timings, NFE and speed-up\n"
                                            "  metrics.json  every number of the report\n"
                                            "  samples.png   input / posterior mean / a fast sample / reference / ground truth, whole photographs\n"
                                            "  nfe_curve.png quality vs NFE per sampler\n"
                                            "  runs/         the checkpoints (msdiff sample --checkpoint runs/sr_mr ...)\n"
                                            "About 15 minutes on 2 CPU cores; --quick takes about a minute (tiny settings, for CI).\n"
                                            "Seeded: the same command on the same machine gives the same numbers."),
                               epilog="example:\n  msdiff demo --out demo_out\n  msdiff demo --quick --out /tmp/demo\n  msdiff demo --data synthetic --out demo_synthetic")
    demo.add_argument("--out", required=True, help="output directory (created if needed)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for CI: finite numbers, not meaningful quality")
    demo.add_argument("--data", default="photos", help="photos (scikit-image's photographs; pip install scikit-image) or synthetic (procedural images)")
    demo.add_argument("--train-steps", dest="train_steps", type=int, help="training steps per model (default: 800 photos, 1500 synthetic, 20 quick)")
    demo.add_argument("--batch-size", dest="batch_size", type=int, help="training batch (default: 16 full, 4 quick)")
    demo.add_argument("--image-size", dest="image_size", type=int, help="training patch and tile size, a multiple of 4 (default: 32 photos, 16 synthetic and quick)")
    demo.add_argument("--test-images", dest="test_images", type=int, help="held-out images to restore (photos: at most 2; synthetic default 16)")
    demo.add_argument("--nfe", type=int, nargs="+", help="NFEs of the fast samplers (default: 1 5 10 20; 1 is the posterior mean)")
    demo.add_argument("--pc-nfe", dest="pc_nfe", type=int, help="NFE of predictor-corrector (usual and full default: 2000; quick 10)")
    demo.add_argument("--posterior-nfe", dest="posterior_nfe", type=int, help="NFE of posterior sampling (usual and full default: 100; quick 5)")
    demo.add_argument("--seed", type=int, help="seed of data, training and sampling (default 0)")
    _add_common(demo)
    demo.set_defaults(handler=command_demo)

    train = commands.add_parser("train", formatter_class=_HelpFormatter, help="train a conditional diffusion model",
                                description=("Trains a conditional score model (or a mean-reverting model) for one task and writes\n"
                                             "atomic checkpoints to OUT/checkpoints (EMA weights are what `msdiff sample` uses).\n"
                                             "Data: a folder of images (--data; random crops of --image-size) or, by default, synthetic\n"
                                             "images that need no download. The condition y is made on the fly by the task's degradation.\n\n"
                                             f"tasks:\n{tasks}\n\n"
                                             "estimators:\n  cde     clean condition (Batzolis et al.)\n  cdiffe  condition diffused like x\n"
                                             "  cmde    condition diffused at its own, slower speed (--sigma-y)\n  vscmde  cmde whose sigma_y falls during training\n"
                                             "  mr      mean-reverting diffusion towards the degraded image (IR-SDE / DA-CLIP style)"),
                                epilog=("examples:\n  msdiff train --task sr --scale 4 --estimator cmde --steps 20000 --out runs/sr4\n"
                                        "  msdiff train --task denoise --estimator mr --data photos/ --image-size 64 --out runs/dn\n"
                                        "  msdiff train --out runs/sr4 --resume --steps 40000     # continue a run (its settings are kept)"))
    train.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, previews/")
    train.add_argument("--task", choices=sorted(TASKS), help="inverse problem (default sr)")
    _add_task_options(train)
    train.add_argument("--estimator", choices=ESTIMATOR_NAMES, help="conditional score estimator (default cmde)")
    train.add_argument("--sigma-y", dest="sigma_y", type=float, help="cmde: sigma_y_max; vscmde: its final value (default 0.5 for sr, 1 otherwise)")
    train.add_argument("--vs-target-step", dest="vs_target_step", type=int, help="vscmde: step at which sigma_y reaches --sigma-y (default steps/2)")
    train.add_argument("--sigma-data", dest="sigma_data", type=float,
                       help="cde/cdiffe/cmde/vscmde: EDM preconditioning of x with this data std (0.5 suits images in [0, 1]); "
                            "far faster to train than the paper's plain noise prediction (default: none, as the paper)")
    train.add_argument("--mr-sigma", dest="mr_sigma", type=float, help="mr: stationary noise std on the 0-255 scale (default 50, as DA-CLIP)")
    train.add_argument("--mr-target", dest="mr_target", choices=("residual", "data", "noise", "velocity"),
                       help="mr: what the network predicts. residual (default): the clean image minus mu, so an untrained network "
                            "already restores to mu and training learns the correction; data: the clean image; noise: as IR-SDE / "
                            "DA-CLIP, which needs far longer training (a warning says why)")
    train.add_argument("--preset", help="U-Net preset: tiny, edges2shoes_64, celeba_inpaint_128, celeba_sr_x8_160 (default tiny)")
    train.add_argument("--image-size", dest="image_size", type=int, help="training image size (default: the preset's)")
    train.add_argument("--channels", type=int, choices=(1, 3), help="1 grey or 3 RGB (default 3)")
    train.add_argument("--data", help="training images: synthetic (made here, the default), photos (scikit-image's photographs: "
                       "pip install scikit-image) or a folder; photos and folders give random patches of --image-size at the "
                       "images' own resolution")
    train.add_argument("--data-resize", dest="data_resize", action="store_true",
                       help="folder: resize each image so its shorter side is --image-size before cropping (for data meant to be seen "
                            "whole, e.g. aligned faces); restoration models want the default native-resolution patches")
    train.add_argument("--downscale", type=int, default=4, help="photos: average DxD pixel blocks first (the demo's scale)")
    train.add_argument("--synthetic-count", dest="synthetic_count", type=int, default=4096, help="number of synthetic images when --data is not given")
    train.add_argument("--steps", type=int, default=10000, help="total optimizer steps (a resumed run continues up to this)")
    train.add_argument("--batch-size", dest="batch_size", type=int, help="batch size (default 16)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    train.add_argument("--warmup", type=int, help="linear warm-up steps (default 100)")
    train.add_argument("--lr-schedule", dest="lr_schedule", choices=("constant", "cosine"), help="after the warm-up: constant, or a cosine decay to 0 at --steps (default constant)")
    train.add_argument("--grad-clip", dest="grad_clip", type=float, help="gradient-norm clip (default 1)")
    train.add_argument("--ema-decay", dest="ema_decay", type=float, help="EMA decay (default 0.999, warmed up)")
    train.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision (default none; fp16 needs a GPU; bf16 "
                       "autocast trains the demo's models 1.6x faster on this CPU family at the same quality)")
    train.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the network (the first step compiles for minutes on a CPU; default off)")
    train.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                       help="train in channels-last memory format (default off; dropout masks then differ from a standard-layout run)")
    train.add_argument("--optimizer-impl", dest="optimizer_impl", choices=("auto", "fused", "foreach", "for"),
                       help="Adam's implementation (default auto: fused on CPU and CUDA)")
    train.add_argument("--seed", type=int, help="seed of data and training (default 0)")
    train.add_argument("--log-every", dest="log_every", type=int, default=50, help="steps between metrics.jsonl lines")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=1000, help="steps between checkpoints (0: only at the end)")
    train.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    train.add_argument("--preview-every", dest="preview_every", type=int, default=0, help="steps between preview grids in OUT/previews (0: none)")
    train.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    _add_common(train)
    train.set_defaults(handler=command_train)

    sample = commands.add_parser("sample", formatter_class=_HelpFormatter, help="restore a folder of degraded images with a trained model",
                                 description=("Restores every image under --input with a checkpoint of `msdiff train` and writes PNGs with the\n"
                                              "same relative names under --out. Images larger than the training size are restored in\n"
                                              "overlapping tiles of the training size, blended with a smooth window; smaller ones are padded.\n"
                                              "For sr the inputs are the low-resolution images (upsampled by --scale here).\n"
                                              "--out must be apart from --input (not it, not inside it, not holding it); an existing file is\n"
                                              "never replaced without --overwrite, two names of one image (a.png, a.jpg) are refused before any\n"
                                              "work, and a second run into the same --out fails while the first one writes there.\n\n"
                                              "samplers (NFE = network evaluations per image):\n"
                                              "  mr-sde     MR Sampler, reverse SDE, order 1-2 (fast; 5-20 NFE)\n"
                                              "  mr-ode     MR Sampler, probability-flow ODE, order 1-3 (fast, deterministic given x_T)\n"
                                              "  posterior  posterior sampling of IR-SDE / DA-CLIP (reference for mr models; usually 100)\n"
                                              "  pc         predictor-corrector (reference for VE models; usually 2000 = 1000 steps x 2)\n"
                                              "  euler      Euler-Maruyama on the reverse SDE"),
                                 epilog=("examples:\n  msdiff sample --checkpoint runs/sr --input low_res/ --out restored/ --nfe 10\n"
                                         "  msdiff sample --checkpoint runs/dn --input noisy/ --out clean/ --sampler posterior --nfe 100\n"
                                         "  msdiff sample --checkpoint runs/sr --input lr/ --out many/ --num-samples 5   # many/sample_0..4"))
    sample.add_argument("--checkpoint", required=True, help="run directory of `msdiff train` (its latest checkpoint) or a checkpoints/step_* directory")
    sample.add_argument("--input", required=True, help="folder of degraded images (searched recursively)")
    sample.add_argument("--out", required=True, help="folder for the restored PNGs")
    sample.add_argument("--sampler", choices=SAMPLERS, default="mr-sde", help="sampler")
    sample.add_argument("--nfe", type=int, default=10, help="network evaluations per image (pc: 2 per step)")
    sample.add_argument("--order", type=int, default=2, help="mr-sde: 1-2, mr-ode: 1-3")
    sample.add_argument("--prediction", choices=("data", "noise"), default="data", help="mr-*: solve for the data or the noise prediction")
    sample.add_argument("--timesteps", choices=TIMESTEPS, default="uniform_lambda", help="mr-*: time grid")
    sample.add_argument("--conditioning", choices=("fresh", "clean", "consistent"), help="cdiffe/cmde/vscmde: how the condition is diffused at each call (default fresh; cde, mr: clean)")
    sample.add_argument("--task", choices=sorted(TASKS), help="check that the checkpoint was trained for this task")
    sample.add_argument("--inputs-upsampled", dest="inputs_upsampled", action="store_true", help="sr: the inputs are already at the output size")
    sample.add_argument("--batch", type=int, default=16, help="tiles restored together")
    sample.add_argument("--overlap", type=int, help="tile overlap in pixels (default: a quarter of the tile)")
    sample.add_argument("--num-samples", dest="num_samples", type=int, default=1, help="samples per image; > 1 writes OUT/sample_K/")
    sample.add_argument("--raw-weights", dest="raw_weights", action="store_true", help="use the raw weights instead of the EMA ones")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed")
    sample.add_argument("--multistep", choices=("heun", "midpoint"), default="heun",
                        help="mr-*: form of the second-order steps: heun (the MR Sampler code's) or midpoint (DPM-Solver++(2M)'s)")
    sample.add_argument("--loop", choices=("eager", "static", "graph"), default="static",
                        help="mr-*: static precomputes every coefficient and checks for divergence once at the end (same output as eager); "
                             "graph also captures the loop as one CUDA graph (CUDA only); eager checks every step")
    sample.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast (where the CPU/GPU has bfloat16 arithmetic)")
    sample.add_argument("--compile", action="store_true",
                        help="torch.compile the network (the first call compiles for minutes on a CPU; later runs reuse the on-disk cache)")
    sample.add_argument("--no-channels-last", dest="no_channels_last", action="store_true",
                        help="keep the network in the standard memory format (channels-last is faster and gives the same output)")
    sample.add_argument("--overwrite", action="store_true", help="replace restored images that already exist in --out (default: refuse before any work)")
    _add_common(sample)
    sample.set_defaults(handler=command_sample)

    evaluate = commands.add_parser("evaluate", formatter_class=_HelpFormatter, help="metrics of restored images against the ground truth",
                                   description=("PSNR and SSIM (0-255 scale, as the paper), consistency PSNR(A(x_hat), A(x)) for tasks with a\n"
                                                "forward operator A (sr, blur, edges; inpaint with --degraded), diversity when --restored holds\n"
                                                "sample_K/ folders, LPIPS (--lpips-weights) and FID (--inception; --small-fid for a quick,\n"
                                                "non-comparable FID). Files are matched by relative name without extension (two files of one\n"
                                                "name, e.g. img0.png and img0.jpg, are refused).\n"
                                                "Writes metrics.json and metrics.md to --out (default: the --restored folder)."),
                                   epilog=("example:\n  msdiff evaluate --restored restored/ --reference high_res/ --task sr --scale 4\n"
                                           "  msdiff evaluate --restored many/ --reference truth/ --lpips-weights weights/ --inception weights/pt_inception-2015-12-05-6726825d.pth"))
    evaluate.add_argument("--restored", required=True, help="folder of restored images (or of sample_K/ folders)")
    evaluate.add_argument("--reference", required=True, help="folder of ground-truth images")
    evaluate.add_argument("--degraded", help="folder of the degraded inputs (inpaint: gives the holes)")
    evaluate.add_argument("--task", choices=sorted(TASKS), help="task, for the consistency metric")
    _add_task_options(evaluate)
    evaluate.add_argument("--channels", type=int, choices=(1, 3), default=3, help="read images as grey (1) or RGB (3)")
    evaluate.add_argument("--lpips-weights", dest="lpips_weights", help="directory with alexnet-owt-7be5be79.pth and LPIPS alex.pth (never downloaded)")
    evaluate.add_argument("--inception", metavar="FILE", help="weights of the FID Inception-v3 as a state dict (pytorch-fid's "
                          "pt_inception-2015-12-05-6726825d.pth, or .safetensors), read as data only; for FID (never downloaded)")
    evaluate.add_argument("--inception-torchscript", dest="inception_torchscript", metavar="FILE",
                          help="NVIDIA's inception-2015-12-05.pt TorchScript file instead: runs code from FILE, only for files you trust")
    evaluate.add_argument("--small-fid", dest="small_fid", action="store_true", help="also an FID with a small random network (only to compare runs here)")
    evaluate.add_argument("--out", help="folder for metrics.json and metrics.md (default: --restored)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace metrics.json and metrics.md if they exist (default: refuse)")
    _add_common(evaluate, device=False)
    evaluate.set_defaults(handler=command_evaluate)

    bench = commands.add_parser("bench", formatter_class=_HelpFormatter, help="sampler speed (NFE vs time) or the benchmarks/ scripts",
                                description=("Without --script: times the samplers on one batch (a checkpoint, or a tiny U-Net with random\n"
                                             "weights: the time of a sampler does not depend on what the network learned) and prints\n"
                                             "NFE, time and speed-up against the reference sampler (pc for VE models, posterior for mr).\n"
                                             "With --script NAME: runs benchmarks/benchmark_NAME.py, passing on the arguments after --."),
                                epilog=("examples:\n  msdiff bench --nfe 5 10 20 --batch 16\n  msdiff bench --checkpoint runs/dn --out bench_out\n"
                                        "  msdiff bench --list\n  msdiff bench --script ops -- --sizes 1024 65536"))
    bench.add_argument("--checkpoint", help="a `msdiff train` run or checkpoint (default: random tiny U-Net)")
    bench.add_argument("--task", choices=sorted(TASKS), help="without --checkpoint: task of the random model (default sr)")
    _add_task_options(bench)
    bench.add_argument("--estimator", choices=ESTIMATOR_NAMES, help="without --checkpoint: estimator of the random model (default cmde)")
    bench.add_argument("--image-size", dest="image_size", type=int, help="without --checkpoint: image size (default 32)")
    bench.add_argument("--samplers", nargs="+", choices=("mr-sde", "mr-ode", "euler"), default=["mr-sde", "mr-ode"], help="fast samplers to time")
    bench.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20], help="NFEs of the fast samplers")
    bench.add_argument("--order", type=int, default=2, help="MR Sampler order")
    bench.add_argument("--reference-nfe", dest="reference_nfe", type=int, default=100, help="NFE of the reference sampler (its usual: pc 2000, posterior 100)")
    bench.add_argument("--batch", type=int, default=8, help="images per batch")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    bench.add_argument("--seed", type=int, default=0, help="seed")
    bench.add_argument("--out", help="also write bench.json and bench.md here")
    bench.add_argument("--overwrite", action="store_true", help="replace bench.json and bench.md in --out if they exist (default: refuse)")
    bench.add_argument("--script", help="run benchmarks/benchmark_SCRIPT.py instead")
    bench.add_argument("--list", action="store_true", help="list the benchmark scripts")
    bench.add_argument("--benchmarks-dir", dest="benchmarks_dir", help="folder of benchmark scripts (default: the checkout's benchmarks/)")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for --script, after --")
    _add_common(bench)
    bench.set_defaults(handler=command_bench)
    return parser


# ---------------------------------------------------------------------------- config files
def load_config(path: str, command: str) -> Dict:
    """Settings for ``command`` from a JSON or TOML file: its [command] table, else its top level."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--config {file}: no such file")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"--config {file}: cannot read it ({_one_line(err)})") from None
    if file.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:
            raise CLIError(f"--config {file}: TOML needs Python 3.11+ (tomllib); write the settings as JSON instead") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise CLIError(f"--config {file}: invalid TOML ({_one_line(err)})") from None
    elif file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CLIError(f"--config {file}: invalid JSON ({_one_line(err)})") from None
    else:
        raise CLIError(f"--config {file}: expected a .json or .toml file")
    if not isinstance(data, dict):
        raise CLIError(f"--config {file}: expected a table of settings, got {type(data).__name__}")
    section = data.get(command)
    if isinstance(section, dict):
        return section
    return {key: value for key, value in data.items() if not (isinstance(value, dict) and key in ("demo", "train", "sample", "evaluate", "bench"))}


def config_arguments(settings: Dict, subparser: argparse.ArgumentParser, source: str) -> List[str]:
    """Command-line tokens equivalent to ``settings`` (placed before the user's flags, which win)."""
    actions = {}
    for action in subparser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:].replace("-", "_")] = (option, action)
    tokens: List[str] = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name in ("config", "help") or name not in actions:
            valid = ", ".join(sorted(k.replace("_", "-") for k in actions if k not in ("config", "help")))
            raise CLIError(f"--config {source}: unknown setting {key!r} for `msdiff {subparser.prog.split()[-1]}` (valid: {valid})", 2)
        option, action = actions[name]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise CLIError(f"--config {source}: {key} expects true or false, got {value!r}", 2)
            tokens += [option] if value else []
        elif isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise CLIError(f"--config {source}: {key} expects one value, got a list {value!r}", 2)
            tokens += [option, *map(str, value)]
        elif isinstance(value, (dict, bool)) or value is None:
            raise CLIError(f"--config {source}: {key} expects a {'list' if action.nargs in ('+', '*') else 'number or string'}, got {value!r}", 2)
        else:
            tokens += [option, *([str(value)] if action.nargs not in ("+", "*") else [str(value)])]
    return tokens


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise CLIError("choose a command: demo, train, sample, evaluate or bench (start with `msdiff demo --out demo_out`)", 2)
    if getattr(args, "config", None):
        subparser = parser._subparsers._group_actions[0].choices[args.command]
        tokens = config_arguments(load_config(args.config, args.command), subparser, args.config)
        position = list(argv).index(args.command)
        args = parser.parse_args([*argv[: position + 1], *tokens, *argv[position + 1:]])
    return args


# ---------------------------------------------------------------------------- entry point
def _command_line() -> str:
    return " ".join([PROG, *sys.argv[1:]]) if sys.argv and sys.argv[0] else PROG


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
    from .training.checkpoint import atomic_write

    text = json_text(data).encode()
    atomic_write(path, lambda handle: handle.write(text))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``msdiff`` with ``argv`` (default: sys.argv[1:]); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = os.environ.get("MSDIFF_TRACEBACK", "") not in ("", "0")
    try:
        args = parse_arguments(argv)
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except CLIError as err:
        if show_traceback:
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return err.code
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as err:
        # The library's input checks raise ValueError / TypeError with a message that names the
        # argument; files raise OSError; a diverging sampler raises FloatingPointError.
        if show_traceback:
            raise
        print(f"{PROG}: error: {_one_line(err)} (set MSDIFF_TRACEBACK=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # python -m msdiff_fast.cli, e.g. under torchrun
    sys.exit(main())
