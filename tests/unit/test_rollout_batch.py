"""The rollout batch: groups of G generations of a prompt stay whole through sharding and
micro-batching, and the list-valued prompts and metadata stay aligned with the tensor rows."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.data import prompt_collate_fn, repeat_prompts
from rl_toolkit.data.collate import completion_texts
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.environments.tasks import tiny_first
from rl_toolkit.models.packing import micro_batch_rows

REPO = Path(__file__).resolve().parents[2]
TINY = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny_llama")
PAD = TINY.pad_token_id


def fake_rollout(num_prompts: int, group_size: int) -> BatchedDataDict:
    """A rollout batch as generation would return it, of hand-made prompts and generations.

    Prompt p has p + 1 tokens, prompt id 10 * p and the answer `f"answer {p}"`; generation g
    of a group has g % 3 + 1 tokens, the last one EOS except for the longest (truncated).
    """
    items = [
        {"prompt_id": 10 * p, "input_ids": torch.arange(1, p + 2), "prompt": f"prompt {p}",
         "metadata": {"answer": f"answer {p}"}}
        for p in range(num_prompts)
    ]  # fmt: skip
    prompts = repeat_prompts(prompt_collate_fn(items, pad_token_id=PAD), group_size)
    sequences, generated, truncated = [], [], []
    for row in range(prompts.size):
        prompt = prompts["input_ids"][row, : prompts["input_lengths"][row]].tolist()
        num_new = row % group_size % 3 + 1
        new = [100 + row] * (num_new - 1) + ([TINY.eos_token_id] if num_new < 3 else [7])
        sequences.append(prompt + new)
        generated.append((len(prompt), len(prompt) + num_new))
        truncated.append(num_new == 3)
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), PAD)
    token_mask = torch.zeros(len(sequences), length)
    for row, (sequence, (start, end)) in enumerate(zip(sequences, generated, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        token_mask[row, start:end] = 1.0
    return BatchedDataDict(
        input_ids=input_ids,
        input_lengths=torch.tensor([len(sequence) for sequence in sequences]),
        token_mask=token_mask,
        sample_mask=torch.ones(len(sequences)),
        prompt_ids=prompts["prompt_ids"],
        sample_idx=prompts["sample_idx"],
        prompts=prompts["prompts"],
        metadata=prompts["metadata"],
        generation_logprobs=-token_mask * torch.arange(len(sequences))[:, None],
        truncated=torch.tensor(truncated),
        rewards=torch.arange(len(sequences), dtype=torch.float32),
        group_size=group_size,
    )


def assert_aligned(batch: BatchedDataDict) -> None:
    """Every row's lists and tensors describe the same row: prompt, answer and reward agree."""
    for row in range(batch.size):
        prompt = batch["prompt_ids"][row].item() // 10
        assert batch["prompts"][row] == f"prompt {prompt}"
        assert batch["metadata"][row] == {"answer": f"answer {prompt}"}
        assert batch["input_ids"][row, 0] == 1 and batch["input_lengths"][row] > prompt + 1
        # the generated tokens carry the row's original index, as its reward and log-probs do
        original = int(batch["rewards"][row].item())
        generated = batch["input_ids"][row][batch["token_mask"][row].bool()].tolist()
        assert generated[0] in (100 + original, TINY.eos_token_id, 7)
        logprobs = batch["generation_logprobs"][row][batch["token_mask"][row].bool()]
        assert torch.all(logprobs == -original)


def assert_groups_whole(batch: BatchedDataDict, group_size: int) -> None:
    assert batch.size % group_size == 0
    ids = batch["prompt_ids"].view(-1, group_size)  # [groups, G]
    assert torch.all(ids == ids[:, :1]), ids  # one prompt per group of G consecutive rows
    assert len(set(ids[:, 0].tolist())) == ids.shape[0]  # and each group is the whole group


@pytest.mark.parametrize("group_size", [1, 3, 4])
@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_groups_stay_whole_and_aligned_through_sharding(group_size: int, num_shards: int) -> None:
    rollout = fake_rollout(5, group_size)
    assert_aligned(rollout)
    shards = rollout.shard_by_batch_size(num_shards)
    for shard in shards:
        assert shard.group_size == group_size
        assert_groups_whole(shard, group_size)
        assert_aligned(shard)
    # Global batches of whole groups split the same way; reassembled, nothing moved.
    chunked = fake_rollout(6, group_size).shard_by_batch_size(num_shards, batch_size=3 * group_size)
    for shard in chunked:
        assert_groups_whole(shard, group_size)
        assert_aligned(shard)
    merged = BatchedDataDict.from_batches(shards, pad_value_dict={"input_ids": PAD})
    assert merged["prompts"] == rollout["prompts"] and merged["metadata"] == rollout["metadata"]
    for key in ("input_ids", "token_mask", "generation_logprobs", "truncated", "rewards"):
        assert torch.equal(merged[key], rollout[key]), key


@pytest.mark.parametrize("group_size", [2, 4])
def test_groups_stay_whole_and_aligned_through_micro_batches(group_size: int) -> None:
    rollout = fake_rollout(6, group_size)
    shard = rollout.shard_by_batch_size(2)[1]
    for micro_batches in (
        MicroBatches(packed=False, size=group_size),
        MicroBatches(packed=False, size=2 * group_size),
        MicroBatches(packed=True, size=40),  # a few groups per micro-batch
        MicroBatches(packed=True, size=1),  # less than a group: one group each, never split
    ):
        rows = micro_batch_rows(shard["input_lengths"], group_size, micro_batches)
        assert torch.equal(torch.cat(rows), torch.arange(shard.size))  # every row, in order
        for indices in rows:
            micro_batch = shard.select_indices(indices)
            assert_groups_whole(micro_batch, group_size)
            assert_aligned(micro_batch)
        if micro_batches.packed and micro_batches.size == 1:
            assert len(rows) == shard.size // group_size


def test_selected_groups_carry_their_lists() -> None:
    rollout = fake_rollout(3, 2)
    picked = rollout.select_indices([4, 5, 0, 1])  # groups 2 and 0, in that order
    assert picked["prompt_ids"].tolist() == [20, 20, 0, 0]
    assert picked["metadata"] == [{"answer": "answer 2"}] * 2 + [{"answer": "answer 0"}] * 2
    assert_aligned(picked)


def test_completion_texts_and_tiny_rewards_from_tokens() -> None:
    prompt = TINY.apply_chat_template([{"role": "user", "content": "copy: cat dog"}],
                                      add_generation_prompt=True)["input_ids"]  # fmt: skip
    generations = ["cat </s>", "dog </s>", "cat dog", "</s>"]
    sequences = [prompt + TINY(text, add_special_tokens=False)["input_ids"] for text in generations]
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((4, length + 2), PAD)
    token_mask = torch.zeros(4, length + 2)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        token_mask[row, len(prompt) : len(sequence)] = 1.0
    rollout = BatchedDataDict(input_ids=input_ids, token_mask=token_mask, group_size=4)
    completions = completion_texts(rollout, TINY)
    assert completions == ["cat", "dog", "cat dog", ""]  # no EOS, no prompt, no padding
    assert tiny_first(["copy: cat dog"] * 4, completions, answer=["cat"] * 4) == [1, 0, 1, 0]
