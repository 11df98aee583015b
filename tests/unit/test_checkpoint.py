"""CheckpointManager: atomic saves, manifests, verified resume and fallback, retention, the
stale-folder cleanup, RNG and dataloader state."""

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.utils import checkpoint
from rl_toolkit.utils.checkpoint import (
    MANIFEST_FILE,
    MARKER_FILE,
    CheckpointError,
    CheckpointingConfig,
    CheckpointManager,
    list_checkpoints,
    load_dataloader_state,
    load_rng_state,
    save_dataloader_state,
    save_rng_state,
    write_manifest,
)
from rl_toolkit.utils.config import ConfigError
from tests.unit.malicious import RunsCode

# dcp.save in a process without a process group says it saves as a single process: it does.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


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
    (tmp / "weights" / "shard_0.bin").write_bytes(b"w" * 16)
    return manager.finalize(tmp, step, {"step": step, **info})


def steps_in(run_dir: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir)]


def test_finalize_writes_step_folder_with_payload_and_info(tmp_path):
    manager = CheckpointManager(make_config(tmp_path / "ckpt"))
    assert manager.resume_path is None
    path = save(manager, 3, val_loss=0.5)
    assert path == tmp_path / "ckpt" / "step_3"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_3"]
    assert (path / "weights" / "shard_0.bin").read_bytes() == b"w" * 16
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
    save(manager, 1)
    save(manager, 2)
    # Killed after begin(6): the temporary folder holds part of the weights.
    (manager.begin(6) / "weights").mkdir()
    # A step folder without training_info.json (e.g. copied by hand, cut short).
    (tmp_path / "step_8").mkdir()
    # Killed during a retention delete, between the rename and the removal.
    os.rename(tmp_path / "step_1", tmp_path / "trash_step_1")
    resumed = CheckpointManager(make_config(tmp_path))
    assert resumed.resume_path == tmp_path / "step_2"
    assert not (tmp_path / "tmp_step_6").exists()
    assert not (tmp_path / "trash_step_1").exists()
    assert (tmp_path / "step_8").exists()  # not ours to delete, but never taken for complete


def test_cleanup_leaves_folders_that_are_not_the_managers(tmp_path):
    save(CheckpointManager(make_config(tmp_path)), 2)
    users = ["tmp_notes", "trash", "tmp_step_3b", "my_tmp_step_3", "trash_step_x"]
    for name in users:
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.txt").write_text("mine")
    CheckpointManager(make_config(tmp_path))
    for name in users:
        assert (tmp_path / name / "data.txt").read_text() == "mine", name


@pytest.mark.parametrize("name", ["tmp_step_3", "trash_step_3"])
def test_a_managers_folder_name_without_the_marker_is_refused_not_deleted(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "data.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"{tmp_path / name}: .*without its marker file"):
        CheckpointManager(make_config(tmp_path))
    assert (tmp_path / name / "data.txt").read_text() == "mine"


def test_trash_of_a_checkpoint_saved_before_markers_carries_the_marker(tmp_path, monkeypatch):
    manager = CheckpointManager(make_config(tmp_path, keep_top_k=1))
    save(manager, 1)
    (tmp_path / "step_1" / MARKER_FILE).unlink()  # as an older rl_toolkit saved it

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # killed after the rename to trash_step_1

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save(manager, 2)
    monkeypatch.undo()
    assert (tmp_path / "trash_step_1" / MARKER_FILE).is_file()
    CheckpointManager(make_config(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


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


# ---------------------------------------------------------------------------------------------
# Manifests, verification before resume, fallback past damaged checkpoints


def save_real(manager: CheckpointManager, step: int) -> Path:
    """A checkpoint with the recipe's file formats: DCP weights (a 16 KiB tensor) and optimizer
    (param_groups are a non-tensor entry), scheduler.pt, RNG and dataloader state."""
    tmp = manager.begin(step)
    policy = tmp / "policy"
    dcp.save({"model": {"w": torch.arange(4096.0) + step}}, checkpoint_id=policy / "weights")
    optimizer = {"state": {"w": {"exp_avg": torch.ones(8)}}, "param_groups": [{"lr": 0.1}]}
    dcp.save({"optimizer": optimizer}, checkpoint_id=policy / "optimizer")
    torch.save({"last_epoch": step, "_last_lr": [0.1]}, policy / "optimizer" / "scheduler.pt")
    save_rng_state(tmp)
    save_dataloader_state(tmp, make_loader().state_dict())
    return manager.finalize(tmp, step, {"step": step, "total_steps": step})


def test_finalize_writes_a_manifest_of_every_file(tmp_path):
    path = save_real(CheckpointManager(make_config(tmp_path)), 3)
    files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {
        MANIFEST_FILE
    }
    assert set(files) == on_disk
    assert {MARKER_FILE, "training_info.json", "policy/weights/__0_0.distcp"} <= on_disk
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def _zero_4k_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 2048 : middle + 2048] = bytes(4096)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (what is done to step_4, the file the error must name, what it must say)
DAMAGE = {
    "corrupt training_info.json": (
        lambda c: (c / "training_info.json").write_text('{"step": 4, "total_st'),
        "training_info.json",
        "bytes",
    ),
    "weights shard deleted": (
        lambda c: (c / "policy/weights/__0_0.distcp").unlink(),
        "policy/weights/__0_0.distcp",
        "missing",
    ),
    "optimizer shard truncated": (
        lambda c: _truncate(c / "policy/optimizer/__0_0.distcp"),
        "policy/optimizer/__0_0.distcp",
        "truncated",
    ),
    "4 KiB zeroed in a weights shard": (
        lambda c: _zero_4k_in_the_middle(c / "policy/weights/__0_0.distcp"),
        "policy/weights/__0_0.distcp",
        "sha256",
    ),
    "file added": (
        lambda c: (c / "policy/weights/extra.distcp").write_bytes(b"x"),
        "policy/weights/extra.distcp",
        "not listed",
    ),
    "manifest unreadable": (
        lambda c: (c / MANIFEST_FILE).write_text("{"),
        MANIFEST_FILE,
        "not readable",
    ),
    "manifest deleted": (
        lambda c: (c / MANIFEST_FILE).unlink(),
        MANIFEST_FILE,
        "missing",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_resume_path_fails_in_one_line_naming_the_file(tmp_path, damage):
    damage_fn, name, problem = DAMAGE[damage]
    path = save_real(CheckpointManager(make_config(tmp_path / "old")), 4)
    damage_fn(path)
    manager = CheckpointManager(make_config(tmp_path / "new", resume=str(path)))
    with pytest.raises(ConfigError) as error:
        _ = manager.resume_path  # verified on first use
    message = str(error.value)
    assert message.startswith(f"checkpointing.resume: {path / name}: ")
    assert problem in message and "\n" not in message
    assert path.is_dir()  # an explicit path is never renamed


@pytest.mark.parametrize("damage", DAMAGE)
def test_auto_falls_back_past_a_damaged_latest_checkpoint(tmp_path, caplog, damage):
    damage_fn, name, problem = DAMAGE[damage]
    manager = CheckpointManager(make_config(tmp_path, keep_top_k=2))
    save_real(manager, 2)
    save_real(manager, 4)
    damage_fn(tmp_path / "step_4")
    resumed = CheckpointManager(make_config(tmp_path, keep_top_k=2))
    with caplog.at_level("WARNING"):
        assert resumed.resume_path == tmp_path / "step_2"
    assert f"{tmp_path / 'step_4' / name}: " in caplog.text and problem in caplog.text
    assert "renamed it damaged_step_4" in caplog.text
    # Set aside, never picked again; new saves and retention go on around it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged_step_4", "step_2"]
    save_real(resumed, 3)
    save_real(resumed, 4)
    assert steps_in(tmp_path) == [3, 4]
    assert CheckpointManager(make_config(tmp_path)).resume_path == tmp_path / "step_4"
    assert (tmp_path / "damaged_step_4").is_dir()


def test_auto_with_every_checkpoint_damaged_starts_from_scratch(tmp_path, caplog):
    manager = CheckpointManager(make_config(tmp_path))
    for step in (2, 4):
        _zero_4k_in_the_middle(save_real(manager, step) / "policy/weights/__0_0.distcp")
    with caplog.at_level("WARNING"):
        assert CheckpointManager(make_config(tmp_path)).resume_path is None
    assert caplog.text.count("sha256 differs") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged_step_2", "damaged_step_4"]


def test_a_checkpoint_from_before_manifests_is_resumed_with_a_warning(tmp_path, caplog):
    path = save_real(CheckpointManager(make_config(tmp_path)), 4)
    (path / MANIFEST_FILE).unlink()
    (path / MARKER_FILE).unlink()
    with caplog.at_level("WARNING"):
        assert CheckpointManager(make_config(tmp_path)).resume_path == path
    assert f"{path} has no {MANIFEST_FILE}" in caplog.text


def test_retention_ranks_an_unreadable_training_info_last(tmp_path, caplog):
    manager = CheckpointManager(make_config(tmp_path, keep_top_k=1, metric_name="val_loss"))
    save(manager, 1, val_loss=0.1)
    (tmp_path / "step_1" / "training_info.json").write_text("{")
    with caplog.at_level("WARNING"):
        save(manager, 2, val_loss=0.5)
    assert "step_1/training_info.json: not readable as JSON" in caplog.text
    assert steps_in(tmp_path) == [2]


def _plant_metadata(checkpoint: Path, marker: Path) -> Path:
    target = checkpoint / "policy" / "weights" / ".metadata"
    target.write_bytes(pickle.dumps(RunsCode(marker)))
    return target


def _plant_scheduler(checkpoint: Path, marker: Path) -> Path:
    target = checkpoint / "policy" / "optimizer" / "scheduler.pt"
    torch.save({"last_epoch": 4, "_last_lr": RunsCode(marker)}, target)
    return target


def _plant_param_groups(checkpoint: Path, marker: Path) -> Path:
    optimizer = checkpoint / "policy" / "optimizer"
    shutil.rmtree(optimizer)
    dcp.save({"optimizer": {"param_groups": [RunsCode(marker)]}}, checkpoint_id=optimizer)
    torch.save({"last_epoch": 4}, optimizer / "scheduler.pt")
    return optimizer / "__0_0.distcp"


@pytest.mark.parametrize("plant", [_plant_metadata, _plant_scheduler, _plant_param_groups])
def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, plant):
    marker = tmp_path / "code_ran"
    path = save_real(CheckpointManager(make_config(tmp_path / "old")), 4)
    planted = plant(path, marker)
    write_manifest(path)  # a valid-looking manifest: the files match it
    manager = CheckpointManager(make_config(tmp_path / "new", resume=str(path)))
    with pytest.raises(CheckpointError) as error:
        _ = manager.resume_path  # verified on first use
    message = str(error.value)
    assert message.startswith(f"checkpointing.resume: {planted}: ")
    assert "system" in message and "\n" not in message
    assert not marker.exists()
    # With resume=auto it is set aside like any damaged checkpoint.
    shutil.copytree(path, tmp_path / "run" / "step_4")
    assert CheckpointManager(make_config(tmp_path / "run")).resume_path is None
    assert not marker.exists()
