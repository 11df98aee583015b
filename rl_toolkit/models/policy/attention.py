"""Causal attention over packed rows that never computes a score across two sequences.

Hugging Face's ``sdpa`` and ``eager`` attention handle a packed row (position ids restarting at
0 for every sequence) by building an ``[L, L]`` block-diagonal mask and computing the whole
square: a row of ``k`` sequences of ``n`` tokens costs ``k`` times the attention of the
sequences themselves, and the mask alone is ``L * L`` bytes per micro-batch. This module's
attention computes each sequence's own causal triangle and nothing else:

- on a GPU in bf16/fp16, one call of PyTorch's variable-length flash attention kernel
  (``torch.nn.attention.varlen.varlen_attn``) over the packed row, given the cumulative
  sequence lengths ``cu_seq_lens``;
- elsewhere (CPU, float32), one ``scaled_dot_product_attention`` call per sequence.

It is registered with transformers' ``AttentionInterface`` under ``VARLEN_ATTENTION``, so a
model built with ``attn_implementation=VARLEN_ATTENTION`` calls it from every attention layer.
The sequence boundaries reach it as the ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments
that transformers passes from the model's forward down to the attention function.

Without ``cu_seq_lens_q``, a single row's boundaries are read from its position ids (where they
restart at 0), as transformers' flash attention does; rows of a batch of several are each one
sequence: causal attention over the whole row, ignoring the padding mask, which is exact for the
real tokens of right-padded rows (a real token never attends to a later position), the only
padded layout the policy worker builds.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

VARLEN_ATTENTION = "rl_toolkit_varlen"  # the name under transformers' AttentionInterface


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence, in transformers' attention-function convention.

    Args:
        module: the calling attention layer.
        query: ``[b, Hq, L, D]``; ``b == 1`` for a packed row.
        key, value: ``[b, Hkv, L, D]`` (``Hq`` a multiple of ``Hkv``).
        attention_mask: unused (see the module docstring).
        dropout: must be 0.0 (the policy worker turns dropout off).
        scaling: softmax scale; None for ``1 / sqrt(D)``.
        cu_seq_lens_q: ``[k + 1]`` int32 cumulative lengths of the ``k`` sequences of a packed
            row (``0, n_0, n_0 + n_1, ..., L``); None for padded rows.
        max_length_q: the longest of the ``k`` sequences.
        position_ids: ``[1, L]`` position ids, read only when ``cu_seq_lens_q`` is None.
        **kwargs: the rest of transformers' attention arguments; a sliding window or a logit
            soft-cap is refused, since neither is implemented here.

    Returns:
        ``([b, L, Hq, D], None)``: the attention output and no attention weights.
    """
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError(
            f"{type(module).__name__} uses a sliding window or a logit soft-cap, which "
            "policy.attn_implementation=varlen does not implement; set "
            "policy.attn_implementation=sdpa (or flash_attention_2)"
        )
    assert dropout == 0.0, "attention dropout is off in the policy worker"
    assert getattr(module, "is_causal", True), "varlen attention is causal only"
    gqa = query.shape[1] != key.shape[1]
    if cu_seq_lens_q is None and query.shape[0] == 1 and position_ids is not None:
        cu_seq_lens_q, max_length_q = sequence_bounds(position_ids[0])
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    elif query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        return _flash_varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling, gqa), None
    else:
        bounds = cu_seq_lens_q.tolist()
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    query[:, :, start:end],
                    key[:, :, start:end],
                    value[:, :, start:end],
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=gqa,
                )
                for start, end in zip(bounds[:-1], bounds[1:], strict=True)
            ],
            dim=2,
        )  # (b, Hq, L, D)
    return out.transpose(1, 2).contiguous(), None


def sequence_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths of the sequences of a packed row, and the longest length.

    Args:
        position_ids: ``[L]`` position ids, counting up by 1 within a sequence and restarting
            (at 0) at the start of the next.

    Returns:
        ``cu_seq_lens [k + 1]`` int32 (``0, ..., L``) and the longest sequence's length.
    """
    restarts = (position_ids[1:] != position_ids[:-1] + 1).nonzero().flatten() + 1  # (k - 1,)
    first, end = torch.tensor([0, position_ids.shape[0]], device=position_ids.device)
    cu_seq_lens = torch.cat([first[None], restarts, end[None]]).to(torch.int32)
    return cu_seq_lens, int(cu_seq_lens.diff().max())


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int | None,
    scaling: float | None,
    gqa: bool,
) -> torch.Tensor:
    # Imported here: the module exists only in PyTorch builds recent enough to have it.
    from torch.nn.attention.varlen import varlen_attn

    assert query.shape[0] == 1, "a packed row is a batch of one"
    assert max_length is not None, "max_length_q comes with cu_seq_lens_q"
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    out = varlen_attn(
        query[0].transpose(0, 1),  # (L, Hq, D)
        key[0].transpose(0, 1),  # (L, Hkv, D)
        value[0].transpose(0, 1),
        cu_seq_lens,
        cu_seq_lens,
        max_length,
        max_length,
        scale=scaling,
        window_size=(-1, 0),  # causal
        enable_gqa=gqa,
    )  # (L, Hq, D)
    return out[None]  # (1, L, Hq, D)


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
