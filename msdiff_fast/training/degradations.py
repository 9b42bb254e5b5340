"""Degradation operators: how the condition y is made from a clean batch x (cmde.md section 4).

Every degradation is called as ``deg(x, generator=None)`` on a batch x [B, C, H, W] in [0, 1]
and returns y with the same shape (so cat(x, y) can feed the network), clamped to [0, 1].
All randomness comes from the given torch.Generator (the global torch RNG when None), so a
seeded generator reproduces y exactly. ``operator(x)`` is the deterministic forward operator
A used by ``msdiff_fast.metrics.consistency``; it exists only where the task has one.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import check_images

Range = Union[float, Tuple[float, float]]


def _per_image(value: Range, batch: int, generator, device) -> torch.Tensor:
    """A float64 tensor [B]: ``value`` repeated, or uniform draws in [lo, hi] for a pair."""
    if isinstance(value, (tuple, list)):
        lo, hi = float(value[0]), float(value[1])
        gen_device = generator.device if generator is not None else "cpu"
        u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
        return (lo + (hi - lo) * u).to(device)
    return torch.full((batch,), float(value), dtype=torch.float64, device=device)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    # Draw on the generator's device so CPU generators also work for CUDA batches.
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def _filter_per_image(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve image b of x with kernels[b] ([B, k, k], odd k) on every channel, edge-replicated."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0)[:, None]  # [B*C, 1, k, k]
    padded = F.pad(x.reshape(1, b * c, h, w), (k // 2,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


class SuperResolution:
    """Downsample by ``factor``, then upsample back (the paper feeds nearest-upsampled LR)."""

    name = "sr"

    def __init__(self, factor: int, up: str = "nearest", down: str = "bicubic"):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor: expected a positive integer, got {factor!r}")
        if up not in ("nearest", "bicubic") or down not in ("bicubic", "area"):
            raise ValueError(f"up/down: expected 'nearest'|'bicubic' / 'bicubic'|'area', got {up!r}/{down!r}")
        self.factor, self.up, self.down = int(factor), up, down

    def operator(self, x: torch.Tensor) -> torch.Tensor:
        """The downsampling alone: [B, C, H, W] -> [B, C, H/factor, W/factor]."""
        check_images(x, "x")
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"x: expected H and W divisible by factor {self.factor}, got {h}x{w}")
        if self.down == "area":
            return F.avg_pool2d(x, self.factor)
        small = F.interpolate(x, size=(h // self.factor, w // self.factor), mode="bicubic", align_corners=False, antialias=True)
        return small.clamp(0, 1)  # bicubic overshoots at sharp edges

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        small = self.operator(x)
        if self.up == "nearest":  # exact pixel replication, so operator(y) == small for area down
            return small.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)
        return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


class Inpainting:
    """Fill a random square hole (or random pixels) covering ``hole_fraction`` of each image.

    Masks are [B, 1, H, W] float with 1 = observed, 0 = hole. ``operator(x, mask)`` applies a
    given mask; without one it reuses the mask of the latest call (for the consistency metric).
    """

    name = "inpaint"

    def __init__(self, hole_fraction: float = 0.25, kind: str = "square", fill: float = 0.0):
        if not 0.0 <= hole_fraction < 1.0:
            raise ValueError(f"hole_fraction: expected a value in [0, 1), got {hole_fraction}")
        if kind not in ("square", "pixels"):
            raise ValueError(f"kind: expected 'square' or 'pixels', got {kind!r}")
        self.hole_fraction, self.kind, self.fill = hole_fraction, kind, float(fill)
        self.last_mask: Optional[torch.Tensor] = None

    def sample_mask(self, batch: int, height: int, width: int, generator=None, device="cpu") -> torch.Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        n_hole = round(self.hole_fraction * height * width)
        if self.kind == "pixels":  # exactly n_hole dropped pixels per image
            order = torch.rand(batch, height * width, generator=generator, device=gen_device).argsort(dim=1)
            hole = torch.zeros(batch, height * width, dtype=torch.bool, device=gen_device)
            hole.scatter_(1, order[:, :n_hole], True)
            return (~hole).float().reshape(batch, 1, height, width).to(device)
        side = round(math.sqrt(n_hole))
        if side > min(height, width):
            raise ValueError(f"hole_fraction {self.hole_fraction}: a square hole of side {side} does not fit in {height}x{width}")
        top = torch.randint(0, height - side + 1, (batch, 1), generator=generator, device=gen_device)
        left = torch.randint(0, width - side + 1, (batch, 1), generator=generator, device=gen_device)
        rows, cols = torch.arange(height, device=gen_device), torch.arange(width, device=gen_device)
        in_rows = (rows >= top) & (rows < top + side)  # [B, H]
        in_cols = (cols >= left) & (cols < left + side)  # [B, W]
        hole = in_rows[:, :, None] & in_cols[:, None, :]
        return (~hole).float()[:, None].to(device)

    def operator(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_images(x, "x")
        if mask is None:
            if self.last_mask is None:
                raise ValueError("Inpainting.operator: no mask given and none drawn yet")
            mask = self.last_mask
        if mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"mask: expected [{x.shape[0]}, 1, {x.shape[2]}, {x.shape[3]}], got {tuple(mask.shape)}")
        mask = mask.to(device=x.device, dtype=x.dtype)
        return x * mask + self.fill * (1 - mask)

    def masked(self, x: torch.Tensor, generator=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(y, mask) for a fresh random mask per image."""
        check_images(x, "x")
        b, _, h, w = x.shape
        self.last_mask = self.sample_mask(b, h, w, generator, x.device)
        return self.operator(x, self.last_mask), self.last_mask

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        return self.masked(x, generator)[0]


class Edges:
    """Canny edge map, black edges (0) on white (1) like edges2shoes, repeated to C channels.

    ``low``/``high`` are absolute thresholds on the Sobel magnitude of the smoothed grey image
    in [0, 1] (scikit-image's convention and defaults: a step of contrast c smoothed with
    sigma=1 peaks at about 3.2 c, so 0.2 keeps steps above ~0.06). ``relative=True`` makes them
    fractions of each image's largest magnitude instead.
    """

    name = "edges"

    def __init__(self, low: float = 0.1, high: float = 0.2, sigma: float = 1.0, relative: bool = False):
        if not 0 <= low <= high:
            raise ValueError(f"thresholds: expected 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high, self.sigma, self.relative = low, high, sigma, relative

    def edge_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, H, W], True on edge pixels."""
        check_images(x, "x")
        gray = (
            x.mean(1, keepdim=True)
            if x.shape[1] != 3
            else (x * x.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        )
        if self.sigma > 0:  # separable Gaussian smoothing
            radius = max(1, math.ceil(3 * self.sigma))
            taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * self.sigma**2))
            taps = taps / taps.sum()
            gray = F.conv2d(F.pad(gray, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
            gray = F.conv2d(F.pad(gray, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))
        sobel_x = x.new_tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
        gx = F.conv2d(padded, sobel_x.view(1, 1, 3, 3))
        gy = F.conv2d(padded, sobel_x.t().reshape(1, 1, 3, 3))  # rows grow downwards
        magnitude = torch.hypot(gx, gy)
        # Non-maximum suppression: keep pixels that beat both neighbours along the gradient,
        # quantised to 0/45/90/135 degrees. Beating the forward neighbour by a margin and not
        # losing to the backward one keeps one pixel of a two-pixel tie and none on flat ramps
        # (whose equal magnitudes differ only by rounding).
        angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
        sector = (((angle + 22.5) // 45) % 4).long()  # 0: horizontal gradient, 2: vertical
        padded_mag = F.pad(magnitude, (1, 1, 1, 1))
        h, w = magnitude.shape[-2:]

        def shifted(dr, dc):  # magnitude of the neighbour at (r + dr, c + dc)
            return padded_mag[..., 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]

        keep = torch.zeros_like(magnitude, dtype=torch.bool)
        for s, (dr, dc) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
            is_max = (magnitude > shifted(dr, dc) + 1e-5) & (magnitude >= shifted(-dr, -dc) - 1e-5)
            keep |= (sector == s) & is_max
        thin = magnitude * keep
        scale = magnitude.amax(dim=(1, 2, 3), keepdim=True) if self.relative else 1.0
        strong, weak = thin >= self.high * scale, thin >= self.low * scale
        strong, weak = strong & keep, weak & keep  # zero thresholds must not mark flat pixels
        # Hysteresis: grow strong edges into connected weak pixels until nothing changes.
        edges = strong
        while True:
            grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
            if torch.equal(grown, edges):
                return edges
            edges = grown

    def operator(self, x: torch.Tensor) -> torch.Tensor:
        return (~self.edge_mask(x)).to(x.dtype).expand_as(x).contiguous()

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        return self.operator(x)


class GaussianNoise:
    """Additive white Gaussian noise, sigma on the 0-255 scale (IR-SDE: 25); a pair draws per image."""

    name = "noise"

    def __init__(self, sigma: Range = 25.0):
        self.sigma = sigma

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        check_images(x, "x")
        sigma = _per_image(self.sigma, x.shape[0], generator, x.device).to(x.dtype) / 255
        return (x + sigma.view(-1, 1, 1, 1) * _randn_like(x, generator)).clamp(0, 1)


class GaussianBlur:
    """Isotropic Gaussian blur (edge-replicated borders, so constants stay constant)."""

    name = "blur"

    def __init__(self, kernel_size: int = 9, sigma: float = 2.0):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected a positive odd integer, got {kernel_size}")
        self.kernel_size, self.sigma = kernel_size, sigma

    def operator(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "x")
        offsets = torch.arange(self.kernel_size, dtype=torch.float64) - self.kernel_size // 2
        taps = torch.exp(-(offsets**2) / (2 * self.sigma**2))
        kernel = torch.outer(taps, taps) / taps.sum() ** 2
        return _filter_per_image(x, kernel.expand(x.shape[0], -1, -1).to(x.device)).clamp(0, 1)

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        return self.operator(x)


class MotionBlur:
    """Linear motion blur of ``length`` pixels at ``angle`` degrees (None: uniform per image)."""

    name = "motion_blur"

    def __init__(self, length: int = 9, angle: Optional[Range] = None):
        if length < 1:
            raise ValueError(f"length: expected a positive integer, got {length}")
        self.length, self.angle = int(length), angle

    def kernels(self, angles_deg: torch.Tensor) -> torch.Tensor:
        """[B, k, k] kernels: weight 1 - distance to the centred segment, normalised to sum 1."""
        k = self.length + 1 - self.length % 2
        coords = torch.arange(k, dtype=torch.float64, device=angles_deg.device) - k // 2
        py, px = coords.view(1, -1, 1), coords.view(1, 1, -1)
        theta = torch.deg2rad(angles_deg.double()).view(-1, 1, 1)
        ux, uy = torch.cos(theta), -torch.sin(theta)  # image rows grow downwards
        along = (px * ux + py * uy).clamp(-(self.length - 1) / 2, (self.length - 1) / 2)
        dist = torch.hypot(px - along * ux, py - along * uy)
        weights = (1 - dist).clamp(min=0)
        return weights / weights.sum(dim=(1, 2), keepdim=True)

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        check_images(x, "x")
        angle = (0.0, 180.0) if self.angle is None else self.angle
        kernels = self.kernels(_per_image(angle, x.shape[0], generator, x.device))
        return _filter_per_image(x, kernels).clamp(0, 1)


class LowLight:
    """Darken with y = brightness * x**gamma (per-image draws from ranges) plus Gaussian noise."""

    name = "lowlight"

    def __init__(self, gamma: Range = (1.5, 3.0), brightness: Range = (0.2, 0.6), noise_sigma: Range = 5.0):
        self.gamma, self.brightness, self.noise_sigma = gamma, brightness, noise_sigma

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        check_images(x, "x")
        b = x.shape[0]
        gamma = _per_image(self.gamma, b, generator, x.device).to(x.dtype).view(-1, 1, 1, 1)
        scale = _per_image(self.brightness, b, generator, x.device).to(x.dtype).view(-1, 1, 1, 1)
        sigma = _per_image(self.noise_sigma, b, generator, x.device).to(x.dtype).view(-1, 1, 1, 1) / 255
        return (scale * x.pow(gamma) + sigma * _randn_like(x, generator)).clamp(0, 1)


class JPEG:
    """JPEG round trip through Pillow per image; ``quality`` in 1..100 or a (lo, hi) range."""

    name = "jpeg"

    def __init__(self, quality: Range = 10):
        qualities = quality if isinstance(quality, (tuple, list)) else (quality,)
        if not all(1 <= q <= 100 for q in qualities):
            raise ValueError(f"quality: expected values in 1..100, got {quality!r}")
        self.quality = quality

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        check_images(x, "x")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"x: JPEG needs 1 or 3 channels, got {x.shape[1]}")
        qualities = _per_image(self.quality, x.shape[0], generator, "cpu").round().long().tolist()
        pixels = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out = []
        for image, quality in zip(pixels, qualities):
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=quality)
            decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.uint8)
            out.append(torch.from_numpy(decoded.reshape(image.shape).copy()))
        return (torch.stack(out).permute(0, 3, 1, 2).to(x.dtype) / 255).to(x.device)


DEGRADATIONS = {
    cls.name: cls for cls in (SuperResolution, Inpainting, Edges, GaussianNoise, GaussianBlur, MotionBlur, LowLight, JPEG)
}


def make_degradation(name: str, **kwargs):
    """Build a degradation by its short name ("sr", "inpaint", "edges", "noise", ...)."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; valid names: {', '.join(DEGRADATIONS)}")
    return DEGRADATIONS[name](**kwargs)
