"""Restore images of any size with a model trained on fixed-size crops: overlapping tiles.

An image is padded (reflect, or replicate where it is too small to reflect) to at least the tile
size, split into tiles of the model's size that overlap by ``overlap`` pixels, the tiles of many
images are restored together in batches, and each output pixel is the weighted mean of the tiles
that cover it. A tile's weight ramps up smoothly (raised cosine) over ``overlap`` pixels on every
side that borders another tile and is flat elsewhere, so seams between independently sampled
tiles fade out instead of showing. The weights are normalised by their sum at every pixel, so
they sum to one exactly and an identity restorer gives back the input image bit for bit.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import check_int

__all__ = [
    "TileLayout",
    "TiledNetwork",
    "blend_weights",
    "merge_tiles",
    "restore_tiled",
    "split_tiles",
    "tile_starts",
    "tile_window",
]


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of size ``tile`` covering [0, length) with at least ``overlap`` shared
    pixels between neighbours; the last tile is moved back to end exactly at ``length``."""
    check_int(tile, "tile", 1)
    check_int(length, "length", tile)
    check_int(overlap, "overlap", 0)
    if overlap >= tile:
        raise ValueError(f"overlap: expected fewer pixels than the tile size {tile}, got {overlap}")
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def _ramp(overlap: int, dtype: torch.dtype) -> torch.Tensor:
    """Raised-cosine weights in (0, 1) for the first ``overlap`` pixels of a tile side."""
    position = (torch.arange(overlap, dtype=dtype) + 0.5) / overlap
    return torch.sin(0.5 * math.pi * position) ** 2


def tile_window(size: int, overlap: int, ramp_start: bool, ramp_end: bool, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """1-D window of a tile side: a ramp over ``overlap`` pixels at each end that has a neighbour, 1 elsewhere."""
    window = torch.ones(size, dtype=dtype)
    ramp_length = min(overlap, size // 2)
    if ramp_length:
        ramp = _ramp(ramp_length, dtype)
        if ramp_start:
            window[:ramp_length] = ramp
        if ramp_end:
            window[size - ramp_length :] = ramp.flip(0)
    return window


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one image sit: its size, its padded size and the tiles' top-left corners."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    tile: int
    overlap: int
    rows: Tuple[int, ...]
    cols: Tuple[int, ...]

    @classmethod
    def for_image(cls, height: int, width: int, tile: int, overlap: int) -> "TileLayout":
        check_int(height, "height", 1)
        check_int(width, "width", 1)
        padded_height, padded_width = max(height, tile), max(width, tile)
        rows = tile_starts(padded_height, tile, overlap)
        cols = tile_starts(padded_width, tile, overlap)
        return cls(height, width, padded_height, padded_width, tile, overlap, tuple(rows), tuple(cols))

    @property
    def corners(self) -> List[Tuple[int, int]]:
        return [(top, left) for top in self.rows for left in self.cols]

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def window(self, top: int, left: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """[tile, tile] weight of the tile at (top, left): ramps only towards neighbouring tiles."""
        vertical = tile_window(self.tile, self.overlap, top > self.rows[0], top < self.rows[-1], dtype)
        horizontal = tile_window(self.tile, self.overlap, left > self.cols[0], left < self.cols[-1], dtype)
        return vertical[:, None] * horizontal[None, :]


def blend_weights(layout: TileLayout, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[tiles, padded_height, padded_width] normalised weight of every tile at every pixel (zero
    outside the tile); they sum to one at every pixel of the padded image."""
    weights = torch.zeros(len(layout), layout.padded_height, layout.padded_width, dtype=dtype)
    for index, (top, left) in enumerate(layout.corners):
        weights[index, top : top + layout.tile, left : left + layout.tile] = layout.window(top, left, dtype)
    return weights / weights.sum(dim=0, keepdim=True)


def _pad(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad [C, H, W] at the bottom and right to (height, width); reflect where the image allows."""
    pad_bottom, pad_right = height - image.shape[1], width - image.shape[2]
    if pad_bottom == 0 and pad_right == 0:
        return image
    reflectable = pad_bottom < image.shape[1] and pad_right < image.shape[2]
    return F.pad(image[None], (0, pad_right, 0, pad_bottom), mode="reflect" if reflectable else "replicate")[0]


def split_tiles(image: torch.Tensor, tile: int, overlap: int) -> Tuple[torch.Tensor, TileLayout]:
    """[C, H, W] -> (tiles [N, C, tile, tile], layout) with N = len(layout)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
        got = f"shape {tuple(image.shape)} dtype {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a float tensor [C, H, W], got {got}")
    layout = TileLayout.for_image(image.shape[1], image.shape[2], tile, overlap)
    padded = _pad(image, layout.padded_height, layout.padded_width)
    tiles = torch.stack([padded[:, top : top + tile, left : left + tile] for top, left in layout.corners])
    return tiles, layout


def merge_tiles(tiles: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Blend restored tiles [N, C, tile, tile] back into one [C, H, W] image (accumulated in float64)."""
    expected = (len(layout), layout.tile, layout.tile)
    if not isinstance(tiles, torch.Tensor) or tiles.ndim != 4 or (tiles.shape[0], *tiles.shape[2:]) != expected:
        got = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
        raise ValueError(
            f"tiles: expected [{expected[0]}, C, {layout.tile}, {layout.tile}] (one per tile of the layout), got {got}"
        )
    total = torch.zeros(tiles.shape[1], layout.padded_height, layout.padded_width, dtype=torch.float64, device=tiles.device)
    weight_sum = torch.zeros(layout.padded_height, layout.padded_width, dtype=torch.float64, device=tiles.device)
    for tile, (top, left) in zip(tiles, layout.corners):
        window = layout.window(top, left).to(tiles.device)
        total[:, top : top + layout.tile, left : left + layout.tile] += tile.to(torch.float64) * window
        weight_sum[top : top + layout.tile, left : left + layout.tile] += window
    return (total / weight_sum)[:, : layout.height, : layout.width].to(tiles.dtype)


def restore_tiled(
    restore: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[torch.Tensor],
    tile: int,
    overlap: int,
    batch_size: int,
    progress: bool = False,
) -> List[torch.Tensor]:
    """Restore every [C, H, W] image of ``images`` tile by tile.

    restore(batch [b, C, tile, tile]) -> [b, C_out, tile, tile] is called on batches of at most
    ``batch_size`` tiles, drawn from all images together (an image of the tile size is one tile).
    Returns the restored images [C_out, H, W] in order.
    """
    if not callable(restore):
        raise TypeError(f"restore: expected a callable batch -> batch, got {type(restore).__name__}")
    check_int(batch_size, "batch_size", 1)
    split = [split_tiles(image, tile, overlap) for image in images]
    if not split:
        return []
    all_tiles = torch.cat([tiles for tiles, _ in split])
    restored = []
    for start in tqdm(range(0, all_tiles.shape[0], batch_size), disable=not progress, desc="tiles", unit="batch", leave=False):
        batch = all_tiles[start : start + batch_size]
        output = restore(batch)
        if (
            not isinstance(output, torch.Tensor)
            or output.ndim != 4
            or output.shape[0] != batch.shape[0]
            or output.shape[2:] != batch.shape[2:]
        ):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"restore: expected an output [{batch.shape[0]}, C, {tile}, {tile}] for a batch of {batch.shape[0]} tiles, got {got}"
            )
        restored.append(output)
    restored_tiles = torch.cat(restored)
    results, start = [], 0
    for _, layout in split:
        results.append(merge_tiles(restored_tiles[start : start + len(layout)], layout))
        start += len(layout)
    return results


class TiledNetwork(torch.nn.Module):
    """``network(x, t)`` evaluated on overlapping tiles of its training size and blended, so that a
    sampler can run on whole images of any size.

    Sampling each tile on its own (``restore_tiled``) draws independent noise in every tile, and
    neighbours then disagree in their overlap: blending two different samples leaves visible
    seams and blur. Here the sampler's state, its prior draw and every noise draw cover the whole
    image; only each network evaluation is split into tiles ([B * tiles, C, tile, tile], at most
    ``max_batch`` per call) whose outputs are blended with the same raised-cosine weights. A
    network output is a smooth function of its input, so two tiles that see the same pixels
    agree up to their border effects, which the blend fades out. Inputs of exactly the tile size
    go straight to ``network``.
    """

    def __init__(self, network: Callable, tile: int, overlap: int, max_batch: int = 64):
        super().__init__()
        if not callable(network):
            raise TypeError(f"network: expected a callable network(x, t), got {type(network).__name__}")
        check_int(tile, "tile", 1)
        check_int(overlap, "overlap", 0)
        if overlap >= tile:
            raise ValueError(f"overlap: expected fewer pixels than the tile size {tile}, got {overlap}")
        self.network, self.tile, self.overlap, self.max_batch = network, tile, overlap, check_int(max_batch, "max_batch", 1)
        self._weights: dict = {}

    def _layout_and_weights(self, height: int, width: int, device, dtype) -> Tuple[TileLayout, torch.Tensor]:
        key = (height, width, device, dtype)
        if key not in self._weights:
            layout = TileLayout.for_image(height, width, self.tile, self.overlap)
            weights = blend_weights(layout)
            tiles = torch.stack(
                [weights[i, top : top + self.tile, left : left + self.tile] for i, (top, left) in enumerate(layout.corners)]
            )
            self._weights = {key: (layout, tiles.to(device, dtype))}  # one size at a time: a sampler's whole run
        return self._weights[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor [B, C, H, W], got {got}")
        batch, _, height, width = x.shape
        if (height, width) == (self.tile, self.tile):
            return self.network(x, t)
        layout, weights = self._layout_and_weights(height, width, x.device, x.dtype)
        padded = torch.stack([_pad(image, layout.padded_height, layout.padded_width) for image in x])
        tiles = torch.stack([padded[:, :, top : top + self.tile, left : left + self.tile] for top, left in layout.corners], dim=1)
        tiles = tiles.reshape(batch * len(layout), x.shape[1], self.tile, self.tile)
        t = torch.as_tensor(t, device=x.device)
        times = (t.expand(batch) if t.ndim == 0 else t).repeat_interleave(len(layout))
        outputs = torch.cat(
            [
                self.network(tiles[i : i + self.max_batch], times[i : i + self.max_batch])
                for i in range(0, tiles.shape[0], self.max_batch)
            ]
        )
        outputs = outputs.reshape(batch, len(layout), -1, self.tile, self.tile) * weights[None, :, None]
        merged = outputs.new_zeros(batch, outputs.shape[2], layout.padded_height, layout.padded_width)
        for index, (top, left) in enumerate(layout.corners):
            merged[:, :, top : top + self.tile, left : left + self.tile] += outputs[:, index]
        return merged[:, :, :height, :width]
