"""Reward-model training: its configs and their rules, and rm_train on DPO's embedded pairs with
one in-process value worker (no Ray): Bradley-Terry lowers the validation loss, and the final
checkpoint's hf/ is a reward model that AutoModelForSequenceClassification loads."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rl_toolkit.algorithms import rm
from rl_toolkit.algorithms.utils import open_run_folder
from rl_toolkit.config_schema import resolve_local_paths
from rl_toolkit.data import build_dataloader, load_preference_dataset, tokenize_preference_dataset
from rl_toolkit.models.value.worker import ValueWorker
from rl_toolkit.utils.config import ConfigError, load_config, load_yaml_with_defaults
from rl_toolkit.utils.hf import get_tokenizer
from rl_toolkit.utils.logger import Logger, read_metrics

REPO = Path(__file__).resolve().parents[2]
BASE, TINY = REPO / "configs" / "rm.yaml", REPO / "configs" / "rm_tiny.yaml"


def tiny(*overrides: str) -> rm.MasterConfig:
    config = load_config(TINY, overrides, schema=rm.MasterConfig)
    resolve_local_paths(config)
    return config


@pytest.mark.parametrize("path", [BASE, TINY], ids=lambda p: p.name)
def test_configs_validate(path: Path) -> None:
    rm.check_config(load_config(path, schema=rm.MasterConfig))


def test_the_embedded_default_only_sets_keys_the_base_has() -> None:
    base = set(load_yaml_with_defaults(BASE).sources)
    keys = set(load_yaml_with_defaults(TINY).sources)
    assert keys <= base | {k for k in keys if k.startswith("policy.scheduler")}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["policy.train_global_batch_size=63"], "must split into whole pairs"),
        (["rm.val_global_batch_size=7"], "rm.val_global_batch_size=7 must split"),
        (["policy.optimizer.kwargs.lr=0"], "policy.optimizer.kwargs.lr must be a number > 0"),
    ],
)
def test_config_mistakes_are_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        rm.check_config(tiny(*overrides))
    assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


class InProcessModel:
    """ValueModel's interface on one worker in this process: calls by method go to it."""

    section = "policy"

    def __init__(self, worker: ValueWorker) -> None:
        self.worker, self.workers = worker, self

    def all(self, method, *args, **kwargs) -> list:
        return [method(self.worker, *args, **kwargs)]

    def train(self, data, loss_fn, micro_batches):
        return self.worker.train(data, loss_fn, micro_batches)

    def evaluate(self, data, loss_fn, micro_batches):
        return self.worker.evaluate(data, loss_fn, micro_batches)


def test_rm_train_learns_and_exports_a_reward_model(tmp_path) -> None:
    config = tiny(
        "policy.train_global_batch_size=32", "rm.val_global_batch_size=32", "rm.max_num_steps=8",
        "rm.val_period=0", "checkpointing.save_period=100",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}", f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard_enabled=false",
    )  # fmt: skip
    tokenizer = get_tokenizer(config["policy"]["tokenizer"])
    dataset = load_preference_dataset(config["data"])
    splits = [
        tokenize_preference_dataset(
            dataset.formatted_ds[split].select(range(n)), tokenizer, dataset.task_spec,
            config["data"], max_total_sequence_length=64,
        )
        for split, n in (("train", 128), ("validation", 40))
    ]  # fmt: skip
    loaders = [
        build_dataloader(
            split,
            tokenizer,
            config["data"],
            num_pairs=16,
            shuffle=shuffle,
            seed=1,
            drop_last=shuffle,
        )
        for split, shuffle in zip(splits, (True, False), strict=True)
    ]
    checkpointer, _, state = open_run_folder(config, rm._default_rm_save_state(), rm.RMSaveState)
    worker = ValueWorker(
        config=config["policy"], tokenizer=tokenizer, section="policy", init_optimizer=True
    )
    model = InProcessModel(worker)
    final = rm.rm_train(
        model, *loaders, rm.BradleyTerryLossFn(), config, Logger(config["logger"]), checkpointer,
        state,
    )  # fmt: skip

    assert final["total_steps"] == 8 and final["consumed_samples"] == 8 * 16
    validation = read_metrics(tmp_path / "logs" / "metrics.jsonl", "validation")
    assert sorted(validation) == [0, 8] and validation[0]["num_valid_samples"] == 40
    # 8 steps (the first 4 warming the rate up): 0.69 -> 0.65, accuracy 0.53 -> 0.65.
    assert validation[8]["loss"] < validation[0]["loss"] - 0.02, validation
    assert validation[8]["accuracy"] > validation[0]["accuracy"], validation
    info = json.loads((tmp_path / "ckpt" / "step_8" / "training_info.json").read_text())
    assert info["val_loss"] == validation[8]["loss"]
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt/step_8/hf")
    batch = next(iter(loaders[1]))
    with torch.no_grad():
        logits = exported(batch["input_ids"], attention_mask=(batch["input_ids"] != 0).long())
    scores = worker.get_scores(batch, rm.micro_batches(config["policy"]["micro_batch"], "logprob"))
    torch.testing.assert_close(logits.logits[:, 0], scores["scores"], atol=1e-5, rtol=0)
