"""Score networks: the DDPM U-Net of score_sde / Batzolis et al. and its presets."""
from .unet import PRESETS, UNet, unet_preset

__all__ = ["UNet", "unet_preset", "PRESETS"]
