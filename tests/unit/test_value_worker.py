"""The plain value and reward-model workers in this process (world size 1, gloo), without Ray:
values and scores against the Hugging Face model, initialisation from a policy or a reward
checkpoint, Bradley-Terry training and its export as a reward model, checkpoints."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from rl_toolkit.algorithms.loss_functions import BradleyTerryLossFn, ValueLossFn
from rl_toolkit.config_schema import CriticConfig, MicroBatches
from rl_toolkit.data.tokenization import tokenize_prompt, tokenize_response
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.reward.reward_model import reward_model_batch, reward_model_input
from rl_toolkit.models.reward.worker import RewardModelWorker
from rl_toolkit.models.value.worker import ValueWorker
from rl_toolkit.utils.config import ConfigError
from rl_toolkit.utils.hf import check_reward_model
from tests.unit.policy_testing import (
    PAD_ID,
    make_batch,
    make_config,
    make_tokenizer,
    reward_config,
)

PADDED = MicroBatches(packed=False, size=4)
PACKED = MicroBatches(packed=True, size=40)


def critic_config(model_dir: Path, **overrides) -> CriticConfig:
    policy = make_config(model_dir)
    keys = CriticConfig.__annotations__
    return copy.deepcopy({k: v for k, v in policy.items() if k in keys} | overrides)


def new_critic(model_dir: Path, **kwargs) -> ValueWorker:
    return ValueWorker(
        config=critic_config(model_dir), tokenizer=make_tokenizer(), section="critic",
        init_optimizer=True, **kwargs,
    )  # fmt: skip


def hf_head_outputs(model: torch.nn.Module, data: BatchedDataDict) -> torch.Tensor:
    """`[N, T]` the HF model's head at every position, each row run alone (no padding)."""
    outputs = torch.zeros(data["input_ids"].shape)
    with torch.no_grad():
        for row, length in enumerate(data["input_lengths"].tolist()):
            hidden = model.model(data["input_ids"][row : row + 1, :length]).last_hidden_state
            outputs[row, :length] = model.score(hidden)[0, :, 0]
    return outputs


def exported(worker: ValueWorker, path: Path) -> LlamaForSequenceClassification:
    worker.export_hf(str(path))
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def test_values_are_the_head_on_the_state_before_each_response_token(tiny, tmp_path) -> None:
    """A critic from a policy checkpoint: the policy's backbone, a seeded new head; values
    equal the HF model's head at t - 1, padded or packed."""
    path, policy = tiny
    worker = new_critic(path)
    model = exported(worker, tmp_path / "critic")
    backbone = {k: v for k, v in policy.state_dict().items() if k.startswith("model.")}
    for name, weight in backbone.items():
        torch.testing.assert_close(model.state_dict()[name], weight, atol=0, rtol=0)
    data = make_batch(seed=1, num_pairs=3)
    expected = torch.nn.functional.pad(hf_head_outputs(model, data)[:, :-1], (1, 0))
    expected *= data["token_mask"]
    for micro_batches in (PADDED, PACKED):
        values = worker.get_values(data, micro_batches)["values"]
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    again = new_critic(path)  # the new head is seeded by critic.seed: the same in every run
    torch.testing.assert_close(
        again.get_values(data, PACKED)["values"], expected, atol=1e-5, rtol=0
    )


def test_a_critic_from_a_reward_model_keeps_its_head(reward_checkpoint, tmp_path) -> None:
    worker = new_critic(reward_checkpoint)
    head = exported(worker, tmp_path / "critic").score.weight
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_checkpoint)
    torch.testing.assert_close(head, reward_model.score.weight, atol=0, rtol=0)


def test_reward_model_scores_equal_hf_logits_at_the_last_token(reward_checkpoint) -> None:
    data = make_batch(seed=2, num_pairs=3)
    worker = RewardModelWorker(config=reward_config(reward_checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(reward_checkpoint).eval()
    with torch.no_grad():
        expected = torch.stack(
            [
                model(data["input_ids"][row : row + 1, :length]).logits[0, 0]
                for row, length in enumerate(data["input_lengths"].tolist())
            ]
        )
    for micro_batches in (PADDED, PACKED):
        rewards = worker.score(data, micro_batches)["rewards"]
        torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)


def test_a_bradley_terry_step_exports_a_reward_model_ppo_can_use(tiny, tmp_path) -> None:
    worker = new_critic(tiny[0])
    data = make_batch(seed=3)
    loss_fn = BradleyTerryLossFn()
    losses = [worker.train(data, loss_fn, PACKED)["loss"] for _ in range(3)]
    assert losses[2] < losses[0]
    model = exported(worker, tmp_path / "rm")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    scores = worker.get_scores(data, PADDED)["scores"]
    with torch.no_grad():
        logits = model(data["input_ids"], attention_mask=(data["input_ids"] != PAD_ID).long())
    torch.testing.assert_close(logits.logits[:, 0], scores, atol=1e-5, rtol=0)
    rewards = RewardModelWorker(config=reward_config(tmp_path / "rm")).score(data, PACKED)
    torch.testing.assert_close(rewards["rewards"], scores, atol=1e-5, rtol=0)


def test_a_checkpoint_resumes_the_critic_exactly(tiny, tmp_path) -> None:
    data = BatchedDataDict(make_batch(seed=4), group_size=2)
    data["values"] = torch.zeros(data["input_ids"].shape)
    data["returns"] = data["token_mask"] * torch.linspace(-1, 1, data.size)[:, None]
    loss_fn = ValueLossFn({"value_clip": 0.2})
    worker = new_critic(tiny[0])
    worker.train(data, loss_fn, PACKED)
    worker.save_checkpoint(str(tmp_path / "weights"), str(tmp_path / "optimizer"))
    expected = worker.train(data, loss_fn, PACKED)
    resumed = new_critic(
        tiny[0], weights_path=str(tmp_path / "weights"), optimizer_path=str(tmp_path / "optimizer")
    )
    got = resumed.train(data, loss_fn, PACKED)
    for key in ("loss", "grad_norm", "value_clip_fraction"):
        assert got[key] == expected[key], key
    worker.export_hf(str(tmp_path / "a"))
    resumed.export_hf(str(tmp_path / "b"))
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_the_reward_model_reads_prompt_and_completion_as_its_training_pairs(
    reward_checkpoint,
) -> None:
    tokenizer = make_tokenizer()  # no chat template: plain text, EOS appended
    ids = reward_model_input(tokenizer, "t5 t6", "t7 t8", max_length=32, where="row 0")
    prompt = tokenize_prompt(tokenizer, "t5 t6", "x")
    assert ids == prompt + tokenize_response(tokenizer, "t5 t6", prompt, "t7 t8", "c", "x")
    assert ids[-1] == tokenizer.eos_token_id
    assert reward_model_input(tokenizer, "t5 t6", "t7 t8", max_length=3, where="row 0") == ids[-3:]

    # What RewardModel.score sends its workers: each text's tokens, scored as HF scores them.
    prompts, completions = ["t5 t6", "t9", "t7 t7 t8"], ["t3 t4", "t9 t9 t9", ""]
    batch = reward_model_batch(tokenizer, prompts, completions, max_length=32)
    rewards = RewardModelWorker(config=reward_config(reward_checkpoint)).score(batch, PACKED)
    model = AutoModelForSequenceClassification.from_pretrained(reward_checkpoint).eval()
    with torch.no_grad():
        expected = [
            model(torch.tensor([reward_model_input(tokenizer, p, c, max_length=32, where="")]))
            .logits[0, 0]
            .item()
            for p, c in zip(prompts, completions, strict=True)
        ]
    assert rewards["rewards"].tolist() == pytest.approx(expected, abs=1e-5)


def test_only_a_one_label_classifier_is_taken_as_a_reward_model(tiny, reward_checkpoint) -> None:
    check_reward_model(str(reward_checkpoint), "reward_model.model_name")
    with pytest.raises(ConfigError, match=r"^reward_model.model_name: .* is not a reward model"):
        check_reward_model(str(tiny[0]), "reward_model.model_name")  # a causal LM's checkpoint
