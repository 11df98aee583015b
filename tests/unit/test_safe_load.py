"""Checkpoint files are read without running code: DCP metadata and entries, torch.save files."""

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from rl_toolkit.utils.safe_load import (
    CheckpointError,
    check_dcp_folder,
    load_dcp,
    load_weights_only,
    read_dcp_metadata,
)
from tests.unit.malicious import RunsCode

# dcp.save in a process without a process group says it saves as a single process: it does.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def save_folder(path: Path, **extra) -> dict:
    state = {
        "model": {"w": torch.arange(6.0), "b": torch.ones(2, dtype=torch.bfloat16)},
        "optimizer": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}]},
        **extra,
    }
    dcp.save(state, checkpoint_id=path)
    return state


def empty_like_saved() -> dict:
    return {
        "model": {"w": torch.zeros(6), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "optimizer": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": [""]}]},
    }


def test_load_dcp_round_trip(tmp_path):
    saved = save_folder(tmp_path / "ckpt")
    check_dcp_folder(tmp_path / "ckpt")
    loaded = empty_like_saved()
    load_dcp(loaded, tmp_path / "ckpt")
    torch.testing.assert_close(loaded["model"], saved["model"])
    assert loaded["optimizer"] == saved["optimizer"]


def test_a_metadata_file_that_would_run_code_is_refused(tmp_path):
    save_folder(tmp_path / "ckpt")
    marker = tmp_path / "code_ran"
    metadata = tmp_path / "ckpt" / ".metadata"
    metadata.write_bytes(pickle.dumps(RunsCode(marker)))
    for read in (read_dcp_metadata, lambda p: load_dcp(empty_like_saved(), p.parent)):
        with pytest.raises(CheckpointError, match=f"^{metadata}: .*posix.system") as error:
            read(metadata)
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_a_non_tensor_entry_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    save_folder(tmp_path / "ckpt", extra=RunsCode(marker))
    with pytest.raises(CheckpointError, match="entry 'extra' cannot be loaded as plain data"):
        check_dcp_folder(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="entry 'extra'") as error:
        load_dcp({**empty_like_saved(), "extra": None}, tmp_path / "ckpt")
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a pickle", pickle.dumps(3)])
def test_a_damaged_metadata_file_is_named(tmp_path, content):
    (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / '.metadata'}: not a DCP metadata"):
        read_dcp_metadata(tmp_path / ".metadata")


def test_load_weights_only_refuses_code_in_one_line(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"lr": RunsCode(marker)}, tmp_path / "scheduler.pt")
    with pytest.raises(CheckpointError) as error:
        load_weights_only(tmp_path / "scheduler.pt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'scheduler.pt'}: cannot be loaded as plain data")
    assert "posix.system" in message and "\n" not in message
    assert not marker.exists()


def test_a_truncated_shard_fails_in_one_line_naming_the_folder(tmp_path):
    save_folder(tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'ckpt'}: cannot be loaded") as error:
        load_dcp(empty_like_saved(), tmp_path / "ckpt")
    assert "\n" not in str(error.value)
