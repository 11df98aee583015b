"""examples/run_ppo.py end to end: the embedded default, as a user runs it, learns; and a run
resumed from one of its checkpoints redoes the next steps identically.

One straight run (a module fixture, so that each test stays within the suite's per-test
timeout), and a run that dies like SIGKILL right after its step-10 checkpoint and is then
resumed for two steps. The runs attach to one Ray head started for this module (`ray_head`,
conftest.py); every assertion reads what a user would: the exit status, the console,
metrics.jsonl and the checkpoint folders.
"""

import json

import pytest

from rl_toolkit.utils.logger import read_metrics
from tests.functional.recipe_runs import run_recipe

pytestmark = pytest.mark.slow

STEPS, KILLED_AT = 30, 10  # the embedded default's steps; a checkpoint step (save_period 10)


@pytest.fixture(scope="module")
def straight_run(ray_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_recipe("run_ppo.py", ray_head, out, "checkpointing.keep_top_k=null")
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_the_embedded_default_learns(straight_run) -> None:
    out, result = straight_run
    metrics = out / "logs" / "metrics.jsonl"
    train, validation = read_metrics(metrics, "train"), read_metrics(metrics, "validation")
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(validation) == [0, 10, 20, 30]
    # The validation reward of 4 samples a prompt rises (0.12 -> 0.72 and 0.15 -> 0.84 for the
    # seeds tried), and by the end the critic's values explain a good part of the returns'
    # variance (a mean of about 0.5 over the last 5 steps; at most about 0.6 on this task).
    assert validation[STEPS]["reward"] > validation[0]["reward"] + 0.3, validation
    last = [train[step]["critic/explained_variance"] for step in range(STEPS - 4, STEPS + 1)]
    assert sum(last) / len(last) > 0.3, last
    assert "loss" not in train[2] and "loss" in train[3]  # ppo.critic_warmup_steps: 2
    assert f"Done at step {STEPS}: validation reward" in result.stdout
    info = json.loads((out / "ckpt" / f"step_{STEPS}" / "training_info.json").read_text())
    assert info["val_reward"] == validation[STEPS]["reward"]
    assert (out / "ckpt" / f"step_{STEPS}" / "critic" / "optimizer").is_dir()


def test_killed_after_a_checkpoint_resumes_bit_identically(
    ray_head, straight_run, tmp_path
) -> None:
    straight, _ = straight_run
    crashed = run_recipe(
        "run_ppo.py", ray_head, tmp_path, crash_point="after_finalize", crash_at_step=KILLED_AT
    )  # dies like SIGKILL
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    assert (tmp_path / "ckpt" / f"step_{KILLED_AT}" / "critic").is_dir()
    result = run_recipe("run_ppo.py", ray_head, tmp_path, f"grpo.max_num_steps={KILLED_AT + 2}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from" in result.stdout and "sft_warmup" not in result.stdout

    expected = read_metrics(straight / "logs" / "metrics.jsonl", "train")
    got = read_metrics(tmp_path / "logs" / "metrics.jsonl", "train")
    assert sorted(got) == list(range(1, KILLED_AT + 3))  # no step twice, none missing
    for step in (KILLED_AT + 1, KILLED_AT + 2):  # the same completions, values and updates
        for key in ("reward", "loss", "grad_norm", "critic/loss", "critic/grad_norm",
                    "critic/explained_variance", "response_length"):  # fmt: skip
            assert got[step][key] == expected[step][key], (step, key)
