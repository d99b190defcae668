from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from aver.train.batches import ShardBatches

pytestmark = pytest.mark.timeout(300)


def _source(n: int, prefix: str):
    import ray.data

    rows = [{"crop_id": f"{prefix}{i:03d}", "image": np.full((2, 2, 3), i, np.uint8)} for i in range(n)]
    return ray.data.from_items(rows, override_num_blocks=5).randomize_block_order()


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "streamed"])
def test_every_source_feeds_every_row_in_proportion_across_epochs(ray_local, cache):
    # An epoch is one pass over the main source (12 rows: 3 steps of 4); a secondary source of 30
    # rows gives one batch a step (a pass: 7 batches of 4 and one of 2). Over 3 epochs (9 batches:
    # the whole first pass and 4 rows of the second) every one of its rows must be
    # fed, none twice before all were fed once (guards against: each epoch restarting the secondary
    # source, which feeds the same first rows every epoch and never the others).
    main = ShardBatches(_source(12, "a"), ("image",), torch.as_tensor, 4, cache=cache, seed=0)
    fed = {"main": Counter(), "secondary": Counter()}
    secondary = ShardBatches(_source(30, "f"), ("image",), torch.as_tensor, 4, cache=cache, seed=1).stream()
    firsts = []
    for epoch in range(3):
        for step, batch in enumerate(main.epoch(epoch)):
            fed["main"].update(batch["crop_id"])
            other = next(secondary)
            fed["secondary"].update(other["crop_id"])
            assert torch.equal(other["image"][:, 0, 0, 0].long(),
                               torch.tensor([int(c[1:]) for c in other["crop_id"]]))  # rows stay whole
            if step == 0:
                firsts.append(list(batch["crop_id"]))
    assert fed["main"] == Counter({f"a{i:03d}": 3 for i in range(12)})
    assert set(fed["secondary"]) == {f"f{i:03d}" for i in range(30)}
    assert sum(fed["secondary"].values()) == 34 and set(fed["secondary"].values()) == {1, 2}
    assert firsts[0] != firsts[1] != firsts[2]  # a fresh shuffle every pass


def test_a_cache_over_its_heap_budget_is_a_mapped_file_with_the_same_batches(ray_local):
    # Guards against: a large frozen-prefix cache held (and, permuted, copied) in the worker's heap,
    # and a disk cache that feeds other rows than the in-memory one would.
    def anon_kb() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1])

    import ray.data

    rows = [{"crop_id": f"c{i:03d}", "image": np.full((64, 64, 3), i, np.uint8)} for i in range(120)]
    source = lambda: ray.data.from_items(rows, override_num_blocks=4)  # noqa: E731
    encode = lambda x: torch.as_tensor(x).float()  # noqa: E731 - cached as float16: 24 KiB a row

    heap = ShardBatches(source(), ("image",), encode, 8, cache=True, seed=4)
    before = anon_kb()
    disk = ShardBatches(source(), ("image",), encode, 8, cache=True, seed=4, cache_bytes=100_000)
    assert anon_kb() - before < 1500  # the 2.9 MB cache is not in the heap
    maps = open("/proc/self/maps").read()
    assert "aver-cache-" in maps and "(deleted)" in maps  # mapped from the disk, already unlinked
    for epoch in (0, 1):
        for a, b in zip(heap.epoch(epoch), disk.epoch(epoch), strict=True):
            assert list(a["crop_id"]) == list(b["crop_id"]) and torch.equal(a["image"], b["image"])


def test_a_resumed_stream_goes_on_where_the_run_stopped(ray_local):
    # A run resumed after 5 steps gives its secondary sources the batches an uninterrupted run
    # would have given from step 5 on (cached sources: exactly).
    source = ShardBatches(_source(10, "f"), ("image",), torch.as_tensor, 4, cache=True, seed=3)
    whole = [list(b["crop_id"]) for b in islice(source.stream(), 9)]
    resumed = [list(b["crop_id"]) for b in islice(source.stream(5), 4)]
    assert resumed == whole[5:]
    assert len(whole[2]) == 2  # a pass of 10 rows is 3 batches, the last one short
    passes = [sum(whole[p:p + 3], []) for p in (0, 3, 6)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)
    assert passes[0] != passes[1] != passes[2]  # each pass reshuffled


def test_a_cached_source_permutes_the_same_rows_whatever_order_they_streamed_in(ray_local):
    # Guards against: a resumed run (new workers, a new execution of the dataset) whose cache holds
    # the rows in another order, so the same permutation feeds other rows than the run it continues.
    import ray.data

    rows = [{"crop_id": f"c{i:02d}", "image": np.full((2, 2, 3), i, np.uint8)} for i in range(24)]
    orders = []
    for blocks in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        shuffled = [r for b in blocks for r in rows[4 * b:4 * b + 4]]
        source = ShardBatches(ray.data.from_items(shuffled, override_num_blocks=6), ("image",), torch.as_tensor, 4,
                              cache=True, seed=2)
        orders.append([list(b["crop_id"]) for b in source.epoch(1)])
    assert orders[0] == orders[1]
