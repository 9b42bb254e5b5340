"""Score networks: the DDPM U-Net of score_sde / Batzolis et al. and its presets, and the fast path."""

from .fast import FastNetwork, bf16_unsupported
from .unet import PRESETS, UNet, unet_preset

__all__ = ["FastNetwork", "UNet", "bf16_unsupported", "unet_preset", "PRESETS"]
