"""Sampling with a Hugging Face causal LM and its KV cache, one batch of prompts at a time.

The model here is a plain ``*ForCausalLM`` with all its weights present (the policy worker
gathers its FSDP shards first); nothing here is collective, so each worker runs this loop for as
many steps as its own rows need.

Prompts are left-padded inside the loop, with an attention mask and explicit position ids, so a
row's logits equal those of the row alone (to float32 rounding, about 1e-7). A prompt that
several rows share (a GRPO group) is prefilled once and its KV cache copied to its rows; the
cache holds every position a row can reach from the start, so a step writes its new keys and
values into it instead of copying the cache to grow it. Rows that have finished stay in the
batch until at most half of the batch is still running; the finished ones are then dropped, the
KV cache with them, so that long tails cost what the rows still running cost.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from rl_toolkit.config_schema import SamplingConfig
from rl_toolkit.models.generation.rollout import Responses
from rl_toolkit.models.generation.sampling import choose_tokens

# The attention of the KV-cache loop: one new query per row against the cached keys, with a
# padding mask. rl_toolkit's varlen attention computes packed rows without a cache.
DECODING_ATTENTION = "sdpa"


@contextlib.contextmanager
def decoding_attention(model: PreTrainedModel) -> Iterator[None]:
    """Inside the block the model attends with ``DECODING_ATTENTION``; restored on exit."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(DECODING_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def sample_responses(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    input_lengths: torch.Tensor,
    *,
    budgets: torch.Tensor,
    uniforms: torch.Tensor | None,
    stop_token_ids: torch.Tensor,
    sampling: SamplingConfig,
    pad_token_id: int,
) -> Responses:
    """Generate one response per prompt, each until a stop token or its budget.

    Args:
        model: the causal LM, in eval mode, attending with ``DECODING_ATTENTION``, under no_grad.
        input_ids: ``[N, P]`` prompts, right-padded (``N`` may be 0: no response, no forward).
        input_lengths: ``[N]`` prompt lengths (>= 1).
        budgets: ``[N]`` the most tokens each response may have (>= 1).
        uniforms: ``[N, >= max(budgets)]`` one uniform per row and position
            (``sampling.sampling_uniforms``), or None for greedy decoding.
        stop_token_ids: ``[S]`` tokens that end a response (EOS among them).
        sampling: temperature, top-k and top-p.
        pad_token_id: fills the prompts' left padding and the tokens after each response.
    """
    num_rows, device = input_ids.shape[0], input_ids.device
    max_new = int(budgets.max()) if num_rows else 0
    tokens = torch.full((num_rows, max_new), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(num_rows, max_new, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)

    if num_rows == 0:
        return Responses(tokens=tokens, logprobs=logprobs, lengths=lengths, truncated=stopped)
    ids, attention_mask = _left_padded(input_ids, input_lengths, pad_token_id)  # (N, P) each
    cache = _kv_cache(model, capacity=ids.shape[1] + max_new)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = _prefill(model, ids, attention_mask, position_ids, input_lengths, cache)  # (N, V)
    rows = torch.arange(num_rows, device=device)  # batch row -> prompt row
    running = torch.ones(num_rows, dtype=torch.bool, device=device)  # per batch row
    for t in range(max_new):
        row_uniforms = None if uniforms is None else uniforms[rows, t]
        new_tokens, new_logprobs = choose_tokens(logits, row_uniforms, sampling)  # (b,) each
        live = rows[running]
        tokens[live, t] = new_tokens[running]
        logprobs[live, t] = new_logprobs[running]
        lengths[live] = t + 1
        hit_stop = running & torch.isin(new_tokens, stop_token_ids)
        stopped[rows[hit_stop]] = True
        running &= ~hit_stop & (budgets[rows] > t + 1)
        if not running.any():
            break
        if 2 * int(running.sum()) <= len(running):
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, running = rows[keep], running[keep]
            new_tokens, attention_mask = new_tokens[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        positions = (input_lengths[rows] + t)[:, None]  # the new token's place in its row
        logits = _next_token_logits(model, new_tokens[:, None], attention_mask, positions, cache)
    return Responses(tokens=tokens, logprobs=logprobs, lengths=lengths, truncated=~stopped)


def _left_padded(
    input_ids: torch.Tensor, input_lengths: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[N, T]`` rows moved to the right end of ``[N, max_len]``, and their mask."""
    max_len = int(input_lengths.max())
    positions = torch.arange(max_len, device=input_ids.device)[None, :]  # (1, P)
    attention_mask = (positions >= max_len - input_lengths[:, None]).long()  # (N, P)
    source = (positions - (max_len - input_lengths[:, None])).clamp(min=0)  # (N, P)
    ids = input_ids.gather(1, source).masked_fill(attention_mask == 0, pad_token_id)
    return ids, attention_mask


class _PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers allocated once for the
    whole generation: a new token is written into them, where ``DynamicLayer`` concatenates,
    copying the whole cache at every step.

    Only what the sampling loop calls is kept in step with the buffers: ``update``,
    ``batch_select_indices`` and the reads of ``keys`` / ``values`` (sequence length, masks).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity  # positions per row: the padded prompt and every new token
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer, self.value_buffer = (
            states.new_empty(*states.shape[:2], self.capacity, states.shape[3])  # (b, H, C, D)
            for states in (key_states, value_states)
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        assert self.length <= self.capacity, f"{self.length} positions, room for {self.capacity}"
        self.key_buffer[:, :, start : self.length] = key_states
        self.value_buffer[:, :, start : self.length] = value_states
        return self._point_at_buffers()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self._point_at_buffers()

    def _point_at_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.key_buffer[:, :, : self.length]  # (b, H, length, D)
        values = self.value_buffer[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values


def _kv_cache(model: PreTrainedModel, *, capacity: int) -> DynamicCache:
    """The model's ``DynamicCache`` with each full-attention layer preallocated for
    ``capacity`` positions per row (sliding-window and other layer types are left as they are)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        _PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def _prefill(
    model: PreTrainedModel,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    input_lengths: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """float32 logits ``[N, V]`` after each left-padded prompt, and its KV cache in ``cache``.

    A GRPO group holds its prompt G times: each distinct prompt goes through the model once,
    and its rows get copies of its cache and logits.
    """
    num_rows = ids.shape[0]
    prompts = torch.cat([ids, input_lengths[:, None]], dim=1)  # (N, P + 1): tokens and length
    distinct, prompt_of_row = torch.unique(prompts, dim=0, return_inverse=True)  # (K, P + 1), (N,)
    if len(distinct) == num_rows:
        return _next_token_logits(model, ids, attention_mask, position_ids, cache)
    rows = torch.arange(num_rows, device=ids.device)
    first_row = torch.full((len(distinct),), num_rows, device=ids.device)  # of each prompt
    first_row = first_row.scatter_reduce(0, prompt_of_row, rows, reduce="amin")  # (K,)
    logits = _next_token_logits(
        model, ids[first_row], attention_mask[first_row], position_ids[first_row], cache
    )  # (K, V)
    cache.batch_select_indices(prompt_of_row)
    return logits[prompt_of_row]


def _next_token_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """float32 logits ``[b, V]`` after the last of ``input_ids``; the cache grows by them."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # the prompt's other positions need no vocabulary projection
    )
    return output.logits[:, -1].float()
