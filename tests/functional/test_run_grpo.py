"""examples/run_grpo.py end to end: the embedded default on two CPU workers, as a user runs it.

The runs attach to one Ray head started for the test session (`ray_head`, conftest.py). Every
assertion reads what a user would: the exit status, the console, metrics.jsonl, samples.jsonl
and the checkpoint folders.
"""

import json
from pathlib import Path

import pytest

from rl_toolkit.utils.logger import read_metrics
from tests.functional.recipe_runs import run_recipe

pytestmark = pytest.mark.slow

# The embedded default as it ships (30 steps, validation and a checkpoint every 10).
SAVING = ["checkpointing.keep_top_k=null"]


def run_grpo(env: dict, out: Path, *overrides: str, crash_at_step: int | None = None):
    """examples/run_grpo.py; with `crash_at_step` it dies right after that step's checkpoint is
    complete, before anything else happens."""
    return run_recipe(
        "run_grpo.py", env, out, *SAVING, *overrides, crash_point="after_finalize",
        crash_at_step=crash_at_step,
    )  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(ray_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_grpo(ray_head, out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_the_embedded_default_learns(straight_run) -> None:
    out, result = straight_run
    metrics = out / "logs" / "metrics.jsonl"
    train, validation = read_metrics(metrics, "train"), read_metrics(metrics, "validation")
    warmup = read_metrics(metrics, "sft_warmup")[0]
    assert sorted(train) == list(range(1, 31)) and sorted(validation) == [0, 10, 20, 30]
    # The warm-up teaches the answer's format; GRPO then raises the reward of 4 samples a
    # validation prompt clearly (about 0.2 -> 0.8 over the shipped seeds).
    assert warmup["steps"] == 20 and warmup["loss"] < warmup["first_loss"] / 2
    assert validation[30]["reward"] > validation[0]["reward"] + 0.3, validation
    assert validation[30]["pass@4"] >= validation[30]["reward"]
    assert train[30]["reward"] > train[1]["reward"]
    assert "Done at step 30: validation reward" in result.stdout
    assert (
        "[validation] step 30 | reward" in result.stdout and "[sample] step 30 |" in result.stdout
    )
    samples = [json.loads(line) for line in (out / "logs" / "samples.jsonl").open()]
    assert [s["step"] for s in samples] == [0, 0, 10, 10, 20, 20, 30, 30]
    assert set(samples[0]) == {"step", "prompt", "completion", "reward"}
    for step in (10, 20, 30):
        info = json.loads((out / "ckpt" / f"step_{step}" / "training_info.json").read_text())
        assert info["total_steps"] == step and info["val_reward"] == validation[step]["reward"]
        assert info["consumed_samples"] == 128 * step


def test_killed_after_a_checkpoint_resumes_bit_identically(
    ray_head, straight_run, tmp_path
) -> None:
    straight, _ = straight_run
    crashed = run_grpo(ray_head, tmp_path, crash_at_step=10)  # dies like SIGKILL
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    assert (tmp_path / "ckpt" / "step_10").is_dir()

    # Two more steps (the last one validates and saves) are enough to see the same completions
    # sampled and the same updates made: every metric of a step depends on both.
    resumed = run_grpo(ray_head, tmp_path, "grpo.max_num_steps=12")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from" in resumed.stdout and "sft_warmup" not in resumed.stdout

    expected, got = (
        read_metrics(run / "logs" / "metrics.jsonl", "train") for run in (straight, tmp_path)
    )
    assert sorted(got) == list(range(1, 13))  # no step twice, none missing
    for step in (11, 12):
        for key in ("reward", "loss", "grad_norm", "response_length", "global_num_tokens"):
            assert got[step][key] == expected[step][key], (step, key)
