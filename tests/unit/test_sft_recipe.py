"""sft_train's control flow with a fake policy: stops, validation (token-weighted, partial last
batch), save periods and retention, resume."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rl_toolkit.algorithms import sft
from rl_toolkit.algorithms.loss_functions import NLLLossFn
from rl_toolkit.algorithms.utils import open_run_folder
from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.data import build_sft_dataloader
from rl_toolkit.data.sft import SFTDataset, tokenize_sft_dataset
from rl_toolkit.utils.checkpoint import load_dataloader_state
from rl_toolkit.utils.config import load_config
from rl_toolkit.utils.hf import get_tokenizer
from rl_toolkit.utils.logger import Logger, read_metrics

REPO = Path(__file__).resolve().parents[2]


def fake_logprobs(data) -> torch.Tensor:
    """-(1 + sample_id % 3) at every position: a per-row NLL to check how batches are weighted."""
    nll = 1.0 + data["sample_ids"].clamp(min=0) % 3  # (B,)
    return -nll[:, None].float().expand(data["input_ids"].shape)  # (B, T)


class FakeWorkers:
    """The workers' side of FakePolicy: a worker method goes to the fake's method of its name."""

    def __init__(self, policy: "FakePolicy") -> None:
        self.policy = policy

    def all(self, method, *args, **kwargs) -> list:
        return [getattr(self.policy, method.__name__)(*args, **kwargs)]


class FakePolicy:
    """Records what the recipe asks of it; 'trains' by counting steps."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.steps = 0
        self.workers = FakeWorkers(self)

    def train(self, data, loss_fn, micro_batches):
        assert micro_batches == MicroBatches(packed=True, size=1024)  # policy.micro_batch.train
        self.calls.append(("train", tuple(data["sample_ids"].tolist())))
        self.steps += 1
        return self._metrics(data, loss_fn)

    def evaluate(self, data, loss_fn, micro_batches):
        assert micro_batches == MicroBatches(packed=True, size=2048)  # .logprob
        self.calls.append(("eval", data.size))
        return self._metrics(data, loss_fn)

    def _metrics(self, data, loss_fn):
        assert data.group_size == 1
        num_tokens = (data["token_mask"] * data["sample_mask"][:, None]).sum()
        _, metrics = loss_fn(fake_logprobs(data), data, data["sample_mask"].sum(), num_tokens)
        # The worker replaces the loss's count by its own global count, the same number.
        metrics["num_valid_tokens"] = float(num_tokens)
        metrics = {**metrics, "global_num_tokens": int(data["input_lengths"].sum()), "lr": 0.1}
        return {key: float(value) for key, value in metrics.items()}  # as the workers' all-reduce

    def save_checkpoint(self, weights_path, optimizer_path=None, tokenizer_path=None):
        self.calls.append(("save", self.steps))
        Path(weights_path).mkdir(parents=True)
        (Path(weights_path) / "steps.json").write_text(json.dumps(self.steps))

    def export_hf(self, path, max_shard_size=None, export_lora="adapter"):
        Path(path).mkdir(parents=True)


@pytest.fixture(scope="module")
def tiny_data():
    config = load_config(REPO / "configs" / "sft_tiny.yaml", schema=sft.MasterConfig)
    config["policy"]["tokenizer"]["name"] = str(REPO / "assets" / "tiny_llama")
    config["data"]["train_data_path"] = str(REPO / "assets" / "tiny_sft" / "train.jsonl")
    config["data"]["val_data_path"] = str(REPO / "assets" / "tiny_sft" / "val.jsonl")
    tokenizer = get_tokenizer(config["policy"]["tokenizer"])
    dataset = SFTDataset(config["data"])
    splits = {
        split: tokenize_sft_dataset(
            dataset.formatted_ds[split].select(range(n)),
            tokenizer,
            dataset.task_spec,
            config["data"],
            max_total_sequence_length=64,
        )
        for split, n in (("train", 24), ("validation", 10))
    }
    return config, tokenizer, splits, dataset.task_spec


def run(tmp_path: Path, tiny_data, overrides: dict[str, dict[str, Any]]):
    """sft_train on 24 train rows (batches of 4: 6 steps an epoch), 10 val rows (batches of 4)."""
    base, tokenizer, splits, task_spec = tiny_data
    config = json.loads(json.dumps(base))
    config["policy"]["train_global_batch_size"] = 4
    config["sft"].update(val_global_batch_size=4, val_at_start=False)
    config["checkpointing"].update(checkpoint_dir=str(tmp_path / "ckpt"), save_period=100)
    config["logger"].update(log_dir=str(tmp_path / "logs"), tensorboard_enabled=False)
    for section, values in overrides.items():
        config[section].update(values)

    checkpointer, resume_path, state = open_run_folder(
        config, sft._default_sft_save_state(), sft.SFTSaveState
    )
    loaders = [
        build_sft_dataloader(
            splits[name], tokenizer, config["data"], batch_size=4, shuffle=shuffle, seed=1,
            drop_last=shuffle,
        )
        for name, shuffle in (("train", True), ("validation", False))
    ]  # fmt: skip
    if resume_path is not None:
        loaders[0].load_state_dict(load_dataloader_state(resume_path))
    policy = FakePolicy()
    logger = Logger(config["logger"])
    final = sft.sft_train(
        policy, *loaders, tokenizer, NLLLossFn(), config, logger, task_spec, checkpointer, state
    )
    return policy, final, read_metrics(tmp_path / "logs" / "metrics.jsonl", "validation")


def names(policy: FakePolicy, kind: str) -> list[Any]:
    return [arg for name, arg in policy.calls if name == kind]


def expected_val_loss(tiny_data) -> float:
    """The mean NLL per learned token of the 10 validation rows, from fake_logprobs."""
    val = tiny_data[2]["validation"]
    nll = sum((1 + item["sample_id"] % 3) * item["token_mask"].sum() for item in val)
    return float(nll / sum(item["token_mask"].sum() for item in val))


def test_stops_at_max_num_steps(tmp_path, tiny_data) -> None:
    policy, state, _ = run(tmp_path, tiny_data, {"sft": {"max_num_steps": 4, "max_num_epochs": 9}})
    assert policy.steps == 4
    assert state == {
        "epoch": 0,
        "step": 4,
        "total_steps": 4,
        "consumed_samples": 16,
        "val_loss": pytest.approx(expected_val_loss(tiny_data), abs=1e-6),
    }
    assert type(state["consumed_samples"]) is int  # a count, though the metrics are floats


def test_stops_at_max_num_epochs(tmp_path, tiny_data) -> None:
    policy, state, _ = run(tmp_path, tiny_data, {"sft": {"max_num_steps": 99, "max_num_epochs": 2}})
    assert policy.steps == 12
    assert (state["epoch"], state["step"], state["total_steps"]) == (2, 0, 12)
    # Two epochs: every training row twice, in two different orders.
    rows = [row for batch in names(policy, "train") for row in batch]
    assert sorted(rows) == sorted(list(range(24)) * 2) and rows[:24] != rows[24:]


def test_validation_is_token_weighted_over_every_row(tmp_path, tiny_data) -> None:
    overrides = {"sft": {"max_num_steps": 5, "val_period": 2, "val_at_start": True}}
    policy, _, val_metrics = run(tmp_path, tiny_data, overrides)
    assert sorted(val_metrics) == [0, 2, 4, 5]  # at start, every val_period, at the end
    # 10 validation rows = batches of 4 + 4 + 2; the last is padded to 4 rows, not dropped.
    assert names(policy, "eval") == [4, 4, 4] * 4
    num_tokens = sum(item["token_mask"].sum() for item in tiny_data[2]["validation"])
    for metrics in val_metrics.values():
        assert metrics["num_valid_samples"] == 10 and metrics["num_valid_tokens"] == num_tokens
        # Rows of 5 or 10 learned tokens: the mean of the batch losses (1.9333) or of the rows'
        # (1.9) would differ from this (1.9286).
        assert metrics["loss"] == pytest.approx(expected_val_loss(tiny_data), abs=1e-6)


def test_val_batches_limits_validation(tmp_path, tiny_data) -> None:
    overrides = {"sft": {"max_num_steps": 1, "val_batches": 1}}
    policy, _, val_metrics = run(tmp_path, tiny_data, overrides)
    assert names(policy, "eval") == [4]
    assert val_metrics[1]["num_valid_samples"] == 4


def test_save_period_end_and_retention(tmp_path, tiny_data) -> None:
    overrides = {
        "sft": {"max_num_steps": 7, "val_period": 1},
        "checkpointing": {"save_period": 2, "keep_top_k": 1, "save_hf": True},
    }
    policy, state, _ = run(tmp_path, tiny_data, overrides)
    assert names(policy, "save") == [2, 4, 6, 7]
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "step_7" in kept and len(kept) <= 2
    step_7 = tmp_path / "ckpt" / "step_7"
    for name in ("training_info.json", "config.yaml", "dataloader_state.pt", "rng_state.pt", "hf"):
        assert (step_7 / name).exists(), name
    info = json.loads((step_7 / "training_info.json").read_text())
    assert info["total_steps"] == 7 and info["val_loss"] == pytest.approx(state["val_loss"])


def test_resume_continues_where_the_checkpoint_left_off(tmp_path, tiny_data) -> None:
    ckpt = {"checkpointing": {"save_period": 4}}
    first, _, _ = run(tmp_path, tiny_data, {"sft": {"max_num_steps": 4}, **ckpt})
    straight, _, _ = run(tmp_path / "straight", tiny_data, {"sft": {"max_num_steps": 9}, **ckpt})
    resumed, state, _ = run(tmp_path, tiny_data, {"sft": {"max_num_steps": 9}, **ckpt})
    assert resumed.steps == 5  # steps 5..9 only
    assert state["total_steps"] == 9 and (state["epoch"], state["step"]) == (1, 3)
    # The rows after the resume are exactly those the straight run saw at steps 5..9.
    assert names(resumed, "train") == names(straight, "train")[4:]
    assert names(first, "train") == names(straight, "train")[:4]
