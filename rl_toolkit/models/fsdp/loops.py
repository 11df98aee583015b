"""The forward over selected positions and the micro-batch loops every role shares.

A role's root module (the policy's ``LogprobModel``, the critic's ``ScalarHeadModel``) takes
``(input_ids, target_index, attention_mask | position_ids + cu_seq_lens, **kwargs)`` and returns
one value per flat position of ``target_index``, computed from the hidden state just before it
(the token's log-prob; the value of the state it was generated in). ``forward_at`` lays out a
micro-batch for it, padded or packed into one row. The loops cut a worker's shard into
micro-batches and keep every worker's FSDP2 collectives in step: a worker with fewer
micro-batches than another runs extra forwards (and backwards) on a two-token dummy row.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.fsdp.init import all_reduce_sum, max_over_ranks
from rl_toolkit.models.fsdp.parallelize import reshard_all
from rl_toolkit.models.packing import micro_batch_rows, pack_rows

# loss, metrics = loss_fn(outputs, micro_batch, global_valid_seqs, global_valid_toks, **extra):
# outputs are the role's per-token (or per-sequence) values, [b, T] (or [b]); extra are the
# further keyword arguments the role's forward gives the loss (the policy's `entropy=`).
LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]
# outputs, extra = forward(micro_batch): the role's forward of one micro-batch for its loss.
LossForward = Callable[[BatchedDataDict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def scored_positions(
    micro_batch: BatchedDataDict, *, response_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions whose token is scored: ``1 <= t < input_lengths`` and, with
    ``response_only``, where ``token_mask`` is set.

    Returns:
        ``(scored [b, T] bool, rows [n], cols [n])``, the positions in row-major order.
    """
    input_ids, input_lengths = micro_batch["input_ids"], micro_batch["input_lengths"]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    scored = (positions[None, :] >= 1) & (positions[None, :] < input_lengths[:, None])
    if response_only:
        scored &= micro_batch["token_mask"] > 0  # (b, T)
    rows, cols = scored.nonzero(as_tuple=True)  # (n,), (n,)
    return scored, rows, cols


def forward_at(
    model: nn.Module,
    micro_batch: BatchedDataDict,
    *,
    packed: bool,
    rows: torch.Tensor,
    cols: torch.Tensor,
    **kwargs: Any,
) -> Any:
    """``model``'s outputs at the positions ``(rows, cols)`` of a micro-batch, in that order.

    Position ``(i, t)`` is computed from the hidden state of row ``i`` at ``t - 1``;
    ``t == input_lengths[i]`` (one past the row's last token) is allowed for a model that reads
    no token there (a scalar head: the score of the whole row).

    Args:
        model: a role's root module (see the module docstring).
        micro_batch: ``input_ids [b, T]`` right-padded and ``input_lengths [b]``.
        packed: run the rows as one padding-free row (``pack_rows``) instead of padded rows.
        rows, cols: ``[n]`` the positions.
        **kwargs: further arguments of ``model`` (e.g. ``with_entropy``).
    """
    input_ids, input_lengths = micro_batch["input_ids"], micro_batch["input_lengths"]
    if packed:
        packed_ids, position_ids, cu_seq_lens = pack_rows(input_ids, input_lengths)
        return model(
            packed_ids,
            cu_seq_lens[rows] + cols,
            position_ids=position_ids,
            cu_seq_lens=cu_seq_lens.to(torch.int32),
            **kwargs,
        )
    seq_len = input_ids.shape[1]
    positions = torch.arange(seq_len, device=input_ids.device)
    attention_mask = (positions[None, :] < input_lengths[:, None]).long()  # (b, T)
    return model(input_ids, rows * seq_len + cols, attention_mask=attention_mask, **kwargs)


def on_grid(
    values: torch.Tensor, scored: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``[n]`` values of the positions ``(rows, cols)`` as ``[b, T]`` (0.0 elsewhere), keeping
    their gradient."""
    grid = torch.zeros(scored.shape, dtype=values.dtype, device=values.device)
    return grid.index_put((rows, cols), values)


def dummy_micro_batch(device: torch.device) -> BatchedDataDict:
    """A two-token row that every role can run (its second token is a response token)."""
    return BatchedDataDict(
        {
            "input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
            "input_lengths": torch.full((1,), 2, dtype=torch.long, device=device),
            "token_mask": torch.tensor([[0.0, 1.0]], device=device),
        }
    )


def inference_outputs(
    model: nn.Module,
    data: BatchedDataDict,
    micro_batches: MicroBatches,
    forward: Callable[[BatchedDataDict], torch.Tensor],
    *,
    shape: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """The outputs of ``forward`` on this worker's shard, without gradients (collective).

    Args:
        model: the role's root module (put in eval mode, resharded at the end).
        data: this worker's rows (``input_ids``, ``input_lengths``, what ``forward`` reads).
        micro_batches: how to cut them.
        forward: one micro-batch (on ``device``) -> its ``[b, ...]`` outputs.
        shape: the result's shape, ``[N, ...]`` (e.g. ``[N, T]`` per token, ``[N]`` per row).
        device: this worker's device.

    Returns:
        The outputs of every row, float32 on CPU, rows in the order of ``data``.
    """
    # FSDP2 forwards are collective, so every worker runs as many micro-batches as the worker
    # with the most; the extra ones run on a dummy row and are dropped.
    rows_per_step = micro_batch_rows(data["input_lengths"].cpu(), data.group_size, micro_batches)
    num_steps = max_over_ranks(len(rows_per_step), device)
    outputs = torch.zeros(shape)
    model.eval()
    with torch.no_grad():
        for step in range(num_steps):
            if step < len(rows_per_step):
                rows = rows_per_step[step]
                outputs[rows] = forward(data.select_indices(rows).to(device)).cpu()
            else:
                forward(dummy_micro_batch(device))
    reshard_all(model)
    return outputs


def loss_over_micro_batches(
    model: nn.Module,
    data: BatchedDataDict,
    loss_fn: LossFn,
    micro_batches: MicroBatches,
    forward: LossForward,
    *,
    device: torch.device,
    backward: bool,
) -> dict[str, float]:
    """The loss of one global batch, of which ``data`` is this worker's shard, micro-batch by
    micro-batch, with gradients accumulated when ``backward`` (collective).

    ``loss_fn`` is called per micro-batch with the global counts (``global_counts``), so the
    micro-batch losses of all workers sum to the global batch's loss (docs/design.md, "The loss
    function").

    Returns:
        ``loss`` and the loss function's metrics, each summed over micro-batches and workers,
        plus the global counts; the same dict on every worker.
    """
    data = data.to(device)
    counts = global_counts(data)
    model.train(backward)
    sums: dict[str, torch.Tensor] = {}
    rows_per_step = micro_batch_rows(data["input_lengths"].cpu(), data.group_size, micro_batches)
    num_steps = max_over_ranks(len(rows_per_step), device)
    with torch.set_grad_enabled(backward):
        for step in range(num_steps):
            if step >= len(rows_per_step):
                outputs, _ = forward(dummy_micro_batch(device))
                if backward:  # zero gradients, but every reduce-scatter runs
                    (outputs.sum() * 0.0).backward()
                continue
            micro_batch = data.select_indices(rows_per_step[step])
            outputs, extra = forward(micro_batch)
            loss, metrics = loss_fn(
                outputs, micro_batch, counts["num_valid_seqs"], counts["num_valid_tokens"], **extra
            )
            if backward:
                loss.backward()
            for key, value in {"loss": loss, **metrics}.items():
                value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
                sums[key] = sums.get(key, 0.0) + value
    return all_reduce_sum(sums, device) | {k: float(v) for k, v in counts.items()}


def global_counts(data: BatchedDataDict) -> dict[str, torch.Tensor]:
    """Valid sequences, valid response tokens and non-padding tokens of the global batch
    (collective: summed over the workers' shards)."""
    sample_mask = data["sample_mask"].float()  # (n,)
    local = torch.stack(
        [
            sample_mask.sum(),
            (data["token_mask"].float() * sample_mask[:, None]).sum(),
            (data["input_lengths"].float() * sample_mask).sum(),
        ]
    )
    dist.all_reduce(local)
    names = ["num_valid_seqs", "num_valid_tokens", "global_num_tokens"]
    return dict(zip(names, local.unbind(), strict=True))
