"""The varlen attention against a block-diagonal causal mask, and inside real models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from rl_toolkit.models.attention import (
    VARLEN_ATTENTION,
    _flash_varlen,
    check_attn_implementation,
    flash_varlen_options,
    sequence_bounds,
    varlen_attention_forward,
)
from rl_toolkit.models.packing import pack_rows

LENGTHS = [5, 9, 1, 3]  # a sequence of one token too
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": 100,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


class _Layer(nn.Module):
    is_causal = True


def _qkv(batch: int, length: int, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, HEADS, length, HEAD_DIM)] + 2 * [(batch, KV_HEADS, length, HEAD_DIM)]
    return [
        torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
        for shape in shapes
    ]


def _block_causal_reference(query, key, value, lengths, scale, window=None):
    """Plain masked attention: a token sees the earlier tokens of its own sequence only (and of
    those, with a window, the last ``window`` up to itself)."""
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(sum(lengths))
    distance = position[:, None] - position[None, :]
    mask = (sequence[:, None] == sequence[None, :]) & (distance >= 0)
    if window is not None:
        mask &= distance < window
    groups = HEADS // KV_HEADS
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # (b, L, H, D)


def test_cumulative_lengths_from_position_ids():
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])
    cu_seq_lens, longest = sequence_bounds(position_ids)
    assert cu_seq_lens.tolist() == [0, 5, 14, 15, 18] and cu_seq_lens.dtype == torch.int32
    assert longest == 9
    # A row starting mid-sequence (position ids not from 0) is still cut where they restart.
    assert sequence_bounds(torch.tensor([3, 4, 0, 1, 0]))[0].tolist() == [0, 2, 4, 5]


@pytest.mark.parametrize("bounds_from", ["cu_seq_lens", "position_ids"])
def test_packed_row_matches_block_diagonal_attention(bounds_from):
    query, key, value = _qkv(1, sum(LENGTHS))
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu_seq_lens, longest = sequence_bounds(position_ids[0])
    bounds = (
        {"cu_seq_lens_q": cu_seq_lens, "max_length_q": longest}
        if bounds_from == "cu_seq_lens"
        else {"position_ids": position_ids}
    )
    out, weights = varlen_attention_forward(
        _Layer(), query, key, value, None, scaling=0.3, **bounds
    )
    expected = _block_causal_reference(query, key, value, LENGTHS, scale=0.3)

    assert weights is None and out.shape == (1, sum(LENGTHS), HEADS, HEAD_DIM)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (query, key, value))
    torch.testing.assert_close(grads, expected_grads, atol=1e-5, rtol=0)


def test_right_padded_rows_match_masked_attention_on_real_tokens():
    query, key, value = _qkv(len(LENGTHS), max(LENGTHS))
    padding_mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]
    out, _ = varlen_attention_forward(_Layer(), query, key, value, padding_mask.long())
    for row, length in enumerate(LENGTHS):
        expected = _block_causal_reference(
            query[row : row + 1, :, :length],
            key[row : row + 1, :, :length],
            value[row : row + 1, :, :length],
            [length],
            scale=None,
        )
        torch.testing.assert_close(out[row : row + 1, :length], expected, atol=1e-6, rtol=0)


def test_sliding_window_within_each_sequence():
    query, key, value = _qkv(1, sum(LENGTHS))
    cu_seq_lens, longest = sequence_bounds(torch.cat([torch.arange(n) for n in LENGTHS]))
    bounds = {"cu_seq_lens_q": cu_seq_lens, "max_length_q": longest}
    out, _ = varlen_attention_forward(_Layer(), query, key, value, None, sliding_window=3, **bounds)
    full, _ = varlen_attention_forward(_Layer(), query, key, value, None, **bounds)

    expected = _block_causal_reference(query, key, value, LENGTHS, scale=None, window=3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out, full, atol=1e-3)  # the window mattered
    # Right-padded rows honour it too.
    padded, _ = varlen_attention_forward(_Layer(), *_qkv(1, 9), None, sliding_window=3)
    torch.testing.assert_close(
        padded, _block_causal_reference(*_qkv(1, 9), [9], scale=None, window=3), atol=1e-6, rtol=0
    )


def test_attention_names_are_checked():
    for name in ("varlen", "sdpa", "eager", "flash_attention_2", "kernels-community/flash-attn"):
        check_attn_implementation(name)
    with pytest.raises(ValueError, match="policy.attn_implementation='flash'; expected one of"):
        check_attn_implementation("flash")
    with pytest.raises(ValueError, match="rl_toolkit_varlen"):  # internal: the key says varlen
        check_attn_implementation(VARLEN_ATTENTION)


def test_softcap_is_refused():
    query, key, value = _qkv(1, 4)
    with pytest.raises(ValueError, match="soft-caps.*policy.attn_implementation to eager"):
        varlen_attention_forward(_Layer(), query, key, value, None, softcap=30.0)


# The common small policies: Llama, Qwen2 (Qwen2.5-0.5B), Mistral with a sliding window of 4.
@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY),
        Qwen2Config(**TINY),
        MistralConfig(**TINY, sliding_window=4),
    ],
    ids=["llama", "qwen2", "mistral-window"],
)
def test_models_with_varlen_match_sdpa_per_sequence(config):
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=VARLEN_ATTENTION
    )
    varlen.load_state_dict(sdpa.state_dict())
    sequences = [torch.randint(3, 100, (n,)) for n in LENGTHS]
    packed_ids, position_ids, cu_seq_lens = pack_rows(
        torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True), torch.tensor(LENGTHS)
    )
    hidden = varlen.model(
        input_ids=packed_ids,
        position_ids=position_ids,
        use_cache=False,
        cu_seq_lens_q=cu_seq_lens.to(torch.int32),
        max_length_q=max(LENGTHS),
    ).last_hidden_state[0]
    expected = torch.cat(
        [sdpa.model(input_ids=ids[None], use_cache=False).last_hidden_state[0] for ids in sequences]
    )
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)


# The keywords of varlen_attn in PyTorch 2.10, in versions with a window, and in 2.13.
TORCH_2_10 = frozenset({"scale", "is_causal", "return_aux"})
WITH_WINDOW = frozenset({"scale", "window_size", "return_aux"})
TORCH_2_13 = WITH_WINDOW | {"enable_gqa", "seqused_k", "block_table", "num_splits"}


def test_flash_options_for_each_pytorch_version():
    assert flash_varlen_options(TORCH_2_13, None, 9, gqa=True) == (
        {"window_size": (-1, 0), "enable_gqa": True},
        False,
    )
    # A window no sequence is longer than is plain causal attention.
    assert flash_varlen_options(TORCH_2_13, 9, 9, gqa=False) == ({"window_size": (-1, 0)}, False)
    assert flash_varlen_options(TORCH_2_13, 3, 9, gqa=False) == ({"window_size": (2, 0)}, False)
    # Without enable_gqa the key/value heads are repeated.
    assert flash_varlen_options(WITH_WINDOW, None, 9, gqa=True) == ({"window_size": (-1, 0)}, True)
    assert flash_varlen_options(TORCH_2_10, None, 9, gqa=False) == ({"is_causal": True}, False)
    # 2.10 has no window: the per-sequence sdpa path takes over.
    assert flash_varlen_options(TORCH_2_10, 3, 9, gqa=False) is None


@pytest.mark.parametrize("params", [TORCH_2_13, WITH_WINDOW], ids=["gqa-kernel", "repeat-kv"])
def test_flash_varlen_call_is_well_formed_on_meta_tensors(params):
    # PyTorch's varlen op has shape-only (fake) kernels: without a GPU this still checks the
    # arguments, the layouts and the backward of the GPU path; the values need the GPU test.
    length = sum(LENGTHS)
    query, key, value = (
        torch.empty(
            1, heads, length, HEAD_DIM, device="meta", dtype=torch.bfloat16
        ).requires_grad_()
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    )
    cu_seq_lens = torch.tensor([0, 5, 14, 15, 18], dtype=torch.int32, device="meta")
    for window in (None, 3):
        options = flash_varlen_options(params, window, max(LENGTHS), gqa=True)
        out = _flash_varlen(query, key, value, cu_seq_lens, max(LENGTHS), None, options)
        assert out.shape == (1, length, HEADS, HEAD_DIM) and out.dtype == torch.bfloat16
        out.sum().backward()
    assert query.grad.shape == query.shape and key.grad.shape == key.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 3])
def test_flash_varlen_kernel_on_gpu_matches_block_diagonal_attention(window):
    query, key, value = _qkv(1, sum(LENGTHS), dtype=torch.bfloat16, device="cuda")
    cu_seq_lens, longest = sequence_bounds(torch.cat([torch.arange(n) for n in LENGTHS]).cuda())
    out, _ = varlen_attention_forward(
        _Layer(),
        query,
        key,
        value,
        None,
        cu_seq_lens_q=cu_seq_lens,
        max_length_q=longest,
        sliding_window=window,
    )
    expected = _block_causal_reference(
        *(t.detach().float().cpu().requires_grad_() for t in (query, key, value)),
        LENGTHS,
        scale=None,
        window=window,
    )
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=0)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (query, key, value))
