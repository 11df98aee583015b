"""The PPO recipe's driver side: its configs and their rules, the advantages (KL in the reward,
GAE, whitening) and a step's critic and policy updates, with a fake policy and critic (no model,
no Ray)."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rl_toolkit.algorithms import ppo
from rl_toolkit.algorithms.advantages import gae, masked_whiten, token_rewards
from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn, ValueLossFn, kl_estimate
from rl_toolkit.config_schema import MicroBatches, resolve_local_paths
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.utils.config import ConfigError, load_config, load_yaml_with_defaults
from rl_toolkit.utils.hf import check_trained_model
from rl_toolkit.utils.timer import Timer

REPO = Path(__file__).resolve().parents[2]
BASE, TINY = REPO / "configs" / "ppo.yaml", REPO / "configs" / "ppo_tiny.yaml"
REWARD_MODEL = (
    "{model_name: m, tokenizer: {name: m, chat_template: null}, precision: float32, "
    "micro_batch: {unit: tokens, size: 64}, max_total_sequence_length: 32, "
    "attn_implementation: nope, fsdp: {activation_checkpointing: false, cpu_offload: false, "
    "reshard_after_forward: true}}"
)


def tiny(*overrides: str) -> ppo.MasterConfig:
    config = load_config(TINY, overrides, schema=ppo.MasterConfig)
    resolve_local_paths(config)
    return config


@pytest.mark.parametrize("path", [BASE, TINY], ids=lambda p: p.name)
def test_configs_validate(path: Path) -> None:
    ppo.check_config(load_config(path, schema=ppo.MasterConfig))


def test_the_embedded_default_only_sets_keys_the_bases_have() -> None:
    base = set(load_yaml_with_defaults(BASE).sources)
    keys = set(load_yaml_with_defaults(TINY).sources)
    assert keys <= base | {k for k in keys if ".scheduler" in k}
    config = tiny()
    assert config["reward_model"] is None and config["env"]["name"] == "tiny_first"
    assert config["critic"]["random_init"] and config["critic"]["seed"] == config["policy"]["seed"]
    assert load_config(BASE, schema=ppo.MasterConfig)["loss_fn"]["kl_in_reward"] is True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["critic.train_global_batch_size=30"], "critic.train_global_batch_size=30 must be a "
         "multiple of grpo.num_generations_per_prompt=4"),
        (["critic.train_global_batch_size=512"], "must be a multiple of "
         "critic.train_global_batch_size=512 (whole optimizer steps)"),
        (["critic.micro_batch.unit=rows", "critic.micro_batch.train=6"],
         "critic.micro_batch.train=6 rows must be a multiple of 4"),
        (["critic.optimizer.kwargs.lr=-1"], "critic.optimizer.kwargs.lr must be a number > 0"),
        (["critic.optimizer.name=torch.optim.Nope"], "critic.optimizer.name: cannot import"),
        (["critic.attn_implementation=nope"], "critic.attn_implementation='nope'"),
        (["ppo.gae_lambda=1.5"], "'ppo.gae_lambda': input should be less than or equal to 1"),
        (["ppo.critic_epochs=0"], "'ppo.critic_epochs'"),
        (["value_loss_fn.value_clip=0"], "'value_loss_fn.value_clip'"),
        ([f"reward_model={REWARD_MODEL}"], "reward_model.attn_implementation='nope'"),
    ],
)  # fmt: skip
def test_config_mistakes_are_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        ppo.check_config(tiny(*overrides))  # a schema error is raised by load_config already
    assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_one_sample_per_prompt_is_ppo_but_not_grpo() -> None:
    overrides = ("grpo.num_generations_per_prompt=1", "grpo.num_prompts_per_step=256")
    ppo.check_config(tiny(*overrides))  # the critic is the baseline
    from rl_toolkit.algorithms.grpo import check_config as check_grpo
    from tests.unit.test_grpo_recipe import tiny as grpo_tiny

    with pytest.raises(ConfigError, match="GRPO compares a completion with the others"):
        check_grpo(grpo_tiny(*overrides))


def test_a_critic_mistake_exits_2_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "run_ppo.py"),
         "critic.train_global_batch_size=30"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "critic.train_global_batch_size=30" in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_critic_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^critic.model_name: .* set critic.random_init=true"):
        check_trained_model(str(tmp_path), random_init=False, section="critic")
    with pytest.raises(ConfigError, match=r"^critic.model_name: .* does not exist"):
        check_trained_model(str(tmp_path / "none"), random_init=True, section="critic")


# ---------------------------------------------------------------------------------------------
# Advantages and a step


def rollout(num_rows: int = 8) -> BatchedDataDict:
    """A scored rollout of 8 rows (groups of 4, the second group masked out), 6 positions."""
    generator = torch.Generator().manual_seed(0)
    token_mask = torch.zeros(num_rows, 6)
    for row in range(num_rows):
        token_mask[row, 2 : 3 + row % 4] = 1.0
    return BatchedDataDict(
        input_ids=torch.randint(3, 40, (num_rows, 6), generator=generator),
        input_lengths=(token_mask.sum(dim=1) + 2).long(),
        token_mask=token_mask,
        sample_mask=torch.tensor([1.0] * 4 + [0.0] * 4),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]),
        generation_logprobs=-torch.rand(num_rows, 6, generator=generator) * token_mask,
        reference_policy_logprobs=-torch.rand(num_rows, 6, generator=generator) * token_mask,
        values=torch.randn(num_rows, 6, generator=generator) * token_mask,
        group_size=4,
    )


def test_advantages_are_gae_of_the_kl_shaped_token_rewards_whitened() -> None:
    data = rollout()
    config = tiny("loss_fn.reference_policy_kl_penalty=0.1", "ppo.gae_lambda=0.9")
    advantages, returns = ppo.compute_advantages(data, config)
    kl = kl_estimate(data["generation_logprobs"], data["reference_policy_logprobs"], "k1")
    rewards = token_rewards(data["rewards"], data["token_mask"], kl=kl, beta=0.1)
    raw, expected_returns = gae(rewards, data["values"], data["token_mask"], gamma=1.0, lam=0.9)
    valid = data["token_mask"] * data["sample_mask"][:, None]
    torch.testing.assert_close(advantages, masked_whiten(raw, valid))
    torch.testing.assert_close(returns, expected_returns)
    assert advantages[valid > 0].mean().abs() < 1e-6  # whitened over the valid tokens only

    unshaped = tiny("loss_fn.reference_policy_kl_penalty=0.1", "loss_fn.kl_in_reward=false",
                    "ppo.whiten_advantages=false", "ppo.gae_lambda=0.9")  # fmt: skip
    advantages, _ = ppo.compute_advantages(data, unshaped)
    plain = token_rewards(data["rewards"], data["token_mask"], kl=None, beta=0.0)
    torch.testing.assert_close(advantages, gae(plain, data["values"], data["token_mask"],
                                               gamma=1.0, lam=0.9)[0])  # fmt: skip


class FakeCritic:
    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.steps = values, []

    def get_values(self, data, micro_batches):
        assert micro_batches == MicroBatches(packed=True, size=4096)  # critic.micro_batch.logprob
        return {"values": self.values}

    def train(self, data, loss_fn, micro_batches):
        assert isinstance(loss_fn, ValueLossFn) and set(data) == set(ppo.CRITIC_KEYS)
        self.steps.append(data.size)
        tokens = float((data["token_mask"] * data["sample_mask"][:, None]).sum())
        return {"loss": 0.5, "global_num_tokens": tokens, "num_valid_samples": 2.0, "lr": 1.0}


class FakePolicy:
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def train(self, data, loss_fn, micro_batches):
        self.steps.append(data)
        return {"loss": -0.25, "global_num_tokens": 9.0, "num_valid_samples": 4.0}

    def logprobs(self, data, micro_batches):
        return {"logprobs": torch.zeros(data["input_ids"].shape)}


@pytest.mark.parametrize("train_policy", [True, False])
def test_a_step_trains_the_critic_for_its_epochs_and_the_policy_after_its_warm_up(
    train_policy: bool,
) -> None:
    data = rollout()
    values = data.pop("values")
    config = tiny("ppo.critic_epochs=3", "critic.train_global_batch_size=4",
                  "policy.train_global_batch_size=8")  # fmt: skip
    critic, policy = FakeCritic(values), FakePolicy()
    metrics = ppo.train_on_rollout(
        policy, critic, data, ClippedPGLossFn(config["loss_fn"]), ValueLossFn({"value_clip": 0.2}),
        config, Timer(), train_policy=train_policy,
    )  # fmt: skip
    assert critic.steps == [4, 4] * 3  # 3 passes of 2 optimizer steps
    assert metrics["critic/loss"] == 0.5 and "critic/explained_variance" in metrics
    assert metrics["num_valid_samples"] == 4.0  # the step's rows, counted once
    if not train_policy:
        assert policy.steps == [] and "loss" not in metrics
        return
    (batch,) = policy.steps  # one optimizer step: the ratio is 1, no prev_logprobs
    torch.testing.assert_close(batch["advantages"], ppo.compute_advantages(data, config)[0])
    assert "prev_logprobs" not in batch and metrics["loss"] == -0.25
