"""PPO's and reward-model training's pure functions against their formulas, in float64: the
per-token rewards, GAE (a naive loop over each row's tokens), whitening, explained variance,
the clipped value loss (ValueLossFn) and Bradley-Terry (BradleyTerryLossFn)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rl_toolkit.algorithms.advantages import (
    explained_variance,
    gae,
    masked_whiten,
    token_rewards,
)
from rl_toolkit.algorithms.loss_functions import (
    BradleyTerryLossFn,
    ValueLossFn,
    kl_estimate,
)

N, T = 5, 9


def rollout_masks() -> torch.Tensor:
    """`[5, 9]` generated-token masks: after prompts of different lengths, right padding, one row
    without generated tokens and one with a hole (a token that does not count)."""
    mask = torch.zeros(N, T, dtype=torch.float64)
    mask[0, 2:9] = 1  # runs to the end of the row
    mask[1, 3:6] = 1  # padding after
    mask[2, 4:5] = 1  # one token
    mask[3, 1:8] = 1
    mask[3, 4] = 0  # a hole: skipped, the tokens around it are consecutive steps
    return mask  # row 4: no generated token


def naive_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Schulman et al.'s recursion, row by row over the list of the row's masked positions."""
    advantages, returns = torch.zeros_like(values), torch.zeros_like(values)
    for row in range(values.shape[0]):
        steps = [t for t in range(values.shape[1]) if mask[row, t] > 0]
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            advantage = delta + gamma * lam * next_advantage
            advantages[row, t] = advantage
            returns[row, t] = advantage + values[row, t].item()
            next_value, next_advantage = values[row, t].item(), advantage
    return advantages, returns


def test_token_rewards_put_the_reward_on_the_last_token_and_the_kl_on_every_token() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = rollout_masks()
    rewards = torch.tensor([1.0, -0.5, 2.0, 0.25, 3.0], dtype=torch.float64)
    kl = torch.randn(N, T, generator=generator, dtype=torch.float64)
    shaped = token_rewards(rewards, mask, kl=kl, beta=0.1)
    for row in range(N):
        steps = [t for t in range(T) if mask[row, t] > 0]
        for t in range(T):
            expected = -0.1 * kl[row, t].item() if t in steps else 0.0
            if steps and t == steps[-1]:
                expected += rewards[row].item()
            assert shaped[row, t].item() == pytest.approx(expected, abs=1e-15), (row, t)
    assert shaped[4].abs().max() == 0  # no generated token: no reward anywhere
    torch.testing.assert_close(
        token_rewards(rewards, mask, kl=None, beta=0.1),
        token_rewards(rewards, mask, kl=kl, beta=0.0),
    )


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_a_naive_float64_loop(gamma: float, lam: float) -> None:
    generator = torch.Generator().manual_seed(1)
    mask = rollout_masks()
    values = torch.randn(N, T, generator=generator, dtype=torch.float64)
    logprobs = -torch.rand(N, T, generator=generator, dtype=torch.float64)
    ref_logprobs = -torch.rand(N, T, generator=generator, dtype=torch.float64)
    kl = kl_estimate(logprobs, ref_logprobs, "k1")
    rewards = token_rewards(
        torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0], dtype=torch.float64), mask, kl=kl, beta=0.05
    )
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected_advantages, expected_returns = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, expected_returns, atol=1e-12, rtol=0)
    # Values and rewards off the mask are never read.
    noise = torch.randn(N, T, generator=generator, dtype=torch.float64) * (1 - mask)
    again = gae(rewards + noise, values + noise, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(again[0], advantages, atol=1e-12, rtol=0)


def test_gae_with_a_perfect_critic_gives_zero_advantages_after_the_reward_is_known() -> None:
    # Monte-Carlo returns (gamma = lam = 1): every token's return is the completion's reward.
    mask = torch.tensor([[0.0, 1, 1, 1]], dtype=torch.float64)
    rewards = token_rewards(torch.tensor([1.0], dtype=torch.float64), mask, kl=None, beta=0.0)
    values = torch.tensor([[0.0, 0.25, 1.0, 1.0]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, mask)
    torch.testing.assert_close(
        advantages, torch.tensor([[0.0, 0.75, 0.0, 0.0]], dtype=torch.float64)
    )


def test_masked_whiten_and_explained_variance_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    whitened = masked_whiten(values, mask)
    std = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 2)  # unbiased, over 1, 2, 3
    expected = torch.tensor([[-1 / std, 0.0, 0.0], [1 / std, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(whitened, expected, atol=1e-7, rtol=0)

    returns = torch.tensor([[1.0, 0.0, 5.0], [1.0, 0.0, 7.0]], dtype=torch.float64)
    predicted = torch.tensor([[0.5, 0.5, -3.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # Returns 1, 0, 1 (variance 2/9); residuals 0.5, -0.5, 0 (variance 1/6).
    assert explained_variance(predicted, returns, valid) == pytest.approx(1 - (1 / 6) / (2 / 9))
    assert explained_variance(returns, returns, valid) == pytest.approx(1.0)
    assert math.isnan(explained_variance(predicted, torch.ones_like(returns), valid))


def value_batch(generator: torch.Generator) -> dict:
    mask = rollout_masks()
    return {
        "token_mask": mask,
        "sample_mask": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64),
        "values": torch.randn(N, T, generator=generator, dtype=torch.float64) * mask,
        "returns": torch.randn(N, T, generator=generator, dtype=torch.float64) * mask,
    }


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_equals_its_formula(clip: float | None) -> None:
    generator = torch.Generator().manual_seed(2)
    data = value_batch(generator)
    new = data["values"] + 0.5 * torch.randn(N, T, generator=generator, dtype=torch.float64)
    new.requires_grad_(True)
    global_toks = torch.tensor(40.0, dtype=torch.float64)
    loss, metrics = ValueLossFn({"value_clip": clip})(new, data, torch.tensor(9.0), global_toks)

    expected, clipped_count = 0.0, 0
    for row in range(N):
        for t in range(T):
            if data["token_mask"][row, t] * data["sample_mask"][row] == 0:
                continue
            v, old, g = (
                new[row, t].item(),
                data["values"][row, t].item(),
                data["returns"][row, t].item(),
            )
            unclipped = (v - g) ** 2
            term = unclipped
            if clip is not None:
                clipped = (old + min(max(v - old, -clip), clip) - g) ** 2
                term = max(unclipped, clipped)
                clipped_count += clipped > unclipped
            expected += 0.5 * term
    assert loss.item() == pytest.approx(expected / 40.0, abs=1e-12)
    assert metrics["value_clip_fraction"] == pytest.approx(clipped_count / 40.0, abs=1e-12)
    assert (clipped_count > 0) == (clip is not None)  # the draw exercises the clip
    assert metrics["num_valid_samples"] == 4
    loss.backward()
    assert new.grad is not None and new.grad[2].abs().max() == 0  # sample_mask 0: no gradient


def test_bradley_terry_loss_equals_its_formula() -> None:
    scores = torch.tensor([2.0, 0.5, -1.0, 1.0, 3.0, 3.5, 0.0, 9.0], dtype=torch.float64)
    sample_mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    loss, metrics = BradleyTerryLossFn()(
        scores, {"sample_mask": sample_mask}, torch.tensor(10.0), torch.tensor(0.0)
    )
    # 3 valid pairs here of the 5 (10 sequences) in the global batch.
    margins = [2.0 - 0.5, -1.0 - 1.0, 3.0 - 3.5]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(1 / 5)
    assert metrics["margin_mean"] == pytest.approx(sum(margins) / 5)
    assert metrics["chosen_score_mean"] == pytest.approx((2.0 - 1.0 + 3.0) / 5)
    assert metrics["num_valid_samples"] == 3
    torch.testing.assert_close(
        -F.logsigmoid(torch.tensor(margins, dtype=torch.float64)).sum() / 5, loss
    )
