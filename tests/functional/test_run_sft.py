"""examples/run_sft.py end to end: the embedded default on two CPU workers, as a user runs it.

The runs attach to one Ray head started for the test session (`ray_head`, conftest.py). Every
assertion reads what a user would: the exit status, the console, metrics.jsonl and the
checkpoint folders.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl_toolkit.data.sft import tokenize_sft_row
from rl_toolkit.utils.logger import read_metrics
from tests.functional.recipe_runs import run_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# The embedded default as it ships (128 steps, validation every 32), saving every 32 steps.
SAVING = [
    "checkpointing.save_period=32",
    "checkpointing.keep_top_k=null",
    "checkpointing.save_hf=true",
]


def run_sft(env: dict, out: Path, *overrides: str, crash_at_step: int | None = None):
    """examples/run_sft.py; with `crash_at_step` it dies while saving that step's checkpoint."""
    return run_recipe(
        "run_sft.py", env, out, *SAVING, *overrides, crash_point="saving",
        crash_at_step=crash_at_step,
    )  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(ray_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_sft(ray_head, out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def hf_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "hf" / "model.safetensors")


def test_the_embedded_default_learns_validates_and_checkpoints(straight_run) -> None:
    out, result = straight_run
    train = read_metrics(out / "logs" / "metrics.jsonl", "train")
    validation = read_metrics(out / "logs" / "metrics.jsonl", "validation")
    assert sorted(train) == list(range(1, 129))
    assert sorted(validation) == [0, 32, 64, 96, 128]  # at start, every val_period, at the end
    # A random model's loss per assistant token is about ln 41 = 3.71; the copy rule brings it
    # near 0. Every validation sees all 128 conversations.
    assert validation[0]["loss"] > 3.5 and validation[128]["loss"] < 0.1
    assert validation[96]["loss"] < validation[32]["loss"] < validation[0]["loss"]
    assert all(metrics["num_valid_samples"] == 128 for metrics in validation.values())
    assert "[validation] step 128 | loss" in result.stdout and "step 128/128" in result.stdout
    assert "Done at step 128: sft validation loss" in result.stdout

    for step in (32, 64, 96, 128):
        checkpoint = out / "ckpt" / f"step_{step}"
        info = json.loads((checkpoint / "training_info.json").read_text())
        assert info["total_steps"] == step and info["val_loss"] == validation[step]["loss"]
        assert info["consumed_samples"] == 32 * step
        for name in ("config.yaml", "dataloader_state.pt", "rng_state.pt", "hf/config.json"):
            assert (checkpoint / name).is_file(), name
        for part in ("weights", "optimizer"):  # sharded: one file per worker
            assert len(list((checkpoint / "policy" / part).glob("*.distcp"))) == 2, part


def test_the_hf_export_scores_validation_as_training_did(straight_run) -> None:
    # The exported model, loaded by plain transformers, gives the run's last validation loss.
    out, _ = straight_run
    export = out / "ckpt" / "step_128" / "hf"
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    rows = [json.loads(line) for line in (REPO / "assets/tiny_sft/val.jsonl").open()]
    nll, num_tokens = 0.0, 0.0
    with torch.no_grad():
        for row in rows:
            ids, mask = tokenize_sft_row(tokenizer, row, "chat", "val")
            input_ids = torch.tensor([ids])  # (1, T)
            logprobs = torch.log_softmax(model(input_ids).logits[0, :-1].float(), -1)
            target = logprobs.gather(1, input_ids[0, 1:, None]).squeeze(1)  # (T - 1,)
            learned = torch.tensor(mask[1:], dtype=torch.float32)
            nll -= float((target * learned).sum())
            num_tokens += float(learned.sum())
    validation = read_metrics(out / "logs" / "metrics.jsonl", "validation")
    assert num_tokens == validation[128]["num_valid_tokens"]
    assert nll / num_tokens == pytest.approx(validation[128]["loss"], abs=1e-4)


def test_killed_while_saving_resumes_bit_identically(ray_head, straight_run, tmp_path) -> None:
    straight, _ = straight_run
    # The process dies (os._exit, like SIGKILL: no cleanup) in the middle of saving step 64.
    crashed = run_sft(ray_head, tmp_path, crash_at_step=64)
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    assert (tmp_path / "ckpt" / "tmp_step_64").is_dir()  # the half-written checkpoint
    assert not (tmp_path / "ckpt" / "step_64").exists()

    # The resumed run stops at step 64 (the schedule is constant after its warm-up, so the
    # steps are those of the 128-step run): steps 33-64 are compared with the uninterrupted run.
    resumed = run_sft(ray_head, tmp_path, "sft.max_num_steps=64")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from" in resumed.stdout and "step_32" in resumed.stdout
    assert not (tmp_path / "ckpt" / "tmp_step_64").exists()

    expected = read_metrics(straight / "logs" / "metrics.jsonl", "train")
    got = read_metrics(tmp_path / "logs" / "metrics.jsonl", "train")
    assert sorted(got) == list(range(1, 65))  # no step twice, none missing
    for step in range(33, 65):
        for key in ("loss", "grad_norm", "lr", "num_valid_tokens"):
            assert got[step][key] == expected[step][key], (step, key)
    expected_val = read_metrics(straight / "logs" / "metrics.jsonl", "validation")
    got_val = read_metrics(tmp_path / "logs" / "metrics.jsonl", "validation")
    assert got_val[64]["loss"] == expected_val[64]["loss"]
    expected_weights = hf_weights(straight / "ckpt" / "step_64")
    for name, tensor in hf_weights(tmp_path / "ckpt" / "step_64").items():
        assert torch.equal(tensor, expected_weights[name]), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.val_perod=3", "did you mean 'sft.val_period'"),
        ("policy.train_global_batch_size=33", "must split evenly over 2 workers"),
    ],
)
def test_bad_input_fails_before_any_worker_starts(ray_head, tmp_path, override, message) -> None:
    assert_fails_before_any_worker(run_sft(ray_head, tmp_path, override), message, tmp_path)


def test_a_bad_row_is_named_by_file_and_row(ray_head, tmp_path) -> None:
    rows = (REPO / "assets" / "tiny_sft" / "train.jsonl").read_text().splitlines()[:40]
    rows[29] = json.dumps({"messages": [{"role": "user", "content": "copy: cat"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    result = run_sft(ray_head, tmp_path, f"data.train_data_path={bad}")
    message = f"{bad}, row 30: 'messages' has no assistant message"
    assert_fails_before_any_worker(result, message, tmp_path)


def assert_fails_before_any_worker(
    result: subprocess.CompletedProcess, message: str, out: Path
) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # One line, the last (Ray's own start-up lines may come before it).
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "RayVirtualCluster" not in result.stdout + result.stderr  # no cluster, no workers
    assert not (out / "ckpt").exists()
