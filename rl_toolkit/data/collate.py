"""Collate: preference pairs -> one interleaved, right-padded BatchedDataDict (DPO), SFT
sequences -> one right-padded BatchedDataDict, prompts -> the prompt batch that generation
reads (RL); padding of a partial batch with loss-free rows; the rollout batch's contract."""

from typing import Any, NotRequired, TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from rl_toolkit.data.interfaces import Text
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict


class PreferenceBatch(TypedDict):
    """The keys of the preference batch: B pairs, rows interleaved [c0, r0, c1, r1, ...].

    The contract between the collate function, the recipe, the policy workers and the loss
    (docs/design.md, "The preference batch"); BatchedDataDict[PreferenceBatch] names it.
    """

    input_ids: torch.Tensor  # int64 [2B, T]: prompt + response + EOS, right-padded
    input_lengths: torch.Tensor  # int64 [2B]: real (non-pad) tokens per row
    token_mask: torch.Tensor  # float32 [2B, T]: 1.0 on response tokens (EOS included)
    sample_mask: torch.Tensor  # float32 [2B]: 0.0 only on rows added by pad_batch_to
    pair_ids: torch.Tensor  # int64 [2B]: the pair's index in its split, -1 on added rows
    reference_policy_logprobs: NotRequired[torch.Tensor]  # float32 [2B, T]: added by the recipe


class SFTBatch(TypedDict):
    """The keys of the SFT batch: B sequences (docs/design.md, "The SFT batch")."""

    input_ids: torch.Tensor  # int64 [B, T]: the tokens, right-padded
    input_lengths: torch.Tensor  # int64 [B]: real (non-pad) tokens per row
    token_mask: torch.Tensor  # float32 [B, T]: 1.0 on the tokens the loss predicts
    sample_mask: torch.Tensor  # float32 [B]: 0.0 only on rows added by pad_batch_to
    sample_ids: torch.Tensor  # int64 [B]: the row's index in its split, -1 on added rows


class PromptBatch(TypedDict):
    """The keys of the prompt batch: B prompts, or B / G prompts each repeated G times
    (repeat_prompts), that generation samples from (docs/design.md, "The prompt batch")."""

    input_ids: torch.Tensor  # int64 [B, P]: the prompt tokens, right-padded
    input_lengths: torch.Tensor  # int64 [B]: prompt tokens per row
    prompt_ids: torch.Tensor  # int64 [B]: the prompt's index in its split, equal within a group
    prompts: list[Text]  # [B]: the prompt as read (a string, or chat messages)
    metadata: list[dict[str, Any]]  # [B]: the row's data.metadata_keys columns
    sample_idx: NotRequired[torch.Tensor]  # int64 [B]: place in its group (repeat_prompts)
    sample_mask: NotRequired[torch.Tensor]  # float32 [B]: 1.0 (repeat_prompts)


class RolloutBatch(TypedDict):
    """The keys of the rollout batch: N = B * G rows, G generations of each of B prompts in
    consecutive rows, `group_size == G` (docs/design.md, "The rollout batch").

    Generation returns the keys without NotRequired; scoring adds `rewards`, the recipe the
    log-probs and advantages its loss needs.
    """

    input_ids: torch.Tensor  # int64 [N, T]: prompt + generated tokens, right-padded
    input_lengths: torch.Tensor  # int64 [N]: prompt + generated tokens per row
    token_mask: torch.Tensor  # float32 [N, T]: 1.0 on the generated tokens (EOS included)
    sample_mask: torch.Tensor  # float32 [N]: 0.0 on rows that must not count (none from generation)
    prompt_ids: torch.Tensor  # int64 [N]: the prompt's index in its split, equal within a group
    sample_idx: torch.Tensor  # int64 [N]: the row's place in its group, 0 .. G - 1
    prompts: list[Text]  # [N]: the prompt as read, for the environment
    metadata: list[dict[str, Any]]  # [N]: the prompt row's metadata columns, for the environment
    generation_logprobs: torch.Tensor  # float32 [N, T]: each generated token's log-prob under the
    # generating policy at temperature 1 without top-k/top-p, 0.0 elsewhere
    truncated: torch.Tensor  # bool [N]: generation stopped at its token limit before EOS
    rewards: NotRequired[torch.Tensor]  # float32 [N]: the environment's score of each row
    advantages: NotRequired[torch.Tensor]  # float32 [N, T]: per generated token
    reference_policy_logprobs: NotRequired[torch.Tensor]  # float32 [N, T]: on generated tokens
    prev_logprobs: NotRequired[torch.Tensor]  # float32 [N, T]: the policy before this update


def preference_collate_fn(
    items: list[dict[str, Any]], *, pad_token_id: int, pad_to_multiple_of: int
) -> BatchedDataDict[PreferenceBatch]:
    """Collate B pairs from PreferencePairDataset into the preference batch.

    Rows are interleaved `[c0, r0, c1, r1, ...]`: row 2i is the chosen and row 2i + 1 the
    rejected sequence of pair i. T is the longest sequence rounded up to a multiple of
    pad_to_multiple_of.

    Args:
        items: B dataset items (pair_id, prompt_length, chosen_input_ids, rejected_input_ids).
        pad_token_id: fills input_ids after each sequence.
        pad_to_multiple_of: T is rounded up to a multiple of this (1: no rounding).

    Returns:
        BatchedDataDict(group_size=2) with
            input_ids      int64   [2B, T]  prompt + response + EOS, right-padded
            input_lengths  int64   [2B]     real (non-pad) tokens per row
            token_mask     float32 [2B, T]  1.0 on response tokens (EOS included)
            sample_mask    float32 [2B]     1.0 (0.0 only on rows added by pad_batch_to)
            pair_ids       int64   [2B]     the pair's dataset index, the same on both rows
    """
    assert items
    sequences = [item[key] for item in items for key in ("chosen_input_ids", "rejected_input_ids")]
    input_ids, lengths = _pad_right(sequences, pad_token_id, pad_to_multiple_of)
    token_mask = torch.zeros(input_ids.shape, dtype=torch.float32)  # [2B, T]
    for row, sequence in enumerate(sequences):
        token_mask[row, items[row // 2]["prompt_length"] : len(sequence)] = 1.0
    pair_ids = torch.tensor([item["pair_id"] for item in items], dtype=torch.int64)
    return BatchedDataDict(
        input_ids=input_ids,
        input_lengths=lengths,
        token_mask=token_mask,
        sample_mask=torch.ones(len(sequences), dtype=torch.float32),
        pair_ids=pair_ids.repeat_interleave(2),
        group_size=2,
    )


def sft_collate_fn(
    items: list[dict[str, Any]], *, pad_token_id: int, pad_to_multiple_of: int
) -> BatchedDataDict[SFTBatch]:
    """Collate B sequences from SFTSequenceDataset into the SFT batch.

    The policy worker trains on it as on a preference batch, one row per group
    (docs/design.md, "The SFT batch"): it all-reduces the global counts of `sample_mask` and
    `token_mask`, scores only the positions where `token_mask` is 1, and NLLLossFn divides the
    summed negative log-probs by the global token count. With policy.sequence_packing the worker
    cuts its rows into micro-batches by token budget and packs each into one padding-free row.

    Args:
        items: B dataset items (sample_id, input_ids, token_mask).
        pad_token_id: fills input_ids after each sequence.
        pad_to_multiple_of: T is rounded up to a multiple of this (1: no rounding).

    Returns:
        BatchedDataDict(group_size=1) with
            input_ids      int64   [B, T]  the tokens, right-padded
            input_lengths  int64   [B]     real (non-pad) tokens per row
            token_mask     float32 [B, T]  1.0 on the tokens the loss predicts (assistant turns,
                                           the completion, or all of a text); never at t = 0,
                                           which no token predicts, nor on padding
            sample_mask    float32 [B]     1.0 (0.0 only on rows added by pad_batch_to)
            sample_ids     int64   [B]     the row's index in its formatted split
    """
    assert items
    input_ids, lengths = _pad_right(
        [item["input_ids"] for item in items], pad_token_id, pad_to_multiple_of
    )
    token_mask = torch.zeros(input_ids.shape, dtype=torch.float32)  # [B, T]
    for row, item in enumerate(items):
        token_mask[row, : len(item["token_mask"])] = item["token_mask"]
    return BatchedDataDict(
        input_ids=input_ids,
        input_lengths=lengths,
        token_mask=token_mask,
        sample_mask=torch.ones(len(items), dtype=torch.float32),
        sample_ids=torch.tensor([item["sample_id"] for item in items], dtype=torch.int64),
        group_size=1,
    )


def prompt_collate_fn(
    items: list[dict[str, Any]], *, pad_token_id: int
) -> BatchedDataDict[PromptBatch]:
    """Collate B prompts from TokenizedPromptDataset into the prompt batch.

    Args:
        items: B dataset items (prompt_id, input_ids, prompt, metadata).
        pad_token_id: fills input_ids after each prompt.

    Returns:
        BatchedDataDict(group_size=1) with
            input_ids      int64 [B, P]  the prompt tokens, right-padded to the longest prompt
            input_lengths  int64 [B]     prompt tokens per row
            prompt_ids     int64 [B]     the prompt's index in its split (stable across runs)
            prompts        list  [B]     the prompt as read (a string, or chat messages)
            metadata       list  [B]     per row a dict of its data.metadata_keys columns
    """
    assert items
    input_ids, lengths = _pad_right([item["input_ids"] for item in items], pad_token_id, 1)
    return BatchedDataDict(
        input_ids=input_ids,
        input_lengths=lengths,
        prompt_ids=torch.tensor([item["prompt_id"] for item in items], dtype=torch.int64),
        prompts=[item["prompt"] for item in items],
        metadata=[item["metadata"] for item in items],
        group_size=1,
    )


def repeat_prompts(
    batch: BatchedDataDict[PromptBatch], group_size: int
) -> BatchedDataDict[PromptBatch]:
    """Each prompt G times in consecutive rows, as one group: what generation samples G
    completions of a prompt from (GRPO's group).

    Args:
        batch: a prompt batch of B prompts (group_size 1).
        group_size: G, the generations per prompt.

    Returns:
        A prompt batch of B * G rows with `group_size == G`: rows `g * G .. g * G + G - 1` are
        prompt g, with `sample_idx` 0 .. G - 1 (with `prompt_ids`, what seeds a sample) and
        `sample_mask` 1.0; every row has its own copy of the prompt's metadata dict.
    """
    assert batch.group_size == 1, f"the prompts are already in groups of {batch.group_size}"
    rows = torch.arange(batch.size).repeat_interleave(group_size)  # [B * G]
    repeated = batch.select_indices(rows)
    repeated["metadata"] = [dict(metadata) for metadata in repeated["metadata"]]
    repeated["sample_idx"] = torch.arange(group_size).repeat(batch.size)
    repeated["sample_mask"] = torch.ones(batch.size * group_size)
    return BatchedDataDict(repeated, group_size=group_size)


def answer_sft_batch(
    prompts: BatchedDataDict[PromptBatch],
    answers: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_total_sequence_length: int,
) -> BatchedDataDict[SFTBatch]:
    """Each prompt followed by its reference answer and EOS, the loss on the answer: the SFT
    batch of a warm-up before RL (grpo.sft_warmup_steps).

    The answer is tokenised on its own (no special tokens) and appended to the prompt's tokens,
    as generation appends a completion; a row longer than `max_total_sequence_length` keeps its
    first tokens.
    """
    rows, learned = [], []
    for row, answer in enumerate(answers):
        prompt = prompts["input_ids"][row, : prompts["input_lengths"][row]].tolist()
        completion = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt + completion + [tokenizer.eos_token_id])[:max_total_sequence_length])
        learned.append(len(prompt))
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int64)
    token_mask = torch.zeros(len(rows), width)
    for row, (ids, start) in enumerate(zip(rows, learned, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        token_mask[row, start : len(ids)] = 1.0
    return BatchedDataDict(
        input_ids=input_ids,
        input_lengths=torch.tensor([len(ids) for ids in rows], dtype=torch.int64),
        token_mask=token_mask,
        sample_mask=torch.ones(len(rows)),
        sample_ids=prompts["prompt_ids"].clone(),
    )


def completion_texts(
    batch: BatchedDataDict[RolloutBatch], tokenizer: PreTrainedTokenizerBase
) -> list[str]:
    """The generated text of every row of a rollout batch, for the environment.

    The tokens where `token_mask` is 1, decoded without special tokens (EOS, chat markers).
    """
    generated = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(batch["input_ids"], batch["token_mask"], strict=True)
    ]
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


def _pad_right(
    sequences: list[torch.Tensor], pad_token_id: int, pad_to_multiple_of: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids [N, T]` right-padded to the longest sequence rounded up to a multiple of
    pad_to_multiple_of, and `input_lengths [N]`."""
    assert pad_to_multiple_of >= 1
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.int64)  # [N]
    padded_length = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), padded_length), pad_token_id, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
    return input_ids, lengths


# Keys of a batch set to -1 on the rows pad_batch_to adds: they name no row of the data set.
_ID_KEYS = ("pair_ids", "sample_ids")


def pad_batch_to(batch: BatchedDataDict, num_groups: int) -> BatchedDataDict:
    """Fill a partial batch up to `num_groups` groups (pairs, or SFT sequences) with rows that
    carry no loss.

    The added rows repeat the batch's first group (a real, well-formed sequence: an all-pad row
    of length 0 can give NaN attention on some backends) with sample_mask and token_mask 0 and
    pair_ids / sample_ids -1, so they add nothing to losses, counts or metrics.

    Args:
        batch: a preference batch of B <= num_groups pairs, or an SFT batch of B <= num_groups
            sequences (any extra keys are padded alike).
        num_groups: the full batch size in groups (pairs, or sequences).

    Returns:
        A BatchedDataDict of num_groups * group_size rows (the batch itself if it is full).
    """
    group_size, num_rows = batch.group_size, batch.size
    assert num_rows <= num_groups * group_size
    num_extra = num_groups * group_size - num_rows
    if num_extra == 0:
        return batch
    filler = list(range(group_size)) * (num_extra // group_size)
    padded = {}
    for key, value in batch.items():
        assert isinstance(value, torch.Tensor), f"pad_batch_to pads tensors only, {key!r} is not"
        extra = value[filler].clone()
        if key in ("sample_mask", "token_mask"):
            extra.zero_()
        elif key in _ID_KEYS:
            extra.fill_(-1)
        padded[key] = torch.cat([value, extra])
    return BatchedDataDict(padded, group_size=group_size)
