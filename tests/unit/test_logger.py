"""Logger backends (jsonl, TensorBoard, wandb offline), console lines, and the Timer."""

import json
import time

import numpy as np
import pytest
import torch

from rl_toolkit.config_schema import LoggerConfig
from rl_toolkit.utils.logger import Logger, format_metrics, read_metrics
from rl_toolkit.utils.timer import Timer, tokens_per_second


def make_config(log_dir, tensorboard=False, wandb=False) -> LoggerConfig:
    return {
        "log_dir": str(log_dir),
        "wandb_enabled": wandb,
        "tensorboard_enabled": tensorboard,
        "wandb": {"project": "rl-toolkit-tests", "name": "unit"},
    }


def test_metrics_jsonl_lines_and_append_on_resume(tmp_path):
    logger = Logger(make_config(tmp_path))
    logger.log_metrics({"loss": torch.tensor(0.5), "accuracy": np.float32(0.25)}, 1, "train")
    logger.log_metrics({"loss": 0.75, "num_pairs": 8}, 1, "validation")
    logger.close()
    # A resumed run appends; it never truncates what the first run wrote.
    resumed = Logger(make_config(tmp_path))
    resumed.log_metrics({"loss": 0.125}, 1, "train")
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "prefix": "train", "loss": 0.5, "accuracy": 0.25},
        {"step": 1, "prefix": "validation", "loss": 0.75, "num_pairs": 8},
        {"step": 1, "prefix": "train", "loss": 0.125},
    ]
    assert read_metrics(tmp_path / "metrics.jsonl", "train") == {1: {"loss": 0.125}}


def test_a_resumed_run_removes_the_lines_of_the_steps_it_redoes(tmp_path):
    logger = Logger(make_config(tmp_path))
    for step in range(1, 7):
        logger.log_metrics({"loss": 1.0 / step}, step, "train")
        logger.log_metrics({"training": 0.5}, step, "timing")
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("not json\n")
    # Resumed from the checkpoint of step 4: steps 5 and 6 are redone.
    resumed = Logger(make_config(tmp_path), resume_step=4)
    resumed.log_metrics({"loss": 0.125}, 5, "train")
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line != "not json"]
    assert [(row["step"], row["prefix"]) for row in rows] == [
        *((step, prefix) for step in range(1, 5) for prefix in ("train", "timing")),
        (5, "train"),
    ]
    assert "not json" in lines  # not ours to judge: kept
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_resumed_run_hides_the_tensorboard_events_it_redoes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = Logger(make_config(tmp_path, tensorboard=True))
    for step in (1, 2, 3):
        logger.log_metrics({"loss": float(step)}, step, "train")
    logger.close()
    resumed = Logger(make_config(tmp_path, tensorboard=True), resume_step=1)
    resumed.log_metrics({"loss": 0.5}, 2, "train")
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]


def test_partial_last_line_is_terminated_before_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "prefix": "train", "loss": 1.0}\n{"st')
    logger = Logger(make_config(tmp_path))
    logger.log_metrics({"loss": 0.5}, 2, "train")
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-2:] == [
        '{"st',
        '{"step": 2, "prefix": "train", "loss": 0.5}',
    ]
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path / "metrics.jsonl", "train")


def test_bad_metric_values_are_refused(tmp_path):
    logger = Logger(make_config(tmp_path))
    with pytest.raises(ValueError, match="'loss'"):
        logger.log_metrics({"loss": torch.ones(3)}, 1, "train")
    with pytest.raises(ValueError, match="reserved"):
        logger.log_metrics({"step": 3}, 1, "train")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_event_file_holds_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = Logger(make_config(tmp_path, tensorboard=True))
    logger.log_hyperparams({"dpo": {"beta": 0.1}})
    for step in (1, 2):
        logger.log_metrics({"loss": 1.0 / step}, step, "train")
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Keep wandb's own settings and caches out of the home folder.
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    logger = Logger(make_config(tmp_path / "logs", wandb=True))
    logger.log_hyperparams({"dpo": {"beta": 0.1}})
    logger.log_metrics({"loss": 0.5}, 1, "train")
    logger.close()
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    out = capsys.readouterr().out
    assert f"wandb sync {runs[0]}" in out
    assert out.isascii()


def test_plain_progress_and_metric_lines_off_a_terminal(tmp_path, capsys):
    logger = Logger(make_config(tmp_path))
    logger.start_progress(total_steps=10, initial=2)
    logger.update_progress(3, {"loss": 0.693147, "accuracy": 0.5, "tokens_per_second": 51234.6})
    logger.print_metrics({"loss": 0.4, "accuracy": 0.875}, 3, "validation")
    logger.close()
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "step 3/10 | loss 0.6931 | accuracy 0.5 | tokens_per_second 51235",
        "[validation] step 3 | loss 0.4 | accuracy 0.875",
    ]
    assert out.isascii()


def test_format_metrics_accepts_tensors():
    assert format_metrics({"loss": torch.tensor(0.25)}) == "loss 0.25"


def test_timer_sums_per_label_and_pops():
    timer = Timer()
    for _ in range(2):
        with timer.time("training"):
            time.sleep(0.02)
    with pytest.raises(RuntimeError), timer.time("validation"):
        raise RuntimeError("timed even when the block fails")
    assert timer.total("training") >= 0.04
    totals = timer.pop_totals()
    assert list(totals) == ["training", "validation"]
    assert totals["training"] >= 0.04
    assert timer.pop_totals() == {}


def test_tokens_per_second():
    assert tokens_per_second(1000, 0.5) == 2000.0
    assert tokens_per_second(1000, 0.0) == 0.0
