"""examples/run_dpo.py end to end on the embedded tiny model, two CPU workers.

The runs attach to one Ray head started for this module (`ray_head`, conftest.py), as on a
cluster, so each pays for its own workers but not for a Ray start. Every assertion reads what a
user would: the exit status, the console, metrics.jsonl and the checkpoint folders.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl_toolkit.utils.logger import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LN2 = 0.6931471805599453
TINY = [
    "dpo.max_num_steps=8",
    "dpo.val_period=4",
    "dpo.val_batches=1",
    "dpo.val_at_start=true",
    "policy.train_global_batch_size=32",
    "policy.train_micro_batch_size=8",
    "checkpointing.save_period=4",
    "checkpointing.keep_top_k=null",
    "checkpointing.save_hf=true",
    "cluster.gpus_per_node=2",
]


def run_dpo(
    env: dict, out: Path, *overrides: str, script: str = "examples/run_dpo.py", cwd: Path = REPO
):
    args = [
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        f"logger.log_dir={out / 'logs'}",
        *TINY,
        *overrides,
    ]
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def hf_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def straight_run(ray_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_dpo(ray_head, out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_training_learns_validates_and_checkpoints(straight_run) -> None:
    out, result = straight_run
    train = read_metrics(out / "logs" / "metrics.jsonl", "train")
    validation = read_metrics(out / "logs" / "metrics.jsonl", "validation")
    assert sorted(train) == list(range(1, 9))
    assert train[1]["loss"] == pytest.approx(LN2, abs=1e-4)  # policy == reference at step 1
    assert train[8]["loss"] < train[1]["loss"] - 0.02
    assert sorted(validation) == [0, 4, 8]  # at start, every val_period, at the end
    assert validation[0]["accuracy"] == 0.0 and validation[8]["accuracy"] > 0.5
    assert validation[8]["loss"] < validation[0]["loss"]
    assert "[validation] step 8" in result.stdout and "step 8/8" in result.stdout

    for step in (4, 8):
        checkpoint = out / "ckpt" / f"step_{step}"
        info = json.loads((checkpoint / "training_info.json").read_text())
        assert info["total_steps"] == step and info["val_loss"] == validation[step]["loss"]
        for name in ("config.yaml", "dataloader_state.pt", "rng_state.pt", "hf/config.json"):
            assert (checkpoint / name).is_file(), name
        for part in ("weights", "optimizer"):  # sharded: one file per worker
            assert len(list((checkpoint / "policy" / part).glob("*.distcp"))) == 2, part
    model = AutoModelForCausalLM.from_pretrained(out / "ckpt" / "step_8" / "hf")
    assert sum(p.numel() for p in model.parameters()) == 136_640


def test_killed_while_saving_resumes_exactly_from_last_complete_checkpoint(
    ray_head, straight_run, tmp_path
) -> None:
    straight, _ = straight_run
    # The process dies (os._exit, like SIGKILL: no cleanup) in the middle of saving step 8.
    crashed = run_dpo(ray_head, tmp_path, script="tests/functional/crash_while_saving.py")
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    assert (tmp_path / "ckpt" / "tmp_step_8").is_dir()  # the half-written checkpoint
    assert not (tmp_path / "ckpt" / "step_8").exists()

    resumed = run_dpo(ray_head, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from" in resumed.stdout and "step_4" in resumed.stdout
    assert not (tmp_path / "ckpt" / "tmp_step_8").exists()

    expected = read_metrics(straight / "logs" / "metrics.jsonl", "train")
    got = read_metrics(tmp_path / "logs" / "metrics.jsonl", "train")  # later lines win
    for step in range(5, 9):
        for key in ("loss", "accuracy", "reward_margin_mean", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(expected[step][key], abs=1e-5), (step, key)
    # A reference re-anchored to the resumed weights would give exactly ln 2 at step 5.
    assert abs(got[5]["loss"] - LN2) > 1e-3
    expected_weights = hf_weights(straight / "ckpt" / "step_8")
    for name, tensor in hf_weights(tmp_path / "ckpt" / "step_8").items():
        torch.testing.assert_close(tensor, expected_weights[name], atol=1e-5, rtol=0)


def test_resume_never_starts_a_fresh_folder(ray_head, straight_run, tmp_path) -> None:
    straight, _ = straight_run
    shutil.copytree(straight / "ckpt", tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    # From another working directory: the embedded config and its assets are found all the same.
    result = run_dpo(
        ray_head, tmp_path, "checkpointing.resume=never", "dpo.max_num_steps=1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert (tmp_path / "ckpt-1" / "step_1" / "training_info.json").is_file()
    assert (tmp_path / "logs-1" / "metrics.jsonl").is_file()  # the new run's logs apart too
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.sft_los_weight=0.1", "did you mean 'dpo.sft_loss_weight'"),
        ("data.train_data_path=assets/tiny_prefs/nope.jsonl", "assets/tiny_prefs/nope.jsonl"),
        ("policy.model_name=assets/no_such_model", "assets/no_such_model"),
        ("dpo.reference_policy_kl_penalty=-1", "dpo.reference_policy_kl_penalty"),
        ("policy.attn_implementation=flashy", "policy.attn_implementation='flashy'"),
        ("policy.max_grad_norm=-1", "'policy.max_grad_norm': input should be greater than 0"),
        ("dpo.val_global_batch_size=6", "dpo.val_global_batch_size=6 must split into whole pairs"),
        # Found once Ray is up (the head has 4 CPUs), before any placement group or worker.
        ("cluster.gpus_per_node=8", "8 workers, one CPU each, but the Ray cluster has 4 CPUs"),
    ],
)
def test_bad_input_fails_before_any_worker_starts(ray_head, tmp_path, override, message) -> None:
    result = run_dpo(ray_head, tmp_path, override)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    # One line, the last (Ray's own start-up lines may come before it).
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert "RayVirtualCluster" not in result.stdout + result.stderr  # no cluster, no workers
    assert not (tmp_path / "ckpt").exists()
