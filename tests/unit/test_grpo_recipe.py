"""The GRPO recipe's driver side: its config rules, sampling a step's rollout (dynamic sampling,
overlong filtering, the epoch's end), advantages, validation and the SFT warm-up batch, with a
fake generator and environment (no model, no Ray)."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rl_toolkit.algorithms.advantages import grpo_advantages, kl_penalized_rewards
from rl_toolkit.algorithms.grpo import (
    MasterConfig,
    check_config,
    compute_advantages,
    sample_rollout,
    validate,
)
from rl_toolkit.config_schema import resolve_local_paths
from rl_toolkit.data import answer_sft_batch, prompt_collate_fn
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.environments import EnvironmentResult
from rl_toolkit.models.generation.rollout import Responses, rollout_batch
from rl_toolkit.utils.config import ConfigError, load_config, load_yaml_with_defaults
from tests.unit.policy_testing import make_tokenizer

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "grpo.yaml"
TINY = REPO / "configs" / "grpo_tiny.yaml"
RECIPES = sorted((REPO / "configs" / "recipes").glob("grpo_*.yaml"))
PAD, EOS = 0, 1


def tiny(*overrides: str) -> MasterConfig:
    config = load_config(TINY, overrides, schema=MasterConfig)
    resolve_local_paths(config)
    return config


@pytest.mark.parametrize("path", [BASE, TINY, *RECIPES], ids=lambda p: p.name)
def test_configs_validate(path: Path) -> None:
    check_config(load_config(path, schema=MasterConfig))


def test_the_recipes_change_what_their_papers_change() -> None:
    names = {path.stem for path in RECIPES}
    assert names == {"grpo_dapo", "grpo_dr", "grpo_gspo"}
    dapo, dr, gspo = (
        load_config(REPO / "configs" / "recipes" / f"{name}.yaml", schema=MasterConfig)
        for name in ("grpo_dapo", "grpo_dr", "grpo_gspo")
    )
    assert dapo["loss_fn"]["ratio_clip_max"] > dapo["loss_fn"]["ratio_clip_min"]
    assert dapo["grpo"]["dynamic_sampling"]["enabled"] and dapo["grpo"]["overlong_filtering"]
    assert dr["grpo"]["adv_estimator"] == "dr_grpo"
    assert dr["loss_fn"]["aggregation"] == "seq_mean_token_sum_norm"
    assert dr["loss_fn"]["sum_norm_length"] == dr["policy"]["generation"]["max_new_tokens"]
    assert gspo["loss_fn"]["ratio_level"] == "sequence"


def test_the_embedded_default_and_recipes_only_set_keys_the_base_has() -> None:
    base = set(load_yaml_with_defaults(BASE).sources)
    for path in (TINY, *RECIPES):
        keys = set(load_yaml_with_defaults(path).sources)
        assert keys <= base | {k for k in keys if k.startswith("policy.scheduler")}, path
    config = tiny()
    assert config["policy"]["random_init"] is True and config["env"]["name"] == "tiny_first"
    assert config["loss_fn"]["reference_policy_kl_penalty"] == 0  # no reference model


def one_line_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        check_config(tiny(*overrides))
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["policy.train_global_batch_size=100"], "must be a multiple of grpo.num_generations"),
        (
            ["grpo.num_prompts_per_step=3", "policy.train_global_batch_size=16"],
            "= 24 rows per step must be a multiple of policy.train_global_batch_size=16",
        ),
        (
            ["policy.micro_batch.unit=rows", "policy.micro_batch.train=4"],
            "policy.micro_batch.train=4 rows must be a multiple of 8 (whole groups)",
        ),
        (["loss_fn.ratio_clip_c=1.0"], "'loss_fn.ratio_clip_c': input should be greater than 1"),
        (["env.name=nope"], "env.name='nope' is unknown"),
        (["grpo.adv_estimator=ppo"], "'grpo.adv_estimator': input should be 'grpo', 'dr_grpo'"),
        (["grpo.num_generations_per_prompt=1"], "grpo.num_generations_per_prompt=1: GRPO"),
        (
            ["loss_fn.ratio_level=sequence", "loss_fn.aggregation=seq_mean_token_sum_norm",
             "loss_fn.sum_norm_length=3"],
            "ratio_level=sequence (GSPO)",
        ),
        (["data.metadata_keys=[]"], "grpo.sft_warmup_answer_key='answer', which data.metadata"),
        (["checkpointing.metric_name=val_loss"], "rank checkpoints by 'val_reward'"),
        (["policy.max_total_sequence_length=3"], "leaves no room for a prompt"),
    ],
)  # fmt: skip
def test_config_mistakes_are_one_line(overrides: list[str], expected: str) -> None:
    try:
        message = one_line_error(*overrides)
    except ConfigError as error:  # a schema error, raised by load_config
        message = str(error)
    assert expected in message


def test_a_mistake_exits_2_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "run_grpo.py"), "loss_fn.ratio_clip_c=0.5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0 and "loss_fn.ratio_clip_c" in result.stderr
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------
# Sampling a step


class FakeGeneration:
    """Each row's response is one token: `10 + row_index_in_the_call`, truncated when the
    prompt id is odd; records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int, bool]] = []

    def generate(self, data: BatchedDataDict, *, step: int, greedy: bool = False):
        self.calls.append((data["prompt_ids"].tolist(), step, greedy))
        n = data.size
        responses = Responses(
            tokens=torch.arange(10, 10 + n)[:, None],
            logprobs=torch.full((n, 1), -0.5),
            lengths=torch.ones(n, dtype=torch.long),
            truncated=data["prompt_ids"] % 2 == 1,
        )
        return rollout_batch(data, responses, PAD)


class TableEnvironment:
    """Rewards from a table: prompt id -> the rewards of its G samples."""

    def __init__(self, table: dict[int, list[float]]) -> None:
        self.table = table

    def score(self, prompts: list[Any], completions: list[str], metadata: list[dict]):
        rewards, seen = [], {}
        for meta in metadata:
            prompt_id = meta["id"]
            rewards.append(self.table[prompt_id][seen.get(prompt_id, 0)])
            seen[prompt_id] = seen.get(prompt_id, 0) + 1
        return EnvironmentResult(rewards=rewards, metrics={"timeouts": 1.0})


def prompts(ids: list[int]) -> BatchedDataDict:
    items = [
        {"prompt_id": i, "input_ids": torch.tensor([5, 6, 7][: 1 + i % 3]), "prompt": f"p{i}",
         "metadata": {"id": i}}
        for i in ids
    ]  # fmt: skip
    return prompt_collate_fn(items, pad_token_id=PAD)


def grpo_section(**overrides: Any) -> dict[str, Any]:
    config = tiny()["grpo"]
    config |= {"num_prompts_per_step": 2, "num_generations_per_prompt": 2} | overrides
    return config


def sampler(batches: list[list[int]]):
    queue = [prompts(ids) for ids in batches]
    return lambda: queue.pop(0) if queue else None


def test_without_dynamic_sampling_a_step_is_one_prompt_batch() -> None:
    generation, env = FakeGeneration(), TableEnvironment({0: [1, 1], 2: [0, 1]})
    rollout, metrics = sample_rollout(
        generation, env, sampler([[0, 2], [4, 6]]), make_tokenizer(), grpo_section(), step=7
    )
    assert generation.calls == [([0, 0, 2, 2], 7, False)]
    assert rollout["rewards"].tolist() == [1, 1, 0, 1] and rollout.group_size == 2
    assert rollout["sample_idx"].tolist() == [0, 1, 0, 1]
    assert rollout["sample_mask"].tolist() == [1, 1, 1, 1]
    assert metrics["reward"] == 0.75 and metrics["zero_variance_groups"] == 0.5
    assert metrics["env/timeouts"] == 1.0 and metrics["gen_batches"] == 1


def test_dynamic_sampling_refills_zero_variance_groups_and_is_bounded() -> None:
    table = {0: [1, 1], 2: [0, 1], 4: [0, 0], 6: [1, 0], 8: [1, 0]}
    dynamic = {"enabled": True, "max_gen_batches": 3}
    config = grpo_section(dynamic_sampling=dynamic)
    rollout, metrics = sample_rollout(
        FakeGeneration(), TableEnvironment(table), sampler([[0, 2], [4, 6], [8]]),
        make_tokenizer(), config, step=0,
    )  # fmt: skip
    # Prompts 0 and 4 have no variance: 2 and 6 fill the step, in the order they came.
    assert rollout["prompt_ids"].tolist() == [2, 2, 6, 6]
    assert [m["id"] for m in rollout["metadata"]] == [2, 2, 6, 6]  # lists stay aligned
    assert rollout["sample_mask"].tolist() == [1, 1, 1, 1]
    assert metrics["gen_batches"] == 2 and metrics["filled_groups"] == 0
    assert metrics["reward"] == pytest.approx(4 / 8)  # every completion generated

    # Only 1 batch allowed: the set-aside group fills the step with sample_mask 0.
    config = grpo_section(dynamic_sampling=dynamic | {"max_gen_batches": 1})
    rollout, metrics = sample_rollout(
        FakeGeneration(), TableEnvironment(table), sampler([[0, 2]]), make_tokenizer(), config,
        step=0,
    )  # fmt: skip
    assert rollout["prompt_ids"].tolist() == [2, 2, 0, 0]
    assert rollout["sample_mask"].tolist() == [1, 1, 0, 0] and metrics["filled_groups"] == 1


def test_overlong_filtering_masks_truncated_completions() -> None:
    rollout, metrics = sample_rollout(
        FakeGeneration(), TableEnvironment({2: [0, 1], 3: [1, 0]}), sampler([[2, 3]]),
        make_tokenizer(), grpo_section(overlong_filtering=True), step=0,
    )  # fmt: skip
    assert rollout["truncated"].tolist() == [False, False, True, True]
    assert rollout["sample_mask"].tolist() == [1, 1, 0, 0] and metrics["truncated"] == 0.5


def test_no_prompts_left_ends_the_epoch() -> None:
    assert sample_rollout(
        FakeGeneration(), TableEnvironment({}), sampler([]), make_tokenizer(), grpo_section(),
        step=0,
    ) is None  # fmt: skip


def test_advantages_per_group_with_the_kl_in_the_reward() -> None:
    rollout = BatchedDataDict(
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]),
        token_mask=torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 0, 1]]).float(),
        generation_logprobs=torch.tensor([[0, -1, -2], [0, -1, 0], [0, -0.5, -1], [0, 0, -3]]),
        reference_policy_logprobs=torch.full((4, 3), -1.0),
        group_size=2,
    )
    config = tiny("grpo.num_generations_per_prompt=2")
    advantages = compute_advantages(rollout, config)
    expected = grpo_advantages(rollout["rewards"], 2)
    torch.testing.assert_close(advantages, expected[:, None] * rollout["token_mask"])
    assert advantages[2:].abs().max() == 0  # a zero-variance group: 0, not NaN

    config = tiny(
        "grpo.num_generations_per_prompt=2", "loss_fn.reference_policy_kl_penalty=0.1",
        "loss_fn.kl_in_reward=true",
    )  # fmt: skip
    shaped = kl_penalized_rewards(
        rollout["rewards"], rollout["generation_logprobs"], rollout["reference_policy_logprobs"],
        rollout["token_mask"], beta=0.1, estimator="k3",
    )  # fmt: skip
    assert not torch.equal(shaped, rollout["rewards"])
    torch.testing.assert_close(
        compute_advantages(rollout, config),
        grpo_advantages(shaped, 2)[:, None] * rollout["token_mask"],
    )


# ---------------------------------------------------------------------------------------------
# Validation and the warm-up


class ValLoader(list):
    pass


def test_validation_is_greedy_with_one_generation_and_reports_pass_at_k() -> None:
    loader = ValLoader([prompts([0, 1, 2]), prompts([3, 4])])
    table = {i: [float(i == 1), 1.0, 0.0] for i in range(5)}
    config = tiny(
        "grpo.max_val_samples=4", "grpo.num_val_samples_to_log=2", "grpo.val_num_generations=1"
    )
    generation = FakeGeneration()
    metrics, samples = validate(
        generation, loader, TableEnvironment(table), make_tokenizer(), 5, config
    )
    assert [call[2] for call in generation.calls] == [True, True]  # greedy
    assert generation.calls[1][0] == [3]  # stopped at max_val_samples prompts
    assert metrics["reward"] == 0.25 and "pass@1" not in metrics
    assert [s["prompt"] for s in samples] == ["p0", "p1"] and samples[1]["reward"] == 1.0

    config = tiny("grpo.max_val_samples=5", "grpo.val_num_generations=3")
    generation = FakeGeneration()
    metrics, _ = validate(generation, loader, TableEnvironment(table), make_tokenizer(), 5, config)
    assert [call[2] for call in generation.calls] == [False, False]
    assert generation.calls[0][1] == -6  # validation seeds differ from every training step's
    assert metrics["reward"] == pytest.approx((5 + 1) / 15)
    assert metrics["pass@3"] == 1.0


def test_the_warm_up_batch_learns_the_answer_and_eos() -> None:
    tokenizer = make_tokenizer()  # one word a token, t0 .. t63; t0 pads, t1 ends
    batch = prompts([0, 1])  # prompt tokens [5] and [5, 6]
    sft = answer_sft_batch(batch, ["t9", "t7"], tokenizer, max_total_sequence_length=4)
    assert sft["input_ids"].tolist() == [[5, 9, 1, 0], [5, 6, 7, 1]]
    assert sft["token_mask"].tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert sft["input_lengths"].tolist() == [3, 4] and sft["sample_ids"].tolist() == [0, 1]
    cut = answer_sft_batch(batch, ["t9"], tokenizer, max_total_sequence_length=2)
    assert cut["input_ids"].tolist() == [[5, 9]]  # the first tokens kept
    assert cut["token_mask"].tolist() == [[0, 1]]
