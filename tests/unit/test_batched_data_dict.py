"""BatchedDataDict: slicing, sharding and micro-batching keep groups (pairs) whole."""

import pickle

import pytest
import torch

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict


def make_pairs(num_pairs: int, seq_len: int = 3) -> BatchedDataDict:
    """Interleaved pairs: row 2i is pair i's chosen, row 2i + 1 its rejected response."""
    num_rows = 2 * num_pairs
    return BatchedDataDict(
        input_ids=torch.arange(num_rows * seq_len).reshape(num_rows, seq_len),
        pair_id=torch.arange(num_rows) // 2,
        text=[f"row{i}" for i in range(num_rows)],
        group_size=2,
    )


def assert_pairs_whole(batch: BatchedDataDict) -> None:
    assert batch.group_size == 2
    assert batch.size % 2 == 0
    assert torch.equal(batch["pair_id"][0::2], batch["pair_id"][1::2])


def test_size_and_defaults() -> None:
    batch = BatchedDataDict(a=torch.zeros(4, 2), b=[1, 2, 3, 4])
    assert batch.size == 4
    assert batch.group_size == 1
    assert BatchedDataDict().size == 0
    with pytest.raises(AssertionError, match="disagree"):
        _ = BatchedDataDict(a=torch.zeros(4), b=[1, 2]).size


def test_slice_keeps_group_size_and_rejects_split_pairs() -> None:
    batch = make_pairs(3)
    part = batch.slice(2, 6)
    assert part.group_size == 2
    assert part["text"] == ["row2", "row3", "row4", "row5"]
    assert torch.equal(part["pair_id"], torch.tensor([1, 1, 2, 2]))
    with pytest.raises(ValueError, match="group_size=2"):
        batch.slice(1, 4)


def test_select_indices_with_list_and_tensor() -> None:
    batch = make_pairs(3)
    for indices in ([4, 5, 0, 1], torch.tensor([4, 5, 0, 1])):
        picked = batch.select_indices(indices)
        assert picked["text"] == ["row4", "row5", "row0", "row1"]
        assert torch.equal(picked["input_ids"], batch["input_ids"][[4, 5, 0, 1]])
        assert_pairs_whole(picked)
    with pytest.raises(ValueError, match="selected indices"):
        batch.select_indices([0, 1, 2])


@pytest.mark.parametrize("num_pairs", [4, 5, 7])
@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_shard_balanced_contiguous_pairs_whole(num_pairs: int, num_shards: int) -> None:
    batch = make_pairs(num_pairs)
    shards = batch.shard_by_batch_size(num_shards)
    assert len(shards) == num_shards
    sizes = [shard.size for shard in shards]
    assert max(sizes) - min(sizes) <= 2  # at most one pair apart
    for shard in shards:
        assert_pairs_whole(shard)
    # Contiguous and complete: the shards concatenated give the original rows back.
    assert sum((shard["text"] for shard in shards), []) == batch["text"]


def test_shard_with_batch_size_interleaves_chunks() -> None:
    # 8 pairs in 2 global batches of 4 pairs, 2 workers: worker 0 gets pairs 0-1 and 4-5.
    shards = make_pairs(8).shard_by_batch_size(2, batch_size=8)
    assert torch.equal(shards[0]["pair_id"], torch.tensor([0, 0, 1, 1, 4, 4, 5, 5]))
    assert torch.equal(shards[1]["pair_id"], torch.tensor([2, 2, 3, 3, 6, 6, 7, 7]))
    assert shards[0]["text"][:2] == ["row0", "row1"]


def test_shard_empty_batch_gives_empty_shards() -> None:
    shards = make_pairs(0).shard_by_batch_size(2, batch_size=4)
    assert [shard.size for shard in shards] == [0, 0]
    assert all(shard.group_size == 2 for shard in shards)


def test_shard_errors() -> None:
    with pytest.raises(ValueError, match="number of rows"):
        BatchedDataDict(a=torch.zeros(3), group_size=2).shard_by_batch_size(2)
    with pytest.raises(ValueError, match="divide"):
        make_pairs(5).shard_by_batch_size(2, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        make_pairs(4).shard_by_batch_size(2, batch_size=3)


def test_from_batches_pads_sequence_dim() -> None:
    first = BatchedDataDict(
        ids=torch.ones(2, 2, dtype=torch.long), mask=torch.ones(2, 2), n=[1, 2], group_size=2
    )
    second = BatchedDataDict(
        ids=torch.ones(2, 4, dtype=torch.long), mask=torch.ones(2, 4), n=[3, 4], group_size=2
    )
    merged = BatchedDataDict.from_batches([first, second], pad_value_dict={"ids": 7})
    assert merged.group_size == 2
    assert merged["n"] == [1, 2, 3, 4]
    assert merged["ids"].dtype == torch.long
    assert torch.equal(merged["ids"][:2], torch.tensor([[1, 1, 7, 7], [1, 1, 7, 7]]))
    assert torch.equal(merged["mask"][:2], torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2))
    assert torch.equal(merged["ids"][2:], torch.ones(2, 4, dtype=torch.long))


def test_from_batches_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="batch 1"):
        BatchedDataDict.from_batches([make_pairs(1), BatchedDataDict(a=[1])])
    with pytest.raises(ValueError, match="empty"):
        BatchedDataDict.from_batches([])


def test_to_and_pickle_keep_group_size() -> None:
    batch = make_pairs(2).to("cpu")
    assert batch.group_size == 2
    restored = pickle.loads(pickle.dumps(batch))
    assert isinstance(restored, BatchedDataDict)
    assert restored.group_size == 2
    assert torch.equal(restored["input_ids"], batch["input_ids"])
