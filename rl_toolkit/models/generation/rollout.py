"""Responses, whatever generated them, and the rollout batch built from them and the prompts."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict


@dataclass(frozen=True)
class Responses:
    """One generated response per prompt, for ``N`` prompts, ``M`` the longest budget.

    tokens: ``[N, M]`` int64, each response (stop token included) then the pad token.
    logprobs: ``[N, M]`` float32, each token's log-prob under the policy at temperature 1 (no
        top-k/top-p), 0.0 after the response.
    lengths: ``[N]`` int64, generated tokens of each response (stop token included).
    truncated: ``[N]`` bool, the response used its whole budget without a stop token.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor


def new_token_budgets(
    prompts: BatchedDataDict, *, max_new_tokens: int, max_total_sequence_length: int
) -> torch.Tensor:
    """``[N]`` the most tokens each prompt's response may have: ``max_new_tokens``, or fewer
    where prompt + response would be longer than ``max_total_sequence_length``.

    Raises:
        ValueError: a prompt leaves no room for a response (it names the prompt's id).
    """
    room = max_total_sequence_length - prompts["input_lengths"]  # (N,)
    if (room < 1).any():
        row = int((room < 1).nonzero()[0, 0])
        raise ValueError(
            f"prompt {int(prompts['prompt_ids'][row])} has {int(prompts['input_lengths'][row])} "
            f"tokens: no room for a response within policy.max_total_sequence_length="
            f"{max_total_sequence_length}"
        )
    return room.clamp(max=max_new_tokens)


def rollout_batch(
    prompts: BatchedDataDict, responses: Responses, pad_token_id: int
) -> BatchedDataDict:
    """The rollout batch (docs/design.md, "Generation"): each prompt with its response.

    Args:
        prompts: ``input_ids [N, P]`` right-padded, ``input_lengths [N]``, and any other keys,
            which are carried over.
        responses: the response of each prompt row.
        pad_token_id: the padding after each row.

    Returns:
        ``input_ids [N, T]`` (prompt, response, padding; ``T`` the longest row),
        ``input_lengths [N]``, ``token_mask [N, T]`` (1.0 on the response),
        ``generation_logprobs [N, T]`` (0.0 off the response), ``truncated [N]``, and the
        other keys of ``prompts``, with the prompts' ``group_size``.
    """
    prompt_lengths = prompts["input_lengths"]  # (N,)
    lengths = prompt_lengths + responses.lengths  # (N,)
    width = max(lengths.tolist(), default=0)
    positions = torch.arange(width, device=lengths.device)[None, :]  # (1, T)
    in_response = (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])
    # An extra pad column, so that positions past a response read padding.
    tokens = F.pad(responses.tokens, (0, 1), value=pad_token_id)  # (N, M + 1)
    logprobs = F.pad(responses.logprobs, (0, 1))
    index = (positions - prompt_lengths[:, None]).clamp(0, tokens.shape[1] - 1)  # (N, T)
    prompt_tokens = F.pad(prompts["input_ids"], (0, max(width - prompts["input_ids"].shape[1], 0)))
    after_prompt = positions >= prompt_lengths[:, None]
    prompt_tokens = prompt_tokens[:, :width].masked_fill(after_prompt, pad_token_id)  # (N, T)
    rollout = {
        key: value for key, value in prompts.items() if key not in ("input_ids", "input_lengths")
    }
    rollout |= {
        "input_ids": torch.where(in_response, tokens.gather(1, index), prompt_tokens),
        "input_lengths": lengths,
        "token_mask": in_response.float(),
        "generation_logprobs": torch.where(in_response, logprobs.gather(1, index), 0.0),
        "truncated": responses.truncated,
    }
    return BatchedDataDict(rollout, group_size=prompts.group_size)
