"""distributed.shard / distributed_env: the split of work items over torchrun's processes."""

import pytest

from msdiff_fast.distributed import distributed_env, shard


@pytest.mark.parametrize("count, world", [(0, 1), (1, 3), (7, 2), (10, 5), (11, 4)])
def test_every_item_goes_to_exactly_one_rank_in_order(count, world):
    items = [f"image_{i}.png" for i in range(count)]
    parts = [shard(items, rank, world) for rank in range(world)]
    assert sorted(sum(parts, [])) == sorted(items)
    assert all(part == sorted(part, key=items.index) for part in parts)  # each rank keeps the list's order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard(range(count), 0, 1) == list(range(count))


def test_shard_rejects_bad_arguments():
    for call, error, name in [
        (lambda: shard([1, 2], 2, 2), ValueError, "rank"),
        (lambda: shard([1, 2], -1, 2), ValueError, "rank"),
        (lambda: shard([1, 2], 0, 0), ValueError, "world_size"),
        (lambda: shard([1, 2], True, 2), ValueError, "rank"),
        (lambda: shard({1, 2}, 0, 2), TypeError, "items"),
        (lambda: shard("ab", 0, 2), TypeError, "items"),
    ]:
        with pytest.raises(error, match=name):
            call()


def test_distributed_env_reads_torchrun_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_env() == (0, 0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == (3, 1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK"):
        distributed_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed_env()
