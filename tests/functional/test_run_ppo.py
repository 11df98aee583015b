"""examples/run_ppo.py end to end: the embedded default, as a user runs it, learns; and a run
resumed from one of its checkpoints redoes the next steps identically.

One test, to keep the suite's time down: the straight run, then a second run that starts from
what a kill right after the checkpoint of step 20 leaves (that folder and the logs, which hold
lines of later steps that the resumed run must drop), for two steps. The runs attach to one Ray
head started for this module (`ray_head`, conftest.py); every assertion reads what a user would:
the exit status, the console, metrics.jsonl and the checkpoint folders.
"""

import json
import shutil

import pytest

from rl_toolkit.utils.logger import read_metrics
from tests.functional.recipe_runs import run_recipe

pytestmark = pytest.mark.slow

STEPS, KILLED_AT = 30, 20  # the embedded default's steps; a checkpoint step (save_period 10)


def test_the_embedded_default_learns_and_resumes_identically(ray_head, tmp_path) -> None:
    straight = tmp_path / "straight"
    result = run_recipe("run_ppo.py", ray_head, straight, "checkpointing.keep_top_k=null")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = straight / "logs" / "metrics.jsonl"
    train, validation = read_metrics(metrics, "train"), read_metrics(metrics, "validation")
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(validation) == [0, 10, 20, 30]
    # The validation reward of 4 samples a prompt rises (about 0.15 -> 0.8 over the seeds tried),
    # and by the end the critic's values explain a good part of the returns' variance.
    assert validation[STEPS]["reward"] > validation[0]["reward"] + 0.3, validation
    last = [train[step]["critic/explained_variance"] for step in range(STEPS - 4, STEPS + 1)]
    assert sum(last) / len(last) > 0.3, last
    assert "loss" not in train[1] and "loss" in train[3]  # ppo.critic_warmup_steps: 2
    assert f"Done at step {STEPS}: validation reward" in result.stdout
    info = json.loads((straight / "ckpt" / f"step_{STEPS}" / "training_info.json").read_text())
    assert info["val_reward"] == validation[STEPS]["reward"]
    assert (straight / "ckpt" / f"step_{STEPS}" / "critic" / "optimizer").is_dir()

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "ckpt" / f"step_{KILLED_AT}", resumed / "ckpt" / f"step_{KILLED_AT}")
    shutil.copytree(straight / "logs", resumed / "logs")
    result = run_recipe("run_ppo.py", ray_head, resumed, f"grpo.max_num_steps={KILLED_AT + 2}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from" in result.stdout and "sft_warmup" not in result.stdout
    got = read_metrics(resumed / "logs" / "metrics.jsonl", "train")
    assert sorted(got) == list(range(1, KILLED_AT + 3))  # no step twice, none missing
    for step in (KILLED_AT + 1, KILLED_AT + 2):  # the same completions, values and updates
        for key in ("reward", "loss", "grad_norm", "critic/loss", "critic/grad_norm",
                    "critic/explained_variance", "response_length"):  # fmt: skip
            assert got[step][key] == train[step][key], (step, key)
