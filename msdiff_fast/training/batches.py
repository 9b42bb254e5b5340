"""Which items a training step uses, and the seeds of its random streams: everything random in
step k is a function of (seed, k) (the reproducibility scheme of ``trainer``'s docstring)."""

from __future__ import annotations

import functools
from numbers import Integral
from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

# Stream tags keep the data, loss-noise, dropout and item streams unrelated for the same (seed, k).
DATA_STREAM, LOSS_STREAM, DROPOUT_STREAM, ITEM_STREAM = 1, 2, 3, 4


def stream_seed(seed: int, stream: int, *counters: int) -> int:
    """A well-mixed 63-bit seed for (seed, stream, counters...): neighbours give unrelated streams."""
    words = np.random.SeedSequence([seed, stream, *counters]).generate_state(1, np.uint64)
    return int(words[0] >> np.uint64(1))


@functools.lru_cache(maxsize=4)
def _epoch_order(dataset_size: int, seed: int, epoch: int) -> Tuple[int, ...]:
    generator = torch.Generator().manual_seed(stream_seed(seed, DATA_STREAM, epoch))
    return tuple(torch.randperm(dataset_size, generator=generator).tolist())


def batch_positions(
    step: int, batch_size: int, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> List[Tuple[int, int]]:
    """(index, epoch) of every item that ``rank`` uses at 0-based ``step`` (see module docstring)."""
    for name, value, minimum in (
        ("step", step, 0),
        ("batch_size", batch_size, 1),
        ("dataset_size", dataset_size, 1),
        ("seed", seed, 0),
        ("rank", rank, 0),
        ("world_size", world_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
            raise ValueError(f"batch_positions: {name} must be an integer >= {minimum}, got {value!r}")
    if rank >= world_size or batch_size % world_size:
        raise ValueError(
            f"batch_positions: expected rank < world_size and batch_size a multiple of world_size, "
            f"got rank {rank}, world_size {world_size}, batch_size {batch_size}"
        )
    local = batch_size // world_size
    start = step * batch_size + rank * local
    return [
        (_epoch_order(dataset_size, seed, position // dataset_size)[position % dataset_size], position // dataset_size)
        for position in range(start, start + local)
    ]


class StepBatches(Sampler):
    """Yields, for steps start..stop-1, this rank's list of (index, epoch) item positions."""

    def __init__(self, start: int, stop: int, batch_size: int, dataset_size: int, seed: int, rank: int, world_size: int):
        self.start, self.stop = start, stop
        self.arguments = (batch_size, dataset_size, seed, rank, world_size)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield batch_positions(step, *self.arguments)


class PositionedItems(Dataset):
    """Fetches dataset[index] for an (index, epoch) position, reproducibly in any worker."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: Tuple[int, int]):
        index, epoch = position
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, ITEM_STREAM, index, epoch))
            return self.dataset[index]


def check_item(item, index) -> Tuple[torch.Tensor, torch.Tensor]:
    if (
        not isinstance(item, (tuple, list))
        or len(item) != 2
        or not all(isinstance(part, torch.Tensor) and part.is_floating_point() for part in item)
    ):
        found = (
            type(item).__name__
            if not isinstance(item, (tuple, list))
            else f"{type(item).__name__} of {[type(p).__name__ for p in item]}"
        )
        raise TypeError(
            f"dataset[{index}]: expected a pair (x, y) of float tensors [C, H, W] (e.g. ConditionalPairs items), got {found}"
        )
    return item[0], item[1]


def collate(items) -> Tuple[torch.Tensor, torch.Tensor]:
    pairs = [check_item(item, i) for i, item in enumerate(items)]
    try:
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    except RuntimeError as err:
        shapes = sorted({(tuple(p[0].shape), tuple(p[1].shape)) for p in pairs})
        raise ValueError(f"dataset: items of one batch must share their shapes, found (x, y) shapes {shapes}") from err
