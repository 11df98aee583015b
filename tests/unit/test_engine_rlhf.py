"""The RLHF engine's built-in modules in this process (world size 1, no Ray): RewardInference
scores with a reward model and adds ppo_train's advantages; whitening over shards whose moments
are summed (its all-reduce) equals whitening over the batch; the configs' rules."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rl_toolkit.algorithms import ppo
from rl_toolkit.algorithms.advantages import explained_variance
from rl_toolkit.config_schema import resolve_local_paths
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.engine.builtin import RewardInference, RuleReward, ValueTrainer
from rl_toolkit.engine.module import EngineError, ModuleWorker
from rl_toolkit.models.reward.reward_model import reward_model_input
from rl_toolkit.utils.config import ConfigError, load_config
from tests.unit.policy_testing import make_tokenizer, reward_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def rlhf_config(*overrides: str) -> dict:
    config = load_config(CONFIGS / "engine_rlhf.yaml", list(overrides))
    resolve_local_paths(config)
    return config


def rollout() -> BatchedDataDict:
    """8 completions of 2 prompts (groups of 4) in make_tokenizer's vocabulary, with values; the
    last row was truncated."""
    generator = torch.Generator().manual_seed(0)
    token_mask = torch.zeros(8, 7)
    for row in range(8):
        token_mask[row, 3 : 4 + row % 4] = 1.0
    return BatchedDataDict(
        input_ids=torch.randint(2, 64, (8, 7), generator=generator),
        input_lengths=(token_mask.sum(dim=1) + 3).long(),
        token_mask=token_mask,
        sample_mask=torch.ones(8),
        truncated=torch.tensor([False] * 7 + [True]),
        generation_logprobs=-torch.rand(8, 7, generator=generator) * token_mask,
        values=torch.randn(8, 7, generator=generator) * token_mask,
        prompts=["t5 t6 t7"] * 4 + ["t9 t8 t7"] * 4,
        metadata=[{}] * 8,
        group_size=4,
    )


def test_reward_inference_scores_with_the_reward_model_and_adds_ppo_advantages(
    tiny, reward_checkpoint
) -> None:
    config = rlhf_config(
        f"policy.tokenizer.name={tiny[0]}", "grpo.overlong_filtering=true",
        "loss_fn.reference_policy_kl_penalty=0.0",
    )  # fmt: skip
    config["reward_model"] = reward_config(reward_checkpoint)
    worker = ModuleWorker(module=RewardInference("reward"), config=config)
    data = rollout()
    out = worker.step(data, "forward_step", {})

    # The reward model's score of each prompt and completion text, as Hugging Face computes it.
    tokenizer, model = make_tokenizer(), AutoModelForSequenceClassification.from_pretrained(
        reward_checkpoint
    ).eval()  # fmt: skip
    expected = []
    for row in range(8):
        completion = tokenizer.decode(data["input_ids"][row][data["token_mask"][row].bool()])
        ids = reward_model_input(
            tokenizer, data["prompts"][row], completion, max_length=32, where=""
        )
        with torch.no_grad():
            expected.append(model(torch.tensor([ids])).logits[0, 0].item())
    torch.testing.assert_close(out["rewards"], torch.tensor(expected), atol=1e-5, rtol=0)

    # ppo_train's advantages and returns of the same rollout, the truncated row masked out.
    scored = BatchedDataDict({**data, "rewards": out["rewards"]}, group_size=4)
    scored["sample_mask"] = torch.tensor([1.0] * 7 + [0.0])
    advantages, returns = ppo.compute_advantages(scored, config)
    torch.testing.assert_close(out["sample_mask"], scored["sample_mask"])
    torch.testing.assert_close(out["advantages"], advantages)
    torch.testing.assert_close(out["returns"], returns)
    metrics = worker.get_and_clear_metrics()
    valid = data["token_mask"] * scored["sample_mask"][:, None]
    assert metrics["critic/explained_variance"] == pytest.approx(
        explained_variance(data["values"], returns, valid)
    )
    # Evaluation completions (no values): the rewards alone.
    evaluated = worker.step(BatchedDataDict({k: data[k] for k in data if k != "values"}),
                            "forward_step", {})  # fmt: skip
    torch.testing.assert_close(evaluated["rewards"], out["rewards"])
    assert "advantages" not in evaluated


def test_shards_with_summed_moments_whiten_as_the_whole_batch() -> None:
    # What RewardInference's all-reduce does, with the shards in one process.
    config = rlhf_config("loss_fn.reference_policy_kl_penalty=0.1")
    data = rollout()
    data["reference_policy_logprobs"] = data["generation_logprobs"] * 0.5
    data["rewards"] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    whole, returns = ppo.compute_advantages(data, config)
    shards = [data.slice(0, 4), data.slice(4, 8)]
    moments: list[torch.Tensor] = []
    for shard in shards:
        ppo.compute_advantages(shard, config, reduce=lambda m: moments.append(m) or m)
    total = moments[0] + moments[1]
    parts = [ppo.compute_advantages(s, config, reduce=lambda _: total)[0] for s in shards]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)

    mask = data["token_mask"]
    summed = sum(
        explained_variance_moments(s["values"], r, s["token_mask"])
        for s, r in zip(shards, returns.split(4), strict=True)
    )
    sharded = explained_variance(shards[0]["values"], returns[:4], shards[0]["token_mask"],
                                 reduce=lambda _: summed)  # fmt: skip
    assert sharded == pytest.approx(explained_variance(data["values"], returns, mask))


def explained_variance_moments(values, returns, mask) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    explained_variance(values, returns, mask, reduce=lambda m: captured.append(m) or m)
    return captured[0]


@pytest.mark.parametrize(
    ("module", "overrides", "expected"),
    [
        (ValueTrainer("ppo_value"), ["critic.train_global_batch_size=64"],
         r"^critic.train_global_batch_size=64 must equal runtime.train_global_batch_size=256"),
        (ValueTrainer("ppo_value"), ["models.ppo_value.num_workers=2"],
         r"^models.ppo_value.num_workers=2 must equal cluster.gpus_per_node x .* critic section"),
        (RewardInference("reward"), ["env.name=no_such_reward"], r"no_such_reward"),
        (RewardInference("reward"), ["grpo.sft_warmup_steps=5"],
         r"^grpo.sft_warmup_steps: not supported by the engine's built-in modules"),
    ],
)  # fmt: skip
def test_rlhf_config_mistakes_are_one_line(module, overrides: list[str], expected: str) -> None:
    module._config = rlhf_config(*overrides)
    with pytest.raises(ConfigError, match=expected):
        module.check_args()


def test_ppo_modules_need_a_ppo_config() -> None:
    grpo = load_config(CONFIGS / "engine_grpo.yaml")
    resolve_local_paths(grpo)
    for module in (RewardInference("reward"), ValueTrainer("ppo_value")):
        module._config = grpo
        with pytest.raises(EngineError, match="needs a `ppo` config"):
            module.check_args()
    rule = RuleReward("reward")
    rule._config = rlhf_config()
    rule.check_args()  # a rule reward scores PPO's completions too (without advantages)


def test_a_value_trainer_checkpoint_resumes_its_steps_exactly(tmp_path) -> None:
    # The built-in trainers' checkpoints (weights, optimizer) through ModuleWorker, in process.
    config = rlhf_config("ppo.critic_epochs=2")
    data = rollout()
    data["input_ids"] = data["input_ids"] % 41  # assets/tiny_llama's vocabulary
    data["returns"] = torch.linspace(0, 1, 8)[:, None] * data["token_mask"]
    micro_batches = [data.slice(0, 4), data.slice(4, 8)]
    first = ModuleWorker(module=ValueTrainer("ppo_value"), config=config)
    first.train_step(micro_batches, iteration=0, episode=0)
    first.save_checkpoint(str(tmp_path / "ppo_value"))
    expected = first.train_step(micro_batches, iteration=1, episode=1)
    first.shutdown()

    resumed = ModuleWorker(module=ValueTrainer("ppo_value"), config=config)
    resumed.load_checkpoint(str(tmp_path / "ppo_value"))
    assert resumed.train_step(micro_batches, iteration=1, episode=1) == expected
    assert expected["global_num_tokens"] == data["input_lengths"].sum().item()  # one pass counted
