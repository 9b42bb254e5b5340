"""Real photographs without a download: the ones scikit-image ships inside its wheel.

The demo trains on random patches of ``TRAINING_PHOTOS`` and evaluates on ``HELD_OUT_PHOTOS``,
which it never trains on. Grey photographs are repeated to three channels for colour models.
``downscale`` averages factor x factor blocks (a box filter: no ringing, noise and JPEG
artefacts of the originals shrink with it), so whole photographs become small enough to restore
on a CPU in seconds; the patches are then cut from those at their own resolution.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

# Colour photographs first; the grey ones add texture (bricks, grass, gravel) and structure.
TRAINING_PHOTOS = (
    "astronaut",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "camera",
    "clock",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
)
HELD_OUT_PHOTOS = ("chelsea", "coffee")


def _skimage_data():
    try:
        from skimage import data
    except ImportError:
        raise ImportError(
            "the real photographs come from scikit-image: pip install scikit-image "
            "(or msdiff_fast[demo]); `--data synthetic` needs nothing"
        ) from None
    return data


def available_photos() -> List[str]:
    """Every name this module can load (both lists above)."""
    return list(TRAINING_PHOTOS) + list(HELD_OUT_PHOTOS)


def load_photo(name: str, channels: int = 3, downscale: int = 1) -> torch.Tensor:
    """Photograph ``name`` as uint8 [channels, H // downscale, W // downscale]."""
    if name not in available_photos():
        raise ValueError(f"name: expected one of {', '.join(available_photos())}, got {name!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1:
        raise ValueError(f"downscale: expected an int >= 1, got {downscale!r}")
    pixels = np.asarray(getattr(_skimage_data(), name)(), dtype=np.float64)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    pixels = pixels[..., :3]
    if channels == 1 and pixels.shape[-1] == 3:
        pixels = pixels @ np.array([0.299, 0.587, 0.114])[:, None]
    elif channels == 3 and pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    height, width = (pixels.shape[0] // downscale) * downscale, (pixels.shape[1] // downscale) * downscale
    blocks = pixels[:height, :width].reshape(height // downscale, downscale, width // downscale, downscale, -1)
    pixels = np.clip(np.rint(blocks.mean(axis=(1, 3))), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_photos(names: Sequence[str], channels: int = 3, downscale: int = 1) -> Dict[str, torch.Tensor]:
    """``load_photo`` of each name, in order."""
    return {name: load_photo(name, channels, downscale) for name in names}
