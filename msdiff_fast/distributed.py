"""Work split over the processes of a torchrun launch (one node or several).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in every process it starts; ``distributed_env``
reads them (one process without them). ``shard`` gives each rank its part of a list of work
items, so that every item is handled by exactly one rank. For results that do not depend on the
number of processes, shard whole units of work (e.g. the batches a single process would form,
in its order) and seed each unit from its own index, never from a generator shared along the
list. ``ProcessGroup`` holds the launch's processes together for one command.
"""

import os
from typing import List, Sequence, Tuple, TypeVar

Item = TypeVar("Item")


def distributed_env() -> Tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 without it)."""

    def read(name: str, default: int) -> int:
        value = os.environ.get(name, str(default))
        if not value.isdigit():
            raise ValueError(f"environment variable {name}: expected a non-negative integer, got {value!r}")
        return int(value)

    world = read("WORLD_SIZE", 1)
    if world <= 1:
        return 0, 0, 1
    rank, local_rank = read("RANK", 0), read("LOCAL_RANK", 0)
    if rank >= world:
        raise ValueError(f"environment variable RANK: expected < WORLD_SIZE={world}, got {rank}")
    return rank, local_rank, world


def shard(items: Sequence[Item], rank: int, world_size: int) -> List[Item]:
    """The items rank ``rank`` of ``world_size`` handles: items[rank], items[rank + world_size], ...
    (round robin: the ranks' counts differ by at most one; together they cover every item once)."""
    for name, value, minimum in (("rank", rank, 0), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank: expected < world_size = {world_size}, got {rank}")
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(f"items: expected a sequence (list, tuple, range), got {type(items).__name__}")
    return list(items[rank::world_size])


class ProcessGroup:
    """The processes of a torchrun launch as one group for the duration of a command (a
    gloo/nccl group is created if none exists, and destroyed after); one process: no-ops."""

    def __init__(self, world: int, device):
        self.world, self.device, self.created = world, device, False

    def __enter__(self) -> "ProcessGroup":
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.created = True
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        if self.created:
            dist.destroy_process_group()

    def broadcast(self, value):
        """Rank 0's ``value``, on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, count: int) -> int:
        """The sum of ``count`` over the processes (a barrier too)."""
        if self.world == 1:
            return count
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([count], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return int(tensor.item())
