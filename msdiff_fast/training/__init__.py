"""Training data: data sets, image I/O and the degradations that make the condition y."""

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import TrainConfig
from .data import (
    IMAGE_EXTENSIONS,
    ConditionalPairs,
    ImageFolder,
    PairedFolders,
    SyntheticImages,
    check_images,
    item_seed,
    read_image,
    save_grid,
    write_image,
)
from .degradations import (
    DEGRADATIONS,
    JPEG,
    Edges,
    GaussianBlur,
    GaussianNoise,
    Inpainting,
    LowLight,
    MotionBlur,
    SuperResolution,
    make_degradation,
)
from .trainer import Trainer, train

__all__ = [
    "IMAGE_EXTENSIONS",
    "ConditionalPairs",
    "ImageFolder",
    "PairedFolders",
    "SyntheticImages",
    "check_images",
    "item_seed",
    "read_image",
    "save_grid",
    "write_image",
    "DEGRADATIONS",
    "JPEG",
    "Edges",
    "GaussianBlur",
    "GaussianNoise",
    "Inpainting",
    "LowLight",
    "MotionBlur",
    "SuperResolution",
    "make_degradation",
    "latest_checkpoint",
    "load_checkpoint",
    "TrainConfig",
    "Trainer",
    "train",
]
