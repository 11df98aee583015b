"""Micro-batches by token budget, and padding-free packing of a micro-batch into one row.

Two steps, both pure tensor code (no model, no process group), that ``micro_batch_rows`` picks
between:

- ``token_budget_groups`` cuts a worker's rows into micro-batches of whole groups (a preference
  pair is a group of 2 rows) whose real tokens fit a budget, so that micro-batches of short
  sequences hold many pairs and a long pair gets a micro-batch of its own.
- ``pack_rows`` concatenates the real tokens of a micro-batch's rows into a single row
  ``[1, L]`` with position ids that restart at 0 for every sequence. Given such position ids and
  no attention mask, Hugging Face models (transformers >= 4.53, checked with 5.23 for Llama)
  build an attention mask that is causal within each sequence and never crosses sequences (a
  block-diagonal mask with sdpa/eager), and with the cumulative lengths ``cu_seq_lens``
  rl_toolkit's varlen attention (attention.py) and flash attention compute only within each
  sequence, so every sequence's log-probs equal those of the padded layout without computing
  any padding.
"""

import torch

from rl_toolkit.config_schema import MicroBatches


def micro_batch_rows(
    input_lengths: torch.Tensor, group_size: int, micro_batches: MicroBatches
) -> list[torch.Tensor]:
    """Row indices of each micro-batch of a worker's rows, whole groups in order.

    Packed micro-batches hold up to ``micro_batches.size`` real tokens (``token_budget_groups``);
    padded ones ``micro_batches.size`` rows (the last may hold fewer).
    """
    if micro_batches.packed:
        return token_budget_groups(input_lengths, group_size, micro_batches.size)
    num_rows = input_lengths.shape[0]
    assert micro_batches.size % group_size == 0, f"{micro_batches.size} rows split a group"
    return [
        torch.arange(start, min(start + micro_batches.size, num_rows))
        for start in range(0, num_rows, micro_batches.size)
    ]


def token_budget_groups(
    input_lengths: torch.Tensor, group_size: int, max_tokens: int
) -> list[torch.Tensor]:
    """Consecutive groups of rows, packed in order into micro-batches of at most ``max_tokens``.

    A micro-batch is closed when the next group would overflow the budget; a single group larger
    than the budget becomes a micro-batch of its own (groups are never split).

    Args:
        input_lengths: ``[N]`` real tokens per row, ``N`` a multiple of ``group_size``.
        group_size: rows that stay together (2 for preference pairs).
        max_tokens: token budget per micro-batch, counted over real (non-pad) tokens.

    Returns:
        Row indices of every micro-batch, each a ``[b]`` int64 tensor of whole groups, in order;
        empty for ``N == 0``.
    """
    if max_tokens < 1:
        raise ValueError(f"a micro-batch token budget must be >= 1, got {max_tokens}")
    num_rows = input_lengths.shape[0]
    assert num_rows % group_size == 0, f"{num_rows} rows do not form groups of {group_size}"
    group_tokens = input_lengths.view(-1, group_size).sum(dim=1).tolist()  # (N / group_size,)
    micro_batches: list[list[int]] = []
    used = max_tokens  # forces a new micro-batch for the first group
    for group, tokens in enumerate(group_tokens):
        if used + tokens > max_tokens:
            micro_batches.append([])
            used = 0
        micro_batches[-1].append(group)
        used += tokens
    return [
        (torch.tensor(groups)[:, None] * group_size + torch.arange(group_size)).reshape(-1)
        for groups in micro_batches
    ]


def pack_rows(
    input_ids: torch.Tensor, input_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the real tokens of every row into one padding-free row.

    Args:
        input_ids: ``[b, T]`` right-padded token ids.
        input_lengths: ``[b]`` real tokens per row (each >= 1).

    Returns:
        ``packed_ids [1, L]`` and ``position_ids [1, L]`` (0, 1, ... restarting at every
        sequence), with ``L = input_lengths.sum()``, and ``cu_seq_lens [b + 1]``: the
        cumulative lengths ``0, n_0, n_0 + n_1, ..., L``, so row ``i``'s first token is at
        ``cu_seq_lens[i]`` (``packed_ids[0, cu_seq_lens[i] + t] == input_ids[i, t]`` for
        ``t < input_lengths[i]``), the form variable-length attention kernels take.
    """
    seq_len = input_ids.shape[1]
    positions = torch.arange(seq_len, device=input_ids.device)
    real = positions[None, :] < input_lengths[:, None]  # (b, T)
    packed_ids = input_ids[real][None, :]  # (1, L), rows in order
    position_ids = positions.expand_as(input_ids)[real][None, :]  # (1, L)
    cu_seq_lens = torch.nn.functional.pad(torch.cumsum(input_lengths, dim=0), (1, 0))  # (b + 1,)
    return packed_ids, position_ids, cu_seq_lens
