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


# ---------------------------------------------------------------------------------------------
# PPO: per-token rewards, GAE, whitening, explained variance. Rows are the `[N, T]` layout of a
# rollout batch: a row's generated tokens are where its `mask` is 1 (right after the prompt).


def token_rewards(rewards: Tensor, mask: Tensor, *, kl: Tensor | None, beta: float) -> Tensor:
    """`[N, T]` per-token rewards r_t = -beta * KL_t + [t = last token] * R (PPO's shaping).

    Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
    (InstructGPT), eq. 2: the reward model's score of the completion arrives at its last token,
    and every token pays the KL to the reference (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences").

    Args:
        rewards: `[N]` the completions' scores.
        mask: `[N, T]` 1.0 on the generated tokens (a row without any gets no reward).
        kl: `[N, T]` per-token KL estimates (loss_functions.kl_estimate), or None.
        beta: the KL coefficient.
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).argmax(dim=1)  # (N,) the last generated token
    shaped = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    has_tokens = mask.sum(dim=1) > 0
    shaped[has_tokens, last[has_tokens]] = rewards.double()[has_tokens]
    if kl is not None:
        shaped -= beta * kl.double() * mask
    return shaped.to(rewards.dtype)


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over each row's masked tokens, and the returns.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", eq. 16: with t' the row's next masked token after t,
        delta_t = r_t + gamma V_t' - V_t,    A_t = delta_t + gamma lam A_t',
    where after the row's last masked token V = A = 0 (the episode ends); the return (the
    critic's target) is G_t = A_t + V_t. Positions where `mask` is 0 (prompt, padding) are
    skipped and get 0; their rewards and values are not read.

    Args:
        token_rewards: `[N, T]` r_t (token_rewards).
        values: `[N, T]` V_t, the critic's value of the state in which token t was generated.
        mask: `[N, T]` 1.0 on the tokens of the episode.
        gamma: the discount per token.
        lam: GAE's lambda.

    Returns:
        (advantages, returns), `[N, T]` each, in the dtype of `values` (computed in float64).
    """
    rewards, old_values, valid = token_rewards.double(), values.double(), mask > 0
    next_value = torch.zeros(values.shape[0], dtype=torch.float64, device=values.device)
    next_advantage = torch.zeros_like(next_value)
    advantages = torch.zeros_like(old_values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - old_values[:, t]
        advantage = delta + gamma * lam * next_advantage
        here = valid[:, t]
        advantages[:, t] = torch.where(here, advantage, 0.0)
        next_value = torch.where(here, old_values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
    returns = (advantages + old_values) * valid
    return advantages.to(values.dtype), returns.to(values.dtype)


# Sums [k] float64 moments over the shards of a batch (an all-reduce across the ranks holding
# them); None: the tensors given are the whole batch.
MomentsReduce = Callable[[Tensor], Tensor] | None


def masked_moments(values: Tensor, mask: Tensor) -> Tensor:
    """`[3]` float64: the count, sum and sum of squares of the masked entries. Moments of shards
    add up to the batch's, so statistics over a batch split over workers need one all-reduce."""
    selected = values[mask > 0].double()
    count = torch.tensor(float(selected.numel()), dtype=torch.float64)
    return torch.stack([count, selected.sum(), selected.square().sum()])


def _mean_variance(moments: Tensor, *, unbiased: bool) -> tuple[float, float]:
    count, total, squares = moments.tolist()
    mean = total / count
    variance = max(squares - total * mean, 0.0) / (count - 1 if unbiased else count)
    return mean, variance


def masked_whiten(
    values: Tensor, mask: Tensor, *, eps: float = 1e-8, reduce: MomentsReduce = None
) -> Tensor:
    """(x - mean) / (std + eps) over the masked entries (unbiased std), 0 elsewhere.

    PPO's advantage normalisation over the whole batch: computed on the driver, or on shards
    whose moments `reduce` sums, so it does not depend on how the batch is split over workers.
    """
    moments = masked_moments(values, mask)
    if reduce is not None:
        moments = reduce(moments)
    if moments[0] < 2:
        return torch.zeros_like(values)
    mean, variance = _mean_variance(moments, unbiased=True)
    whitened = (values.double() - mean) / (variance**0.5 + eps)
    return (whitened * (mask > 0)).to(values.dtype)


def explained_variance(
    values: Tensor, returns: Tensor, mask: Tensor, *, reduce: MomentsReduce = None
) -> float:
    """1 - Var(G - V) / Var(G) over the masked entries: how much of the returns' variance the
    critic's values account for (1: all; 0: no better than a constant; < 0: worse). `reduce`
    sums the moments over shards, as for masked_whiten.

    NaN when the returns do not vary.
    """
    moments = torch.cat([masked_moments(returns, mask), masked_moments(returns - values, mask)])
    if reduce is not None:
        moments = reduce(moments)
    if moments[0] == 0:
        return float("nan")
    _, variance = _mean_variance(moments[:3], unbiased=False)
    _, residual = _mean_variance(moments[3:], unbiased=False)
    if variance == 0:
        return float("nan")
    return 1.0 - residual / variance
