"""CheckpointManager: atomic saves, resume modes, retention, RNG and dataloader state."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.utils.checkpoint import (
    CheckpointingConfig,
    CheckpointManager,
    list_checkpoints,
    load_dataloader_state,
    load_rng_state,
    save_dataloader_state,
    save_rng_state,
)


def make_config(checkpoint_dir: Path, **overrides) -> CheckpointingConfig:
    config: CheckpointingConfig = {
        "enabled": True,
        "checkpoint_dir": str(checkpoint_dir),
        "save_period": 1,
        "keep_top_k": None,
        "metric_name": None,
        "higher_is_better": False,
        "resume": "auto",
        "save_hf": False,
    }
    config.update(overrides)
    return config


def save(manager: CheckpointManager, step: int, **info) -> Path:
    """Write a checkpoint the way the recipe does: a payload file, then finalize."""
    tmp = manager.begin(step)
    (tmp / "weights").mkdir()
    (tmp / "weights" / "shard_0.pt").write_bytes(b"w" * 16)
    return manager.finalize(tmp, step, {"step": step, **info})


def steps_in(run_dir: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir)]


def test_finalize_writes_step_folder_with_payload_and_info(tmp_path):
    manager = CheckpointManager(make_config(tmp_path / "ckpt"))
    assert manager.resume_path is None
    path = save(manager, 3, val_loss=0.5)
    assert path == tmp_path / "ckpt" / "step_3"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_3"]
    assert (path / "weights" / "shard_0.pt").read_bytes() == b"w" * 16
    assert manager.load_training_info(path) == {"step": 3, "val_loss": 0.5}


def test_auto_resumes_from_latest_complete_checkpoint(tmp_path):
    manager = CheckpointManager(make_config(tmp_path))
    save(manager, 2)
    save(manager, 4)
    resumed = CheckpointManager(make_config(tmp_path))
    assert resumed.run_dir == tmp_path
    assert resumed.resume_path == tmp_path / "step_4"
    assert resumed.load_training_info(resumed.resume_path)["step"] == 4


def test_killed_while_saving_is_ignored_and_cleaned(tmp_path):
    manager = CheckpointManager(make_config(tmp_path))
    save(manager, 2)
    # Killed after begin(6): the temporary folder holds part of the weights.
    (manager.begin(6) / "weights").mkdir()
    # A step folder without training_info.json (e.g. copied by hand, cut short).
    (tmp_path / "step_8").mkdir()
    # Killed during a retention delete: the trash folder is left behind.
    (tmp_path / "trash_step_1").mkdir()
    resumed = CheckpointManager(make_config(tmp_path))
    assert resumed.resume_path == tmp_path / "step_2"
    assert not (tmp_path / "tmp_step_6").exists()
    assert not (tmp_path / "trash_step_1").exists()
    assert (tmp_path / "step_8").exists()  # not ours to delete, but never taken for complete


def test_finalize_replaces_an_existing_step(tmp_path):
    manager = CheckpointManager(make_config(tmp_path))
    save(manager, 5, val_loss=1.0)
    save(manager, 5, val_loss=0.25)
    assert steps_in(tmp_path) == [5]
    assert manager.load_training_info(tmp_path / "step_5")["val_loss"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_5"]


def test_never_starts_in_a_new_folder_and_leaves_old_ones(tmp_path):
    ckpt = tmp_path / "ckpt"
    save(CheckpointManager(make_config(ckpt)), 7)
    fresh = CheckpointManager(make_config(ckpt, resume="never"))
    assert fresh.resume_path is None
    assert fresh.run_dir == tmp_path / "ckpt-1"
    save(fresh, 1)
    assert steps_in(ckpt) == [7]
    assert steps_in(tmp_path / "ckpt-1") == [1]
    assert CheckpointManager(make_config(ckpt, resume="never")).run_dir == tmp_path / "ckpt-2"


def test_never_uses_checkpoint_dir_when_empty(tmp_path):
    (tmp_path / "ckpt").mkdir()
    assert CheckpointManager(make_config(tmp_path / "ckpt", resume="never")).run_dir == (
        tmp_path / "ckpt"
    )


def test_resume_from_explicit_path(tmp_path):
    old = CheckpointManager(make_config(tmp_path / "old"))
    save(old, 3)
    manager = CheckpointManager(make_config(tmp_path / "new", resume=str(tmp_path / "old/step_3")))
    assert manager.resume_path == tmp_path / "old" / "step_3"
    assert manager.run_dir == tmp_path / "new"


@pytest.mark.parametrize("bad", ["missing/step_3", "old/tmp_step_9", "old"])
def test_resume_path_that_is_not_a_checkpoint_is_named(tmp_path, bad):
    save(CheckpointManager(make_config(tmp_path / "old")), 3)
    (tmp_path / "old" / "tmp_step_9").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / bad)):
        CheckpointManager(make_config(tmp_path / "new", resume=str(tmp_path / bad)))


def test_resume_path_before_later_checkpoints_of_run_dir_is_refused(tmp_path):
    manager = CheckpointManager(make_config(tmp_path))
    save(manager, 2)
    save(manager, 4)
    with pytest.raises(ValueError, match="step_4"):
        CheckpointManager(make_config(tmp_path, resume=str(tmp_path / "step_2")))


def test_disabled_manager_touches_nothing(tmp_path):
    (tmp_path / "tmp_step_1").mkdir()
    manager = CheckpointManager(make_config(tmp_path, enabled=False))
    assert manager.resume_path is None
    assert (tmp_path / "tmp_step_1").exists()


@pytest.mark.parametrize(
    "higher_is_better, expected",
    [(False, [2, 4, 6]), (True, [1, 3, 6])],
)
def test_retention_keeps_top_k_by_metric_and_latest(tmp_path, higher_is_better, expected):
    manager = CheckpointManager(
        make_config(
            tmp_path, keep_top_k=2, metric_name="val_loss", higher_is_better=higher_is_better
        )
    )
    for step, val_loss in zip(range(1, 7), [0.9, 0.1, 0.8, 0.2, 0.5, 0.6], strict=True):
        save(manager, step, val_loss=val_loss)
    assert steps_in(tmp_path) == expected
    assert not any(p.name.startswith("trash_") for p in tmp_path.iterdir())


def test_retention_ranks_missing_metric_last_and_ties_to_newer(tmp_path):
    manager = CheckpointManager(make_config(tmp_path, keep_top_k=1, metric_name="val_loss"))
    save(manager, 1, val_loss=0.3)
    save(manager, 2, val_loss=None)
    save(manager, 3, val_loss=float("nan"))
    assert steps_in(tmp_path) == [1, 3]
    save(manager, 4, val_loss=0.3)
    assert steps_in(tmp_path) == [4]


def test_retention_without_metric_keeps_latest_k(tmp_path):
    manager = CheckpointManager(make_config(tmp_path, keep_top_k=2))
    for step in range(1, 5):
        save(manager, step)
    assert steps_in(tmp_path) == [3, 4]


def test_missing_metric_ranks_last_and_is_reported(tmp_path, caplog):
    # A checkpoint saved before the first validation has no val_loss yet.
    manager = CheckpointManager(make_config(tmp_path, keep_top_k=1, metric_name="val_loss"))
    save(manager, 1, val_loss=0.5)
    with caplog.at_level("WARNING"):
        save(manager, 2)
    assert "'val_loss' is not in the training info of step 2" in caplog.text
    save(manager, 3, val_loss=0.9)
    # step 1 is the best by val_loss, step 3 the latest; step 2 (no metric) goes.
    assert steps_in(tmp_path) == [1, 3]


def test_bad_keep_top_k_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_top_k"):
        CheckpointManager(make_config(tmp_path, keep_top_k=0))


def draw() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw()
    save_rng_state(tmp_path)
    expected = draw()
    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    load_rng_state(tmp_path)
    assert draw() == expected


def test_missing_rng_state_is_named(tmp_path):
    with pytest.raises(ValueError, match="rng_state.pt"):
        load_rng_state(tmp_path)


def make_loader() -> StatefulDataLoader:
    return StatefulDataLoader(
        list(range(20)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def test_dataloader_state_round_trip(tmp_path):
    loader = make_loader()
    it = iter(loader)
    for _ in range(2):
        next(it)
    save_dataloader_state(tmp_path, loader.state_dict())
    expected = [batch.tolist() for batch in it]
    resumed = make_loader()
    resumed.load_state_dict(load_dataloader_state(tmp_path))
    assert [batch.tolist() for batch in resumed] == expected
