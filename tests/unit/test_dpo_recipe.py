"""dpo_train's control flow with a fake policy: stops, validation and save periods, resume."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rl_toolkit.algorithms import dpo
from rl_toolkit.algorithms.loss_functions import DPOLossFn
from rl_toolkit.algorithms.utils import open_run_folder
from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.data import build_dataloader, load_preference_dataset, tokenize_preference_dataset
from rl_toolkit.utils.checkpoint import CheckpointManager
from rl_toolkit.utils.config import load_config
from rl_toolkit.utils.hf import get_tokenizer
from rl_toolkit.utils.logger import Logger, read_metrics

REPO = Path(__file__).resolve().parents[2]


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

    def reference_logprobs(self, data, micro_batches):
        assert micro_batches == MicroBatches(packed=True, size=4096)  # policy.micro_batch.logprob
        self.calls.append(("reference", data.size))
        return {"reference_logprobs": torch.zeros(data["input_ids"].shape)}

    def train(self, data, loss_fn, micro_batches):
        assert micro_batches == MicroBatches(packed=True, size=2048)  # policy.micro_batch.train
        self.calls.append(("train", tuple(data["pair_ids"][0::2].tolist())))
        self.steps += 1
        return self._metrics(data, loss_fn)

    def evaluate(self, data, loss_fn, micro_batches):
        assert micro_batches == MicroBatches(packed=True, size=4096)
        self.calls.append(("eval", data.size))
        return self._metrics(data, loss_fn)

    def _metrics(self, data, loss_fn):
        # The real loss on all-zero log-probs: ln 2 per valid pair.
        logprobs = torch.zeros(data["input_ids"].shape)
        num_seqs = data["sample_mask"].sum()
        _, metrics = loss_fn(logprobs, data, num_seqs, (data["token_mask"].sum()))
        metrics = {**metrics, "global_num_tokens": int(data["input_lengths"].sum()), "lr": 0.1}
        return {key: float(value) for key, value in metrics.items()}  # as the workers' all-reduce

    def update_reference_model(self, mixup_alpha):
        self.calls.append(("sync", self.steps))

    def save_checkpoint(self, weights_path, optimizer_path=None, tokenizer_path=None):
        self.calls.append(("save", self.steps))
        Path(weights_path).mkdir(parents=True)
        (Path(weights_path) / "steps.json").write_text(json.dumps(self.steps))

    def export_hf(self, path, max_shard_size=None, export_lora="adapter"):
        self.calls.append(("export", (self.steps, max_shard_size)))
        Path(path).mkdir(parents=True)
        (Path(path) / "steps.json").write_text(json.dumps(self.steps))


@pytest.fixture(scope="module")
def tiny_data():
    config = load_config(REPO / "configs" / "dpo_tiny.yaml", schema=dpo.MasterConfig)
    config["policy"]["model_name"] = str(REPO / "assets" / "tiny_llama")
    config["policy"]["tokenizer"]["name"] = config["policy"]["model_name"]
    config["data"]["train_data_path"] = str(REPO / "assets" / "tiny_prefs" / "train.jsonl")
    config["data"]["val_data_path"] = str(REPO / "assets" / "tiny_prefs" / "val.jsonl")
    tokenizer = get_tokenizer(config["policy"]["tokenizer"])
    dataset = load_preference_dataset(config["data"])
    splits = {
        split: tokenize_preference_dataset(
            dataset.formatted_ds[split].select(range(n)),
            tokenizer,
            dataset.task_spec,
            config["data"],
            max_total_sequence_length=64,
        )
        for split, n in (("train", 24), ("validation", 10))
    }
    return config, tokenizer, splits


def run(tmp_path: Path, tiny_data, overrides: dict[str, dict[str, Any]], policy=None):
    """dpo_train on 24 train pairs (batches of 4 pairs: 6 steps an epoch), 10 val pairs."""
    base, tokenizer, splits = tiny_data
    config = json.loads(json.dumps(base))
    config["policy"]["train_global_batch_size"] = 8
    config["dpo"].update(val_global_batch_size=8, val_at_start=False)
    config["checkpointing"].update(checkpoint_dir=str(tmp_path / "ckpt"), save_period=100)
    config["logger"].update(log_dir=str(tmp_path / "logs"), tensorboard_enabled=False)
    for section, values in overrides.items():
        config[section].update(values)

    checkpointer, resume_path, state = open_run_folder(
        config, dpo._default_dpo_save_state(), dpo.DPOSaveState
    )
    train_dl = build_dataloader(
        splits["train"],
        tokenizer,
        config["data"],
        num_pairs=4,
        shuffle=True,
        seed=1,
        drop_last=True,
    )
    if resume_path is not None:
        train_dl.load_state_dict(torch.load(resume_path / "dataloader_state.pt"))
    val_dl = build_dataloader(
        splits["validation"],
        tokenizer,
        config["data"],
        num_pairs=4,
        shuffle=False,
        seed=1,
        drop_last=False,
    )
    policy = policy or FakePolicy()
    logger = Logger(config["logger"])
    final = dpo.dpo_train(
        policy,
        train_dl,
        val_dl,
        tokenizer,
        DPOLossFn(config["dpo"]),
        config,
        logger,
        checkpointer,
        state,
    )
    return (
        policy,
        final,
        read_metrics(Path(config["logger"]["log_dir"]) / "metrics.jsonl", "validation"),
    )


def names(policy: FakePolicy, kind: str) -> list[Any]:
    return [arg for name, arg in policy.calls if name == kind]


def test_stops_at_max_num_steps(tmp_path, tiny_data) -> None:
    policy, state, _ = run(tmp_path, tiny_data, {"dpo": {"max_num_steps": 4, "max_num_epochs": 10}})
    assert policy.steps == 4
    assert state == {
        "epoch": 0,
        "step": 4,
        "total_steps": 4,
        "consumed_samples": 16,
        "val_loss": pytest.approx(0.6931, abs=1e-4),
    }
    assert type(state["consumed_samples"]) is int  # a count, though the metrics are floats


def test_stops_at_max_num_epochs(tmp_path, tiny_data) -> None:
    policy, state, _ = run(
        tmp_path, tiny_data, {"dpo": {"max_num_steps": 100, "max_num_epochs": 2}}
    )
    assert policy.steps == 12
    assert (state["epoch"], state["step"], state["total_steps"]) == (2, 0, 12)


def test_validation_periods_and_partial_last_batch(tmp_path, tiny_data) -> None:
    overrides = {
        "dpo": {"max_num_steps": 5, "val_period": 2, "val_at_start": True, "val_batches": 0}
    }
    policy, _, val_metrics = run(tmp_path, tiny_data, overrides)
    # At start, after steps 2 and 4, and at the end (step 5).
    assert sorted(val_metrics) == [0, 2, 4, 5]
    # 10 validation pairs = batches of 4 + 4 + 2; the last is padded to 4 pairs, not dropped.
    assert names(policy, "eval") == [8, 8, 8] * 4
    for metrics in val_metrics.values():
        assert metrics["num_valid_samples"] == 10
        assert metrics["loss"] == pytest.approx(0.693147, abs=1e-5)
        assert metrics["accuracy"] == 0.0


def test_val_batches_limits_validation(tmp_path, tiny_data) -> None:
    policy, _, val_metrics = run(
        tmp_path, tiny_data, {"dpo": {"max_num_steps": 1, "val_batches": 1}}
    )
    assert names(policy, "eval") == [8]
    assert val_metrics[1]["num_valid_samples"] == 4


def test_reference_logprobs_every_batch_unless_reference_free(tmp_path, tiny_data) -> None:
    policy, _, _ = run(tmp_path / "a", tiny_data, {"dpo": {"max_num_steps": 3}})
    assert len(names(policy, "reference")) == 3 + 3  # 3 training batches, 3 validation batches
    free = {"dpo": {"max_num_steps": 3, "reference_free": True}}
    policy, _, _ = run(tmp_path / "b", tiny_data, free)
    assert names(policy, "reference") == []


def test_reference_sync_period(tmp_path, tiny_data) -> None:
    overrides = {"dpo": {"max_num_steps": 7, "sync_ref_model": True, "ref_model_sync_steps": 3}}
    policy, _, _ = run(tmp_path, tiny_data, overrides)
    assert names(policy, "sync") == [3, 6]


def test_save_period_end_and_retention(tmp_path, tiny_data) -> None:
    overrides = {
        "dpo": {"max_num_steps": 7, "val_period": 1},
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


def test_the_final_export_alone_is_pushed_to_the_hub(tmp_path, tiny_data, hub) -> None:
    overrides = {
        "dpo": {"max_num_steps": 5},
        "checkpointing": {
            "save_period": 2,
            "save_hf": True,
            "hf_max_shard_size": "20KB",
            "push_to_hub": "org/tiny-dpo",
        },
    }
    policy, _, _ = run(tmp_path, tiny_data, overrides)
    assert names(policy, "export") == [(2, 20_000), (4, 20_000), (5, 20_000)]
    assert hub.files == {"org/tiny-dpo": {"steps.json": b"5"}}
    assert hub.commits == [("org/tiny-dpo", "rl_toolkit: upload step_5")]


class Killed(BaseException):
    """A kill: nothing after the point where it is raised runs."""


def test_a_kill_right_after_a_checkpoint_keeps_the_metrics_of_its_step(
    tmp_path, tiny_data, monkeypatch
) -> None:
    finalize = CheckpointManager.finalize

    def finalize_then_die(self, tmp, step, training_info):
        finalize(self, tmp, step, training_info)
        raise Killed

    monkeypatch.setattr(CheckpointManager, "finalize", finalize_then_die)
    with pytest.raises(Killed):
        run(tmp_path, tiny_data, {"dpo": {"max_num_steps": 6}, "checkpointing": {"save_period": 4}})
    assert (tmp_path / "ckpt" / "step_4" / "training_info.json").is_file()
    # A resume from step_4 does not redo step 4: its metrics must be in the file already.
    assert sorted(read_metrics(tmp_path / "logs" / "metrics.jsonl", "train")) == [1, 2, 3, 4]


def test_resume_continues_where_the_checkpoint_left_off(tmp_path, tiny_data) -> None:
    ckpt = {"checkpointing": {"save_period": 4}}
    first, _, _ = run(tmp_path, tiny_data, {"dpo": {"max_num_steps": 4}, **ckpt})
    straight, _, _ = run(tmp_path / "straight", tiny_data, {"dpo": {"max_num_steps": 9}, **ckpt})
    resumed, state, _ = run(tmp_path, tiny_data, {"dpo": {"max_num_steps": 9}, **ckpt})
    assert resumed.steps == 5  # steps 5..9 only
    assert state["total_steps"] == 9 and (state["epoch"], state["step"]) == (1, 3)
    # The pairs after the resume are exactly those the straight run saw at steps 5..9.
    assert names(resumed, "train") == names(straight, "train")[4:]
    assert names(first, "train") == names(straight, "train")[:4]
