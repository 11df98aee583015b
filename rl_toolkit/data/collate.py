"""Pair-aware collate: preference pairs -> one interleaved, right-padded BatchedDataDict."""

from typing import Any

import torch

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict


def preference_collate_fn(
    items: list[dict[str, Any]], *, pad_token_id: int, pad_to_multiple_of: int
) -> BatchedDataDict:
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
    assert items and pad_to_multiple_of >= 1
    sequences = [item[key] for item in items for key in ("chosen_input_ids", "rejected_input_ids")]
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.int64)  # [2B]
    max_length = int(lengths.max())
    padded_length = -(-max_length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), padded_length), pad_token_id, dtype=torch.int64)
    token_mask = torch.zeros(len(sequences), padded_length, dtype=torch.float32)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
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


def pad_batch_to(batch: BatchedDataDict, num_pairs: int) -> BatchedDataDict:
    """Fill a partial batch up to `num_pairs` pairs with rows that carry no loss.

    The added rows repeat the batch's first pair (a real, well-formed sequence: an all-pad row
    of length 0 can give NaN attention on some backends) with sample_mask and token_mask 0 and
    pair_ids -1, so they add nothing to losses, counts or metrics.

    Args:
        batch: a preference batch of B <= num_pairs pairs (any extra keys are padded alike).
        num_pairs: the full batch size in pairs.

    Returns:
        A BatchedDataDict of 2 * num_pairs rows (the batch itself if it is already full).
    """
    num_rows = batch.size
    assert batch.group_size == 2 and num_rows <= 2 * num_pairs
    num_extra = 2 * num_pairs - num_rows
    if num_extra == 0:
        return batch
    filler = [0, 1] * (num_extra // 2)
    padded = {}
    for key, value in batch.items():
        assert isinstance(value, torch.Tensor), f"pad_batch_to pads tensors only, {key!r} is not"
        extra = value[filler].clone()
        if key in ("sample_mask", "token_mask"):
            extra.zero_()
        elif key == "pair_ids":
            extra.fill_(-1)
        padded[key] = torch.cat([value, extra])
    return BatchedDataDict(padded, group_size=2)
