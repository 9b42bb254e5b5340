"""Data sets and image I/O for training conditional diffusion models.

Images are float32 tensors [C, H, W] in [0, 1] per item and [B, C, H, W] per batch.
``SyntheticImages`` is the default data set: it needs no download.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .checkpoint import atomic_write

PathLike = Union[str, "os.PathLike[str]"]
Size = Union[int, Tuple[int, int], None]
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp")


def check_images(x, name: str = "x") -> torch.Tensor:
    """Raise ValueError unless x is a finite 4-D float tensor [B, C, H, W] in [0, 1]; return x."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor [B, C, H, W] in [0, 1], got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"{name}: expected a 4-D float tensor [B, C, H, W] in [0, 1], got shape {tuple(x.shape)} dtype {x.dtype}"
        )
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values in [0, 1], found NaN or inf (shape {tuple(x.shape)})")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"{name}: expected values in [0, 1], found range "
            f"[{x.min().item():.4g}, {x.max().item():.4g}] (shape {tuple(x.shape)})"
        )
    return x


# ---------------------------------------------------------------------------- image I/O
# Decoding refuses images larger than this before their pixels are read: a small file can claim
# any size in its header (a 97 KB PNG of 10000 x 10000 decodes to 100 MB of grey bytes, 1.2 GB as
# float32 RGB). 8192 x 8192 is a large photograph; restoring it takes minutes per NFE on a GPU.
MAX_IMAGE_PIXELS = 8192 * 8192

# Pillow modes whose samples are 8-bit, converted by Pillow itself (grey from colour with ITU-R
# 601 weights); 16-bit grey ("I;16*", and "I" from older Pillow for 16-bit PNGs) is scaled here.
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open(path: Path, mode: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image as an 8-bit Pillow image of ``mode`` ("L" or "RGB"); see ``_decode``."""
    pixels = _decode(path, 1 if mode == "L" else 3, max_pixels)
    if pixels.dtype == np.uint16:  # round to the nearest 8-bit level: 257 = 65535 / 255
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def _decode(path: Path, channels: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Pixels [H, W, channels] as uint8, or uint16 for 16-bit grey files (kept at full precision).

    8-bit grey, RGB and palette images are converted by Pillow (palettes through RGB / RGBA); 16-bit
    grey is scaled by 1/257 per level where 8 bits are wanted; 16-bit colour PNGs arrive from Pillow
    at 8 bits. Alpha: an opaque alpha channel is dropped; an image with any transparent pixel is
    refused, since what lies behind it is unknown (flatten it onto the background you mean first).
    Raises ValueError for unreadable files and for images over ``max_pixels`` (checked from the
    header, before any pixel is decoded)."""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():  # Pillow's own, higher limit only warns: ours refuses below it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height <= max_pixels:
                img.load()  # decode now, so truncated files fail here and not later
                return _pixels(img, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    raise ValueError(
        f"cannot read image {path}: {width}x{height} is {width * height} pixels, more than the limit "
        f"of {max_pixels} ({math.isqrt(max_pixels)}^2); downscale or crop it"
    )


def _pixels(img: Image.Image, channels: int) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.array(img)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{img.mode} values outside 0..65535 (not a 16-bit image)")
        grey = values.astype(np.uint16)[..., None]
        return grey if channels == 1 else np.repeat(grey, 3, axis=2)
    if img.mode not in _EIGHT_BIT_MODES:
        raise ValueError(f"Pillow mode {img.mode!r} is not an 8- or 16-bit grey, RGB or palette image; convert it to 8-bit RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    alpha_band = next((band for band in img.getbands() if band in ("A", "a")), None)
    if alpha_band is not None:
        alpha = np.array(img.getchannel(alpha_band))
        if (alpha < 255).any():
            raise ValueError(
                f"{int((alpha < 255).sum())} of {alpha.size} pixels are transparent; flatten it onto a "
                f"background first (msdiff reads opaque images only)"
            )
    pixels = np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _to_uint8(img: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
    return pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return _to_uint8(img).float() / 255


def read_image(path: PathLike, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Read an image file as float32 [channels, H, W] in [0, 1] (channels 1: grey, 3: RGB).

    8- and 16-bit grey, RGB and palette images are read at their own precision; grey is repeated
    to RGB, colour is made grey with ITU-R 601 weights. Opaque alpha is dropped; images with
    transparent pixels and images over ``max_pixels`` pixels raise ValueError (see ``_decode``)."""
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels}")
    pixels = _decode(Path(path), channels, max_pixels)
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    return torch.from_numpy(pixels.astype(np.float32) / np.float32(scale)).permute(2, 0, 1).contiguous()


def write_image(path: PathLike, x: torch.Tensor) -> None:
    """Write [C, H, W] (C in 1, 3, 4) or [H, W] in [0, 1] as an 8-bit image (format by extension),
    atomically: a temp file in the same folder replaces ``path`` only once it is complete."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] not in (1, 3, 4)):
        found = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"write_image: expected a tensor [C, H, W] with C in 1, 3, 4 or [H, W], got {found}")
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())
    if image_format is None:
        raise ValueError(f"write_image: expected a path ending in an image extension (.png, .jpg, ...), got {os.fspath(path)!r}")
    x = x.detach().cpu().float()
    if not torch.isfinite(x).all() or x.min() < -1e-4 or x.max() > 1 + 1e-4:
        raise ValueError(
            f"write_image: expected finite values in [0, 1], found range [{x.min().item():.4g}, {x.max().item():.4g}]"
        )
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels[0] if x.dim() == 3 and x.shape[0] == 1 else pixels
    pixels = pixels.permute(1, 2, 0) if pixels.dim() == 3 else pixels
    image = Image.fromarray(pixels.numpy())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: image.save(handle, format=image_format))


def save_grid(path: PathLike, rows_of_batches, nrow: Optional[int] = None, pad: int = 2, pad_value: float = 1.0) -> None:
    """Write a PNG grid. A list of batches puts each batch on its own row (e.g. condition /
    samples / ground truth); a single batch is laid out ``nrow`` per row (default ~sqrt(B)).
    With ``nrow`` a batch longer than nrow wraps. Grey batches are repeated to RGB and every
    image is resized (nearest) to the largest H, W so small LR images line up."""
    batches = [rows_of_batches] if isinstance(rows_of_batches, torch.Tensor) else list(rows_of_batches)
    for i, batch in enumerate(batches):
        check_images(batch, f"rows_of_batches[{i}]")
    if isinstance(rows_of_batches, torch.Tensor) and nrow is None:
        nrow = math.ceil(math.sqrt(rows_of_batches.shape[0]))
    channels = max(b.shape[1] for b in batches)
    height, width = max(b.shape[2] for b in batches), max(b.shape[3] for b in batches)
    rows: List[List[torch.Tensor]] = []
    for batch in batches:
        batch = batch.detach().cpu().float()
        if batch.shape[2:] != (height, width):
            batch = F.interpolate(batch, size=(height, width), mode="nearest")
        batch = batch.expand(-1, channels, -1, -1) if batch.shape[1] == 1 else batch
        per_row = nrow or batch.shape[0]
        rows += [list(batch[i : i + per_row]) for i in range(0, batch.shape[0], per_row)]
    ncols = max(len(r) for r in rows)
    grid = torch.full((channels, pad + len(rows) * (height + pad), pad + ncols * (width + pad)), pad_value)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[:, top : top + height, left : left + width] = image
    write_image(path, grid)


# ---------------------------------------------------------------------------- folders
def _list_images(root: PathLike, extensions: Sequence[str], recursive: bool) -> List[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    suffixes = {"." + e.lower().lstrip(".") for e in extensions}
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(
            f"no images in {root} (looked for extensions {', '.join(sorted(suffixes))}{', recursively' if recursive else ''})"
        )
    return files


def _as_hw(size: Size) -> Optional[Tuple[int, int]]:
    return None if size is None else (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _crop_box(width: int, height: int, size: Tuple[int, int], crop: str):
    """Resize target covering ``size`` (aspect kept) and the crop box inside it."""
    scale = max(size[0] / height, size[1] / width)
    new_w, new_h = max(size[1], round(width * scale)), max(size[0], round(height * scale))
    if crop == "random":  # global torch RNG, which DataLoader seeds per worker
        top = int(torch.randint(0, new_h - size[0] + 1, ()))
        left = int(torch.randint(0, new_w - size[1] + 1, ()))
    else:
        top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
    return (new_w, new_h), (left, top, left + size[1], top + size[0])


def _fit(img: Image.Image, resized: Tuple[int, int], box) -> Image.Image:
    if img.size != resized:
        img = img.resize(resized, Image.BICUBIC)
    return img.crop(box) if box != (0, 0) + img.size else img


def crop_image(image: torch.Tensor, size: Tuple[int, int], crop: str) -> torch.Tensor:
    """A ``size`` crop of [C, H, W] at the image's own resolution: centred, or at a position drawn
    from torch's global RNG (which the trainer seeds per item). An image smaller than ``size`` is
    first enlarged (bicubic) just enough to cover it: resampling only where there is no other way."""
    height, width = image.shape[-2:]
    if height < size[0] or width < size[1]:
        scale = max(size[0] / height, size[1] / width)
        covering = (max(size[0], math.ceil(height * scale)), max(size[1], math.ceil(width * scale)))
        enlarged = F.interpolate(image[None].float(), size=covering, mode="bicubic", align_corners=False)[0]
        image = enlarged.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else enlarged.clamp(0, 1)
        height, width = covering
    if crop == "random":
        top = int(torch.randint(0, height - size[0] + 1, ()))
        left = int(torch.randint(0, width - size[1] + 1, ()))
    else:
        top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return image[:, top : top + size[0], left : left + size[1]]


def _check_crop(size: Size, crop: str, patches_per_image: int) -> Optional[Tuple[int, int]]:
    if crop not in ("center", "random"):
        raise ValueError(f"crop: expected 'center' or 'random', got {crop!r}")
    if isinstance(patches_per_image, bool) or not isinstance(patches_per_image, int) or patches_per_image < 1:
        raise ValueError(f"patches_per_image: expected an int >= 1, got {patches_per_image!r}")
    hw = _as_hw(size)
    if hw is not None and min(hw) < 1:
        raise ValueError(f"size: expected positive sizes, got {size!r}")
    return hw


class ImagePatches(Dataset):
    """Crops of images held in memory ([C, H, W] float in [0, 1] or uint8), at their own resolution.

    Item i is a crop of image ``i // patches_per_image`` (random: a fresh position each time it
    is read; center: the same one). A restoration model must learn the statistics of real pixels,
    so nothing is resized unless an image is smaller than the crop. ``size=None`` yields whole images.
    """

    def __init__(self, images: Sequence[torch.Tensor], size: Size = None, crop: str = "random", patches_per_image: int = 1):
        self.size = _check_crop(size, crop, patches_per_image)
        self.crop, self.patches_per_image = crop, patches_per_image
        if len(images) == 0:
            raise ValueError("images: expected at least one image, got none")
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.dtype not in (torch.uint8, torch.float32):
                got = (
                    f"shape {tuple(image.shape)} dtype {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
                )
                raise ValueError(f"images[{i}]: expected a tensor [C, H, W] of uint8 or float32, got {got}")
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images) * self.patches_per_image

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        image = self.images[index // self.patches_per_image]
        if self.size is not None:
            image = crop_image(image, self.size, self.crop)
        return image.float() / 255 if image.dtype == torch.uint8 else image.clone()


class ImageFolder(Dataset):
    """Images under ``root`` as [C, H, W] in [0, 1]. Unreadable files raise ValueError when read.

    With ``size``: a centre or random crop of that size at the image's own resolution (random
    patches are what a restoration model must train on; an image smaller than the crop is enlarged
    to cover it). ``resize=True`` instead resizes the shorter side to cover ``size`` first (aligned
    faces and other data meant to be seen whole). ``patches_per_image`` items per file and epoch.
    Decoded images are kept in memory up to ``cache_mb`` megabytes (per data-loader worker), so a
    file is decoded once, not once per patch.
    """

    def __init__(
        self,
        root: PathLike,
        size: Size = None,
        crop: str = "center",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        recursive: bool = True,
        channels: int = 3,
        resize: bool = False,
        patches_per_image: int = 1,
        cache_mb: float = 2048,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        self.size = _check_crop(size, crop, patches_per_image)
        if not isinstance(resize, bool):
            raise ValueError(f"resize: expected a bool, got {resize!r}")
        if not isinstance(cache_mb, (int, float)) or isinstance(cache_mb, bool) or not cache_mb >= 0:
            raise ValueError(f"cache_mb: expected a number >= 0, got {cache_mb!r}")
        self.root, self.crop, self.channels = Path(root), crop, channels
        self.resize, self.patches_per_image, self.cache_bytes = resize, patches_per_image, cache_mb * 2**20
        self.files = _list_images(root, extensions, recursive)
        self._cache: dict = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.files) * self.patches_per_image

    def load(self, path: Path) -> Image.Image:
        return _open(path, "L" if self.channels == 1 else "RGB")

    def _pixels(self, index: int) -> torch.Tensor:
        """The decoded file ``index`` as uint8 [C, H, W], from memory when it has been read before."""
        pixels = self._cache.get(index)
        if pixels is None:
            pixels = _to_uint8(self.load(self.files[index]))
            if self._cached_bytes + pixels.numel() <= self.cache_bytes:
                self._cache[index] = pixels
                self._cached_bytes += pixels.numel()
        return pixels

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        file_index = index // self.patches_per_image
        if self.resize and self.size is not None:
            img = self.load(self.files[file_index])
            return _to_tensor(_fit(img, *_crop_box(img.width, img.height, self.size, self.crop)))
        pixels = self._pixels(file_index)
        if self.size is not None:
            pixels = crop_image(pixels, self.size, self.crop)
        return pixels.float() / 255

    def verify(self) -> List[str]:
        """Try to decode every file; return "path: reason" for each bad one (empty if all fine)."""
        bad = []
        for path in self.files:
            try:
                self.load(path)
            except (ValueError, FileNotFoundError) as err:
                bad.append(f"{path}: {err}")
        return bad


class PairedFolders(Dataset):
    """(clean, degraded) pairs matched by relative file name without extension; with ``size`` one
    crop at the same place of both (at their own resolution, as ``ImageFolder``)."""

    def __init__(
        self,
        clean_root: PathLike,
        degraded_root: PathLike,
        size: Size = None,
        crop: str = "center",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        channels: int = 3,
    ):
        self.clean = ImageFolder(clean_root, None, crop, extensions, True, channels)
        self.degraded = ImageFolder(degraded_root, None, crop, extensions, True, channels)
        self.size, self.crop = _as_hw(size), crop
        clean, degraded = self._by_stem(self.clean), self._by_stem(self.degraded)
        only_clean, only_degraded = sorted(clean.keys() - degraded.keys()), sorted(degraded.keys() - clean.keys())
        if only_clean or only_degraded:
            raise ValueError(
                f"unmatched file names: in {clean_root} only {_short(only_clean)}; "
                f"in {degraded_root} only {_short(only_degraded)}"
            )
        self.pairs = [(clean[k], degraded[k]) for k in sorted(clean)]

    @staticmethod
    def _by_stem(folder: ImageFolder) -> dict:
        stems = {}
        for path in folder.files:
            stem = path.relative_to(folder.root).with_suffix("").as_posix()
            if stem in stems:
                raise ValueError(f"two images named {stem!r} in {folder.root}: {stems[stem].name}, {path.name}")
            stems[stem] = path
        return stems

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        clean_path, degraded_path = self.pairs[index]
        clean, degraded = self.clean.load(clean_path), self.degraded.load(degraded_path)
        if clean.size != degraded.size:
            raise ValueError(
                f"size mismatch: {clean_path} is {clean.width}x{clean.height}, "
                f"{degraded_path} is {degraded.width}x{degraded.height}"
            )
        clean, degraded = _to_uint8(clean), _to_uint8(degraded)
        if self.size is not None:  # one crop of both stacked, so they stay aligned
            both = crop_image(torch.cat([clean, degraded]), self.size, self.crop)
            clean, degraded = both[: clean.shape[0]], both[clean.shape[0] :]
        return clean.float() / 255, degraded.float() / 255


def _short(names: List[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit]) or "(none)"
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------- conditional pairs
def item_seed(seed: int, index: int, epoch: int = 0) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, index): nearby triples give unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ConditionalPairs(Dataset):
    """Items (x, y) with y = degradation(x[None])[0] drawn from a generator seeded by
    ``item_seed(seed, index, epoch)``: the same (seed, epoch) reproduces every y exactly;
    call ``set_epoch`` to draw fresh degradations (new holes, noise) each epoch."""

    def __init__(self, dataset: Dataset, degradation, seed: int = 0):
        self.dataset, self.degradation, self.seed, self.epoch = dataset, degradation, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.dataset[index]
        x = x[0] if isinstance(x, (tuple, list)) else x  # e.g. (image, label) items
        generator = torch.Generator().manual_seed(item_seed(self.seed, index, self.epoch))
        return x, self.degradation(x[None], generator=generator)[0]


# ---------------------------------------------------------------------------- synthetic images
class SyntheticImages(Dataset):
    """Procedural natural-ish images, deterministic in (seed, index): a smooth colour gradient,
    2-5 soft-edged ellipses/rectangles, some of them striped. No download needed."""

    def __init__(self, n: int, size: Size = 32, channels: int = 3, seed: int = 0):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels}")
        self.n, self.size, self.channels, self.seed = n, _as_hw(size), channels, seed
        h, w = self.size
        # Pixel-centre coordinates in units of the longer side, so shapes keep their aspect.
        scale = max(h, w)
        self._yy, self._xx = np.meshgrid((np.arange(h) + 0.5) / scale, (np.arange(w) + 0.5) / scale, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic images")
        rng = np.random.default_rng([self.seed, index])
        image = self._render(rng)
        if self.channels == 1:
            image = image @ np.array([0.299, 0.587, 0.114])[:, None]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))

    def _render(self, rng: np.random.Generator) -> np.ndarray:
        yy, xx, pixel = self._yy, self._xx, 1.0 / max(self.size)
        cy, cx = yy.mean(), xx.mean()
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-8)
        start, end = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        image = start + (end - start) * ramp[..., None]
        for _ in range(rng.integers(2, 6)):
            center = rng.uniform(0.1, 0.9, 2) * (2 * cy, 2 * cx)
            radius = rng.uniform(0.08, 0.3, 2)
            rot = rng.uniform(0, np.pi)
            u = (xx - center[1]) * np.cos(rot) + (yy - center[0]) * np.sin(rot)
            v = -(xx - center[1]) * np.sin(rot) + (yy - center[0]) * np.cos(rot)
            if rng.random() < 0.5:  # ellipse: approximate signed distance to the outline
                distance = (np.hypot(u / radius[0], v / radius[1]) - 1) * radius.min()
            else:  # rectangle
                distance = np.maximum(np.abs(u) - radius[0], np.abs(v) - radius[1])
            softness = rng.uniform(0.3, 1.2) * pixel
            alpha = rng.uniform(0.7, 1.0) / (1 + np.exp(np.clip(distance / softness, -50, 50)))
            colour = rng.uniform(0, 1, 3) * np.ones_like(image)
            if rng.random() < 0.4:  # stripes between two colours, period >= 5 px so they stay smooth
                period = rng.uniform(5, max(6, max(self.size) / 3)) * pixel
                stripes = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
                colour = colour + (rng.uniform(0, 1, 3) - colour) * stripes[..., None]
            image = image + (colour - image) * alpha[..., None]
        return np.clip(image, 0, 1)
