"""Where ``msdiff train --data`` takes its clean images from: synthetic images (the default),
scikit-image's photographs, or a folder."""

from pathlib import Path
from typing import Optional

from ..errors import UsageError, one_line
from .data import ImageFolder, ImagePatches, SyntheticImages
from .photos import TRAINING_PHOTOS, load_photos

DATA_SOURCES = ("synthetic", "photos")


def training_images(data: Optional[str], spec, seed: int, synthetic_count: int = 4096, resize: bool = False, downscale: int = 4):
    """The clean training images of ``--data`` at ``spec.image_size`` with ``spec.channels``:
    synthetic (the default), photos (scikit-image's photographs, downscaled, random patches at
    their own resolution) or a folder (random patches)."""
    if data is None or data == "synthetic":
        return SyntheticImages(synthetic_count, spec.image_size, spec.channels, seed=seed)
    if data in DATA_SOURCES and Path(data).exists():
        raise UsageError(
            f"--data {data}: ambiguous, it names both a data source and a folder here; write ./{data} for the folder", 2
        )
    if downscale < 1:
        raise UsageError(f"--downscale: expected an integer >= 1, got {downscale}", 2)
    if data == "photos":
        try:
            photos = load_photos(TRAINING_PHOTOS, spec.channels, downscale)
        except ImportError as err:
            raise UsageError(f"--data photos: {one_line(err)}") from None
        return ImagePatches(list(photos.values()), spec.image_size, "random", patches_per_image=64)
    try:
        return ImageFolder(data, size=spec.image_size, crop="random", channels=spec.channels, resize=resize)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data: {one_line(err)}") from None


def describe_data(data: Optional[str], synthetic_count: int, downscale: int) -> str:
    if data is None or data == "synthetic":
        return f"{synthetic_count} synthetic images"
    if data == "photos":
        return f"scikit-image's training photographs (downscaled {downscale}x)"
    return f"images in {data}"
