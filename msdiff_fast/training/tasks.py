"""The inverse problems the ``msdiff`` command knows: which degradation makes the condition y from
a clean image, with which options, and the forward operator its consistency metric uses."""

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ..errors import UsageError
from .degradations import make_degradation

# An option's default; None for upsample: it depends on the estimator (``default_upsampling``).
TASK_OPTION_DEFAULTS = {"scale": 2, "upsample": None, "hole_fraction": 0.25, "noise_sigma": 25.0, "quality": 10}
UPSAMPLING = ("nearest", "bicubic")


@dataclass(frozen=True)
class Task:
    """An inverse problem: how the condition y is made from a clean image x, and its options."""

    name: str
    summary: str
    options: Tuple[str, ...]  # the task's entries of ``TASK_OPTION_DEFAULTS``
    default_sigma_y: float  # CMDE / VS-CMDE sigma_y_max (the paper: 0.5 for SR, 1 otherwise)

    def degradation(self, options: Mapping):
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
        Task(
            "sr",
            "super-resolution by --scale (the condition is the low-resolution image upsampled by --upsample)",
            ("scale", "upsample"),
            0.5,
        ),
        Task("inpaint", "fill a square hole covering --hole-fraction of the image", ("hole_fraction",), 1.0),
        Task("edges", "image from its Canny edge map (black edges on white)", (), 1.0),
        Task("denoise", "remove white Gaussian noise of --noise-sigma (0-255 scale)", ("noise_sigma",), 1.0),
        Task("blur", "remove a Gaussian blur (kernel 9, sigma 2)", (), 1.0),
        Task("motion_blur", "remove a linear motion blur of 9 pixels at a random angle", (), 1.0),
        Task("lowlight", "brighten a dark, noisy image", (), 1.0),
        Task("jpeg", "remove JPEG artefacts of --quality", ("quality",), 1.0),
    )
}


def default_upsampling(estimator: Optional[str]) -> str:
    """How an sr condition is brought to the output size: nearest for the VE estimators (as the
    CMDE paper), bicubic for mean-reverting models, whose condition mu is where the diffusion
    starts (IR-SDE): the closer mu is to the image, the less the network has to correct."""
    return "bicubic" if estimator == "mr" else "nearest"


def task_options(task: str, given: Mapping, estimator: Optional[str] = None) -> Dict:
    """The options of ``task`` from ``given`` (option name -> value; None or absent: the default), checked."""
    options = {}
    for name in TASKS[task].options:
        value = given.get(name)
        options[name] = TASK_OPTION_DEFAULTS[name] if value is None else value
    if "upsample" in options and options["upsample"] is None:
        options["upsample"] = default_upsampling(estimator)
    if "scale" in options and options["scale"] < 1:
        raise UsageError(f"--scale: expected an integer >= 1, got {options['scale']}", 2)
    if "hole_fraction" in options and not 0 < options["hole_fraction"] < 1:
        raise UsageError(f"--hole-fraction: expected a number in (0, 1), got {options['hole_fraction']}", 2)
    if "noise_sigma" in options and not options["noise_sigma"] > 0:
        raise UsageError(f"--noise-sigma: expected a positive number (0-255 scale), got {options['noise_sigma']}", 2)
    if "quality" in options and not 1 <= options["quality"] <= 100:
        raise UsageError(f"--quality: expected an integer in 1..100, got {options['quality']}", 2)
    return options


def consistency_operator(task: str, options: Dict, mask: Optional[torch.Tensor] = None) -> Optional[Callable]:
    """The forward operator A of the consistency metric PSNR(A(x_hat), A(x)), or None when the
    task has none (noise, JPEG, low light, motion blur: random or not invertible in a useful sense).
    Inpainting needs the hole ``mask`` [B, 1, H, W] (1 = observed)."""
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


def upsample_condition(low_resolution: torch.Tensor, scale: int, mode: str = "nearest") -> torch.Tensor:
    """The SR condition from a low-resolution image [C, h, w], upsampled as in training."""
    if mode == "nearest":
        return low_resolution.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    size = (low_resolution.shape[-2] * scale, low_resolution.shape[-1] * scale)
    return torch.nn.functional.interpolate(low_resolution[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
