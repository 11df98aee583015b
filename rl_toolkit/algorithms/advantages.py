"""Advantages of sampled completions from their rewards: pure functions of tensors.

Rewards come one per completion, `[N]`, with the G completions of a prompt consecutive (a
rollout batch's groups, `group_size == G`). Each estimator returns `[N]` advantages that the
policy-gradient loss spreads over the completion's tokens. Computed on the driver over the whole
global batch, so the result does not depend on how the batch is later split over workers.

A group whose rewards are all equal has advantages 0 (never NaN): it carries no signal about
which completion was better.

This module imports neither ray nor torch.distributed.
"""

from collections.abc import Callable
from typing import Literal

import torch

from rl_toolkit.algorithms.loss_functions import kl_estimate

Tensor = torch.Tensor

AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """`[N]` rewards as `[N / G, G]` groups (float64, for exact means)."""
    assert rewards.dim() == 1 and group_size >= 1 and rewards.numel() % group_size == 0, (
        f"{rewards.numel()} rewards do not form groups of {group_size}"
    )
    return rewards.double().view(-1, group_size)


def grpo_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """GRPO: A_i = (r_i - mean(r_g)) / (std(r_g) + eps), over the completion's group g.

    Shao et al. 2024, "DeepSeekMath", eq. 3 (outcome supervision). std is the unbiased sample
    standard deviation, as TRL's GRPOTrainer computes it; a group of one has std 0 here.
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)
    return (centred / (std + eps)).view(-1).to(rewards.dtype)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean(r_g), without the std division.

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective": dividing by
    the group's std gives too-easy and too-hard prompts (low variance) a larger weight.
    """
    groups = _groups(rewards, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).view(-1).to(rewards.dtype)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r_g)).

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs": each completion's baseline is the mean of the others. Needs
    G >= 2.
    """
    assert group_size >= 2, "RLOO needs at least 2 completions per prompt"
    groups = _groups(rewards, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).view(-1).to(rewards.dtype)


def reinforce_pp_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++: A_i = (r_i - mean(r)) / (std(r) + eps) over the whole global batch.

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models":
    no per-prompt baseline, the batch's rewards are whitened instead (`group_size` only checks
    the shape). A batch whose rewards are all equal gives 0.
    """
    batch = _groups(rewards, group_size).view(-1)
    std = batch.std() if batch.numel() > 1 else torch.zeros((), dtype=batch.dtype)
    return ((batch - batch.mean()) / (std + eps)).to(rewards.dtype)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def kl_penalized_rewards(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    token_mask: Tensor,
    *,
    beta: float,
    estimator: str,
) -> Tensor:
    """r_i - beta * sum_t KL_t: the KL to the reference moved into the reward (PPO's practice,
    `loss.kl_in_reward`), summed over the completion's generated tokens.

    Args:
        rewards: `[N]` the environment's rewards.
        logprobs, ref_logprobs: `[N, T]` log-probs of the generated tokens under the policy that
            sampled them and under the reference.
        token_mask: `[N, T]` 1.0 on the generated tokens.
        beta: the KL coefficient.
        estimator: "k1", "k2" or "k3" (loss_functions.kl_estimate).
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * token_mask  # (N, T)
    return rewards - beta * kl.sum(dim=-1).to(rewards.dtype)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """`[N / G]` bool: the groups whose rewards are all equal (no learning signal).

    Dynamic sampling (DAPO) drops them and fills the batch with other prompts.
    """
    groups = _groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1)
