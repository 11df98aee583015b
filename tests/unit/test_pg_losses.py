"""Advantages and policy-gradient losses against their formulas, by hand, in float64."""

import math

import pytest
import torch

from rl_toolkit.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    grpo_advantages,
    kl_penalized_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rl_toolkit.algorithms.loss_functions import (
    ClippedPGLossFn,
    cispo_loss,
    kl_estimate,
    ppo_clip_loss,
)
from rl_toolkit.config_schema import PGLossConfig
from rl_toolkit.utils.config import ConfigError

# Two prompts, G = 3: rewards (1, 0, 0) and (1, 1, 1).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)


def test_grpo_advantages_by_hand_and_zero_variance_groups_give_zero() -> None:
    # Group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3).
    std = math.sqrt(1 / 3)
    expected = [(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0.0, 0.0, 0.0]
    got = grpo_advantages(REWARDS, 3, eps=0.0).tolist()
    assert got[:3] == pytest.approx(expected[:3], rel=1e-12)
    # A group whose rewards are equal: 0 / (0 + eps) = 0, never NaN (eps = 0 as well).
    assert grpo_advantages(REWARDS, 3)[3:].tolist() == [0.0, 0.0, 0.0]
    assert zero_variance_groups(REWARDS, 3).tolist() == [False, True]


def test_dr_grpo_rloo_and_reinforce_pp_by_hand() -> None:
    assert dr_grpo_advantages(REWARDS, 3).tolist() == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], rel=1e-12
    )
    # Leave-one-out baselines of group 1: (0 + 0) / 2, (1 + 0) / 2, (1 + 0) / 2.
    assert rloo_advantages(REWARDS, 3).tolist() == pytest.approx(
        [1.0, -0.5, -0.5, 0, 0, 0], rel=1e-12
    )
    # Whitened over the batch: mean 2/3, unbiased std sqrt((4 (1/3)^2 + 2 (2/3)^2) / 5).
    mean, std = 2 / 3, math.sqrt((4 / 9 + 8 / 9) / 5)
    expected = [(r - mean) / std for r in REWARDS.tolist()]
    assert reinforce_pp_advantages(REWARDS, 3, eps=0.0).tolist() == pytest.approx(expected)
    uniform = torch.ones(4, dtype=torch.float64)
    for name, estimator in ADVANTAGE_ESTIMATORS.items():
        assert estimator(uniform, 2).tolist() == [0.0] * 4, name


def test_kl_estimators_by_hand() -> None:
    logprobs = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    log_ratio = [0.5, -1.0]
    assert kl_estimate(logprobs, ref, "k1").tolist() == pytest.approx(log_ratio)
    assert kl_estimate(logprobs, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    k3 = [math.exp(-x) - 1 + x for x in log_ratio]
    assert kl_estimate(logprobs, ref, "k3").tolist() == pytest.approx(k3)
    # A token whose probability collapsed: clamped, finite.
    extreme = kl_estimate(torch.tensor([-80.0]), torch.tensor([-1.0]), "k3")
    assert torch.isfinite(extreme).all() and extreme.item() == 10.0


def test_ppo_clip_with_clip_higher_and_dual_clip_by_hand() -> None:
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 4.0], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    unused = torch.zeros(5, dtype=torch.float64)
    loss = ppo_clip_loss(ratio, unused, advantages, clip_min=0.2, clip_max=0.28, dual_clip_c=None)
    # -min(r A, clip(r, 0.8, 1.28) A): 1.28 | 1.5 | 0.5 | 0.8 | 4.0
    assert loss.tolist() == pytest.approx([-1.28, 1.5, -0.5, 0.8, 4.0])
    dual = ppo_clip_loss(ratio, unused, advantages, clip_min=0.2, clip_max=0.28, dual_clip_c=3.0)
    # With a negative advantage the loss is at most -c A = 3.
    assert dual.tolist() == pytest.approx([-1.28, 1.5, -0.5, 0.8, 3.0])


def test_cispo_keeps_the_gradient_of_clipped_tokens() -> None:
    logprobs = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    ratio = torch.exp(logprobs - old)  # e^0.5 (clipped to 1.28), 1
    advantages = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cispo_loss(ratio, logprobs, advantages, clip_min=0.2, clip_max=0.28).sum().backward()
    # d/dl of -sg(clip(r)) A l = -clip(r) A: the clipped token still learns, with weight 1.28.
    assert logprobs.grad.tolist() == pytest.approx([-1.28, -2.0])


def config(**overrides) -> PGLossConfig:
    base: PGLossConfig = {
        "policy_loss": "ppo_clip",
        "ratio_level": "token",
        "ratio_clip_min": 0.2,
        "ratio_clip_max": 0.2,
        "ratio_clip_c": None,
        "reference_policy_kl_penalty": 0.0,
        "kl_estimator": "k3",
        "kl_in_reward": False,
        "aggregation": "token_mean",
        "sum_norm_length": None,
        "importance_correction": "none",
        "importance_min": 0.5,
        "importance_max": 2.0,
        "entropy_coef": 0.0,
    }
    return {**base, **overrides}  # type: ignore[typeddict-item]


def rollout(seed: int = 0) -> tuple[torch.Tensor, dict]:
    """4 completions of 5 positions; completions 0-2 generated 3, 4 and 2 tokens, row 3 is a
    padding row (sample_mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    token_mask = torch.tensor(
        [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.float64
    )
    logprobs = -torch.rand(4, 5, generator=generator, dtype=torch.float64) * token_mask
    data = {
        "token_mask": token_mask,
        "sample_mask": torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64),
        "advantages": torch.tensor([1.0, -0.5, 2.0, 7.0], dtype=torch.float64)[:, None]
        * token_mask,
        "prev_logprobs": logprobs + 0.1 * torch.randn(4, 5, generator=generator).double(),
        "generation_logprobs": logprobs + 0.3 * torch.randn(4, 5, generator=generator).double(),
        "reference_policy_logprobs": logprobs - 0.2,
    }
    return logprobs.requires_grad_(), data


def entropies(data: dict) -> torch.Tensor:
    """Per-token entropies `[4, 5]` in (0, 3), 0 off the generated tokens, as the worker passes."""
    generator = torch.Generator().manual_seed(9)
    return 3 * torch.rand(4, 5, generator=generator, dtype=torch.float64) * data["token_mask"]


def counts(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mask = data["token_mask"] * data["sample_mask"][:, None]
    return data["sample_mask"].sum(), mask.sum()


def test_on_policy_ratio_is_one_and_the_gradient_is_the_policy_gradient() -> None:
    logprobs, data = rollout()
    del data["prev_logprobs"]
    loss, metrics = ClippedPGLossFn(config())(logprobs, data, *counts(data))
    loss.backward()
    mask = data["token_mask"] * data["sample_mask"][:, None]
    num_tokens = mask.sum()  # 9
    assert loss.item() == pytest.approx(-(data["advantages"] * mask).sum().item() / num_tokens)
    torch.testing.assert_close(logprobs.grad, -data["advantages"] * mask / num_tokens)
    assert metrics["clip_fraction"] == 0.0 and metrics["num_valid_samples"] == 3


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "sum_norm"])
def test_aggregations_by_hand(aggregation: str) -> None:
    logprobs, data = rollout(1)
    overrides = {"aggregation": aggregation}
    if aggregation == "sum_norm":
        overrides = {"aggregation": "seq_mean_token_sum_norm", "sum_norm_length": 8}
    loss, _ = ClippedPGLossFn(config(**overrides))(logprobs, data, *counts(data))
    # The per-token loss written out: -min(r A, clip(r) A) on the valid rows' generated tokens.
    ratio = torch.exp(logprobs - data["prev_logprobs"])
    advantages = data["advantages"]
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    rows = []
    for row in range(3):
        tokens = data["token_mask"][row] > 0
        rows.append(per_token[row][tokens].tolist())
    if aggregation == "token_mean":
        expected = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    elif aggregation == "seq_mean_token_mean":
        expected = sum(sum(r) / len(r) for r in rows) / 3
    else:
        expected = sum(sum(r) for r in rows) / (3 * 8)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_any_split_of_the_batch_gives_the_same_loss_and_gradient(aggregation: str) -> None:
    logprobs, data = rollout(2)
    entropy = entropies(data).requires_grad_()
    loss_fn = ClippedPGLossFn(
        config(aggregation=aggregation, reference_policy_kl_penalty=0.1, entropy_coef=0.01)
    )
    whole, whole_metrics = loss_fn(logprobs, data, *counts(data), entropy=entropy)
    whole_grads = torch.autograd.grad(whole, [logprobs, entropy])
    parts, entropy_metric, grads = 0.0, 0.0, []
    for rows in ([0], [1, 2, 3]):
        part_data = {key: value[rows] for key, value in data.items()}
        part_logprobs = logprobs.detach()[rows].requires_grad_()
        part_entropy = entropy.detach()[rows].requires_grad_()
        # global counts
        part, metrics = loss_fn(part_logprobs, part_data, *counts(data), entropy=part_entropy)
        parts += part.item()
        entropy_metric += metrics["entropy"]
        grads.append(torch.autograd.grad(part, [part_logprobs, part_entropy]))
    assert parts == pytest.approx(whole.item(), rel=1e-12)
    assert entropy_metric == pytest.approx(whole_metrics["entropy"], rel=1e-12)
    for index, whole_grad in enumerate(whole_grads):
        torch.testing.assert_close(torch.cat([grad[index] for grad in grads]), whole_grad)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "sum_norm"])
def test_entropy_bonus_by_hand(aggregation: str) -> None:
    logprobs, data = rollout(6)
    entropy = entropies(data).requires_grad_()
    overrides: dict = {"aggregation": aggregation}
    if aggregation == "sum_norm":
        overrides = {"aggregation": "seq_mean_token_sum_norm", "sum_norm_length": 8}
    without, without_metrics = ClippedPGLossFn(config(**overrides))(logprobs, data, *counts(data))
    loss_fn = ClippedPGLossFn(config(**overrides, entropy_coef=0.3))
    loss, metrics = loss_fn(logprobs, data, *counts(data), entropy=entropy)
    # L = L_pg - 0.3 * agg(H), with agg the policy loss's aggregation over the 3 valid rows.
    rows = [entropy[row][data["token_mask"][row] > 0].tolist() for row in range(3)]
    if aggregation == "token_mean":
        bonus = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    elif aggregation == "seq_mean_token_mean":
        bonus = sum(sum(r) / len(r) for r in rows) / 3
    else:
        bonus = sum(sum(r) for r in rows) / (3 * 8)
    assert loss.item() == pytest.approx(without.item() - 0.3 * bonus, rel=1e-9, abs=1e-12)
    # The metric is the token mean whatever the aggregation, and only when entropy is given.
    token_mean = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    assert metrics["entropy"] == pytest.approx(token_mean, rel=1e-9)
    assert "entropy" not in without_metrics
    assert loss_fn.needs_entropy and not ClippedPGLossFn(config()).needs_entropy
    # The gradient reaches the entropy of the valid rows' generated tokens only.
    (grad,) = torch.autograd.grad(loss, entropy)
    mask = data["token_mask"] * data["sample_mask"][:, None]
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask > 0] < 0)


def test_gspo_uses_one_ratio_per_completion() -> None:
    logprobs, data = rollout(3)
    loss, _ = ClippedPGLossFn(config(ratio_level="sequence", aggregation="seq_mean_token_mean"))(
        logprobs, data, *counts(data)
    )
    expected = 0.0
    for row in range(3):
        tokens = data["token_mask"][row] > 0
        log_ratio = (logprobs[row] - data["prev_logprobs"][row])[tokens].mean()
        ratio, advantage = torch.exp(log_ratio), data["advantages"][row][tokens][0]
        # Every token of the completion has the same loss, so its mean is that loss.
        expected += -min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage).item()
    assert loss.item() == pytest.approx(expected / 3, rel=1e-12)


def test_kl_in_the_loss_and_not_when_it_is_in_the_reward() -> None:
    logprobs, data = rollout(4)
    without, _ = ClippedPGLossFn(config())(logprobs, data, *counts(data))
    with_kl, metrics = ClippedPGLossFn(config(reference_policy_kl_penalty=0.5))(
        logprobs, data, *counts(data)
    )
    # log pi - log pi_ref = 0.2 everywhere: k3 = e^-0.2 - 1 + 0.2 on each of the 9 tokens.
    k3 = math.exp(-0.2) - 1 + 0.2
    assert with_kl.item() == pytest.approx(without.item() + 0.5 * k3, rel=1e-9)
    assert metrics["kl"] == pytest.approx(k3, rel=1e-9)
    in_reward, _ = ClippedPGLossFn(config(reference_policy_kl_penalty=0.5, kl_in_reward=True))(
        logprobs, data, *counts(data)
    )
    assert in_reward.item() == pytest.approx(without.item(), rel=1e-12)


def test_tis_weights_and_icepop_drops_tokens_against_the_generator() -> None:
    logprobs, data = rollout(5)
    mask = data["token_mask"] * data["sample_mask"][:, None]
    gap = torch.exp(data["prev_logprobs"] - data["generation_logprobs"])  # pi_train / pi_gen
    ratio = torch.exp(logprobs - data["prev_logprobs"])
    advantages = data["advantages"]
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    num_tokens = mask.sum()

    tis, _ = ClippedPGLossFn(config(importance_correction="tis", importance_max=1.1))(
        logprobs, data, *counts(data)
    )
    expected = (per_token * gap.clamp(max=1.1) * mask).sum() / num_tokens
    assert tis.item() == pytest.approx(expected.item(), rel=1e-12)

    icepop_cfg = config(importance_correction="icepop", importance_min=0.9, importance_max=1.1)
    icepop, metrics = ClippedPGLossFn(icepop_cfg)(logprobs, data, *counts(data))
    kept = ((gap >= 0.9) & (gap <= 1.1)).double()
    assert 0 < (kept * mask).sum() < num_tokens, "the test data must keep some tokens only"
    expected = (per_token * kept * mask).sum() / num_tokens
    assert icepop.item() == pytest.approx(expected.item(), rel=1e-12)
    dropped = ((1 - kept) * mask).sum() / num_tokens
    assert metrics["importance_dropped"] == pytest.approx(dropped.item())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aggregation": "seq_mean_token_sum_norm"}, "loss.sum_norm_length must be set"),
        ({"sum_norm_length": 8}, "loss.sum_norm_length must be set"),
        (
            {
                "ratio_level": "sequence",
                "aggregation": "seq_mean_token_sum_norm",
                "sum_norm_length": 8,
            },
            "ratio_level=sequence (GSPO)",
        ),
        ({"policy_loss": "cispo", "ratio_clip_c": 3.0}, "ratio_clip_c (dual clip) applies"),
        ({"importance_min": 2.0, "importance_max": 1.0}, "importance_min=2.0 must be below"),
    ],
)
def test_inconsistent_settings_are_one_line_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClippedPGLossFn(config(**overrides))


def test_kl_in_the_reward_is_summed_over_the_generated_tokens() -> None:
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0]], dtype=torch.float64)
    ref = logprobs - torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    got = kl_penalized_rewards(rewards, logprobs, ref, mask, beta=0.1, estimator="k1")
    assert got.tolist() == pytest.approx([1.0 - 0.1 * (0.5 + 0.5), 0.0 - 0.1 * 1.0])
