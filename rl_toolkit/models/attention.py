"""Causal attention over packed rows that never computes a score across two sequences.

Hugging Face's ``sdpa`` and ``eager`` attention handle a packed row (position ids restarting at
0 for every sequence) by building an ``[L, L]`` block-diagonal mask and computing the whole
square: a row of ``k`` sequences of ``n`` tokens costs ``k`` times the attention of the
sequences themselves, and the mask alone is ``L * L`` bytes per micro-batch. This module's
attention computes each sequence's own causal triangle and nothing else:

- on a GPU in bf16/fp16, one call of PyTorch's variable-length flash attention kernel
  (``torch.nn.attention.varlen.varlen_attn``, PyTorch >= 2.10) over the packed row, given the
  cumulative sequence lengths ``cu_seq_lens``;
- elsewhere (CPU, float32, older PyTorch), one ``scaled_dot_product_attention`` call per
  sequence.

It is registered with transformers' ``AttentionInterface`` under ``VARLEN_ATTENTION``, so a
model built with ``attn_implementation=VARLEN_ATTENTION`` calls it from every attention layer.
The sequence boundaries reach it as the ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments
that transformers passes from the model's forward down to the attention function.

Without ``cu_seq_lens_q``, a single row's boundaries are read from its position ids (where they
restart at 0), as transformers' flash attention does; rows of a batch of several are each one
sequence: causal attention over the whole row, ignoring the padding mask, which is exact for the
real tokens of right-padded rows (a real token never attends to a later position), the only
padded layout the policy worker builds.

Layers with a sliding window (transformers passes ``sliding_window``: Mistral, Gemma 3's local
layers) attend to the last ``sliding_window`` tokens of their own sequence; a sequence no longer
than the window takes the plain causal path. Logit soft-capping (Gemma 2) is not implemented and
is refused with an error that names the setting to change.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from rl_toolkit.utils.config import ConfigError

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
        **kwargs: the rest of transformers' attention arguments: ``sliding_window`` (the
            layer attends to that many last tokens only) is honoured, a logit ``softcap`` is
            refused.

    Returns:
        ``([b, L, Hq, D], None)``: the attention output and no attention weights.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"{type(module).__name__} soft-caps its attention logits, which "
            "policy.attn_implementation=varlen does not implement; set "
            "policy.attn_implementation to eager or flash_attention_2"
        )
    assert dropout == 0.0, "attention dropout is off in the policy worker"
    assert getattr(module, "is_causal", True), "varlen attention is causal only"
    window = kwargs.get("sliding_window")  # None, or attend to the last `window` tokens only
    gqa = query.shape[1] != key.shape[1]
    if cu_seq_lens_q is None and query.shape[0] == 1 and position_ids is not None:
        cu_seq_lens_q, max_length_q = sequence_bounds(position_ids[0])
    if cu_seq_lens_q is None:
        out = _causal_attention(query, key, value, scaling, gqa, window)
    elif (options := _flash_options(query, window, max_length_q, gqa)) is not None:
        assert max_length_q is not None, "_flash_options checked it"
        out = _flash_varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling, options)
        return out, None
    else:
        # split, not one slice per sequence: the backward of a split concatenates the
        # sequences' gradients once, where every slice would get a zero gradient of the whole
        # row to copy its part into, and autograd would add those up, one per sequence.
        lengths = cu_seq_lens_q.diff().tolist()
        pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
        out = torch.cat(
            [_causal_attention(q, k, v, scaling, gqa, window) for q, k, v in pieces], dim=2
        )  # (b, Hq, L, D)
    return out.transpose(1, 2).contiguous(), None


def _flash_options(
    query: torch.Tensor, window: int | None, max_length: int | None, gqa: bool
) -> tuple[dict[str, Any], bool] | None:
    """The flash kernel's options where it can run: bf16/fp16 on a GPU, PyTorch >= 2.10."""
    kernel, params = _varlen_kernel()
    if kernel is None or not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    assert max_length is not None, "max_length_q comes with cu_seq_lens_q"
    return flash_varlen_options(params, window, max_length, gqa)


def _causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    gqa: bool,
    window: int | None,
) -> torch.Tensor:
    """sdpa over whole rows, causal, and within ``window`` tokens when the rows are longer."""
    length = query.shape[2]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    # transformers' sliding window: query i sees keys j with i - window < j <= i.
    position = torch.arange(length, device=query.device)
    distance = position[:, None] - position[None, :]  # (L, L)
    mask = (distance >= 0) & (distance < window)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa
    )


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


@functools.cache
def _varlen_kernel() -> tuple[Callable[..., torch.Tensor] | None, frozenset[str]]:
    """PyTorch's varlen flash attention and the keywords it takes; None before PyTorch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    params = frozenset(inspect.signature(varlen_attn).parameters)
    # PyTorch types its result Tensor | tuple: the tuple comes with return_aux only, never passed.
    return varlen_attn, params  # type: ignore[return-value]


def flash_varlen_options(
    params: frozenset[str], window: int | None, max_length: int, gqa: bool
) -> tuple[dict[str, Any], bool] | None:
    """How to call ``varlen_attn`` of a PyTorch version that takes keywords ``params``.

    PyTorch 2.10 takes ``is_causal`` and no window; later versions take ``window_size``
    (``(-1, 0)``: causal) and, later still, ``enable_gqa``.

    Returns:
        ``(keywords, repeat_kv)``, where ``repeat_kv`` says to repeat the key/value heads for a
        version without ``enable_gqa``; None when this version cannot compute the attention
        (a sliding window that matters, without ``window_size``).
    """
    if window is not None and max_length <= window:
        window = None  # no sequence is longer than the window: plain causal attention
    if "window_size" in params:
        options: dict[str, Any] = {"window_size": (-1, 0) if window is None else (window - 1, 0)}
    elif "is_causal" in params and window is None:
        options = {"is_causal": True}
    else:
        return None
    repeat_kv = gqa and "enable_gqa" not in params
    if gqa and not repeat_kv:
        options["enable_gqa"] = True
    return options, repeat_kv


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scaling: float | None,
    options: tuple[dict[str, Any], bool],
) -> torch.Tensor:
    """``varlen_attn`` over a packed row, ``[1, H, L, D]`` in, ``[1, L, Hq, D]`` out."""
    assert query.shape[0] == 1, "a packed row is a batch of one"
    varlen_attn, _ = _varlen_kernel()
    assert varlen_attn is not None, "_flash_options checked it"
    keywords, repeat_kv = options
    if repeat_kv:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
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
        **keywords,
    )  # (L, Hq, D)
    return out[None]  # (1, L, Hq, D)


def packed_row_kwargs(cu_seq_lens: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments that carry a packed row's sequence boundaries from a Hugging Face
    model's forward to its attention function (read by this module's and flash attention;
    ignored by the others); none for padded rows (``cu_seq_lens`` None).

    Args:
        cu_seq_lens: ``[k + 1]`` int32 cumulative sequence lengths of a packed row (``pack_rows``).
    """
    if cu_seq_lens is None:
        return {}
    max_length = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def check_attn_implementation(name: str, *, key: str = "policy.attn_implementation") -> None:
    """Raise ``ConfigError`` unless ``name`` (the value of ``key``) names an attention.

    ``varlen``, ``eager``, or an implementation registered with transformers (``sdpa``,
    ``flash_attention_2``, ``flex_attention``, ...); a Hugging Face hub kernel (``org/repo``) and
    a paged variant (``paged|...``) are left to transformers to check.
    """
    known = {"varlen", "eager", *AttentionInterface().valid_keys()} - {VARLEN_ATTENTION}
    if name in known or "/" in name or name.startswith("paged|"):
        return
    raise ConfigError(f"{key}={name!r}; expected one of {', '.join(sorted(known))}")


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
