"""The engine with its built-in modules computes what the recipes compute, step for step.

Each run is the script a user runs (examples/engine/*.py next to examples/run_*.py), attached to
one Ray head for this module (`ray_head`, conftest.py); the comparisons read metrics.jsonl.
"""

from pathlib import Path

import pytest

from rl_toolkit.utils.logger import read_metrics
from tests.functional.recipe_runs import run_recipe

# Two runs a test, each a few minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def train_metrics(env: dict, out: Path, script: str, *overrides: str) -> list[dict]:
    """The train metrics of a run of `examples/<script>`, in step order."""
    out.mkdir()
    result = run_recipe(script, env, out, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    by_step = read_metrics(out / "logs" / "metrics.jsonl", "train")
    return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def test_dpo_engine_losses_equal_dpo_train(ray_head, tmp_path) -> None:
    recipe = train_metrics(
        ray_head, tmp_path / "recipe", "run_dpo.py", "dpo.max_num_steps=16", "dpo.val_period=0"
    )
    engine = train_metrics(
        ray_head, tmp_path / "engine", "engine/dpo.py", "runtime.num_episode=16",
        "runtime.eval_episode_interval=0", "runtime.eval_at_start=false",
    )  # fmt: skip
    assert [m["step"] for m in engine] == [m["step"] for m in recipe] == list(range(1, 17))
    for ours, theirs in zip(engine, recipe, strict=True):
        for key in ("loss", "accuracy", "reward_margin_mean", "grad_norm"):
            assert ours[f"ppo_policy/{key}"] == pytest.approx(theirs[key], abs=1e-6), (
                key,
                ours["step"],
            )


def test_grpo_engine_equals_grpo_train_on_the_tiny_task(ray_head, tmp_path) -> None:
    # One worker a module (sampling is seeded per row, so the rollouts do not depend on it):
    # the engine's four modules start 4 processes instead of 8.
    one_worker = [
        f"models.{name}.num_workers=1" for name in ("policy", "reference", "reward", "ppo_policy")
    ]
    common = ("grpo.sft_warmup_steps=0", "cluster.gpus_per_node=1")
    recipe = train_metrics(
        ray_head, tmp_path / "recipe", "run_grpo.py", *common, "grpo.max_num_steps=4",
        "grpo.val_period=0", "grpo.val_at_start=false",
    )  # fmt: skip
    engine = train_metrics(
        ray_head, tmp_path / "engine", "engine/grpo.py", *common, *one_worker, "runtime.num_episode=4",
        "runtime.eval_episode_interval=0", "runtime.eval_at_start=false",
    )  # fmt: skip
    assert [m["step"] for m in engine] == [m["step"] for m in recipe] == [1, 2, 3, 4]
    for ours, theirs in zip(engine, recipe, strict=True):
        assert ours["reward/reward"] == pytest.approx(theirs["reward"], abs=1e-6)
        for key in ("loss", "grad_norm"):
            assert ours[f"ppo_policy/{key}"] == pytest.approx(theirs[key], abs=1e-5), (
                key,
                ours["step"],
            )
    # The policy learned something at all: the steps are not all alike.
    assert len({round(m["ppo_policy/loss"], 6) for m in engine}) > 1


def test_rlhf_engine_equals_ppo_train_on_the_tiny_task(ray_head, tmp_path) -> None:
    # ChatLearn's six built-in modules in two colocation groups against ppo_train: 16 prompts x 4
    # a step (one policy step of 64 rows), two critic passes, the policy waiting one step.
    common = (
        "grpo.sft_warmup_steps=0", "grpo.num_prompts_per_step=16",
        "policy.train_global_batch_size=64", "ppo.critic_epochs=2", "ppo.critic_warmup_steps=1",
    )  # fmt: skip
    recipe = train_metrics(
        ray_head, tmp_path / "recipe", "run_ppo.py", *common, "critic.train_global_batch_size=64",
        "grpo.max_num_steps=3", "grpo.val_period=0", "grpo.val_at_start=false",
    )  # fmt: skip
    engine = train_metrics(
        ray_head, tmp_path / "engine", "engine/rlhf.py", *common, "runtime.num_episode=3",
        "runtime.sample_per_episode=16", "runtime.generation_batch_size=16",
        "runtime.eval_episode_interval=0", "runtime.eval_at_start=false",
    )  # fmt: skip
    assert [m["step"] for m in engine] == [m["step"] for m in recipe] == [1, 2, 3]
    pairs = {
        "reward/reward": "reward",
        "reward/critic/explained_variance": "critic/explained_variance",
        "ppo_value/loss": "critic/loss",
        "ppo_value/grad_norm": "critic/grad_norm",
    }
    for ours, theirs in zip(engine, recipe, strict=True):
        trained = ours["step"] > 1  # after the critic's warm-up step
        assert ("ppo_policy/loss" in ours) == ("loss" in theirs) == trained
        if trained:
            pairs |= {"ppo_policy/loss": "loss", "ppo_policy/grad_norm": "grad_norm"}
        for key, recipe_key in pairs.items():
            assert ours[key] == pytest.approx(theirs[recipe_key], abs=1e-5), (key, ours["step"])
