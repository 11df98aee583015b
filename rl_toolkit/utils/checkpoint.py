"""Checkpoints that survive a crash: written under a temporary name, renamed when complete.

A run folder holds one `step_N` folder per complete checkpoint. The driver asks the manager
for a temporary folder (`begin`), everyone writes into it (weights and optimizer shards by the
policy workers, dataloader and RNG state and `config.yaml` by the driver), and `finalize`
writes `training_info.json`, syncs everything to disk and renames the folder to `step_N` in one
atomic step. A folder is a checkpoint only if its name is exactly `step_N` and it holds
`training_info.json`; anything else in the run folder (a `tmp_step_N` left by a killed
process, a `trash_step_N` whose deletion was cut short) is never read and is removed at start.
See docs/checkpointing.md for the layout and the resume modes.
"""

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch

_log = logging.getLogger(__name__)

TRAINING_INFO_FILE = "training_info.json"
RNG_STATE_FILE = "rng_state.pt"
DATALOADER_STATE_FILE = "dataloader_state.pt"

_STEP_RE = re.compile(r"^step_(\d+)$")
# Prefixes of folders that are never checkpoints: work in progress and deletions in progress.
_TMP_PREFIX = "tmp_"
_TRASH_PREFIX = "trash_"


class CheckpointingConfig(TypedDict):
    """The `checkpointing` section of the config (defaults in configs/dpo.yaml).

    enabled: save checkpoints and resume from them; when False the manager touches no file.
    checkpoint_dir: the run folder that holds the `step_N` checkpoints.
    save_period: save every this many training steps (the recipe also saves at the end).
    keep_top_k: how many of the best checkpoints by `metric_name` to keep besides the latest
        (the latest `keep_top_k` by step when `metric_name` is None); None keeps all.
    metric_name: key of `training_info` that ranks checkpoints, e.g. "val_loss".
    higher_is_better: whether a larger `metric_name` value is better.
    resume: "auto" (latest complete checkpoint of `checkpoint_dir`, if any), "never" (start
        fresh, in a new folder if `checkpoint_dir` is not empty), or the path of a `step_N`.
    save_hf: also write a Hugging Face export (`hf/`) that `from_pretrained` loads.
    hf_max_shard_size: the largest weights file of that export, like Hugging Face's
        max_shard_size ("5GB"); above it the weights are sharded with an index file.
    push_to_hub: a Hub repo id ("org/name") that the final checkpoint's export is uploaded to
        (needs save_hf), or None.
    hub_private: whether push_to_hub creates the repo private (an existing repo keeps its own).
    """

    enabled: bool
    checkpoint_dir: str
    save_period: int
    keep_top_k: int | None
    metric_name: str | None
    higher_is_better: bool
    resume: Literal["auto", "never"] | str
    save_hf: bool
    hf_max_shard_size: str
    push_to_hub: str | None
    hub_private: bool


def is_complete_checkpoint(path: Path) -> bool:
    """Whether `path` is a finished checkpoint: a `step_N` folder holding training_info.json."""
    return bool(_STEP_RE.match(path.name)) and (path / TRAINING_INFO_FILE).is_file()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder.

    Args:
        run_dir: folder holding `step_N` checkpoints (may not exist).

    Returns:
        (step, path) pairs sorted by step, oldest first; half-written folders are left out.
    """
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        if path.is_dir() and is_complete_checkpoint(path):
            found.append((int(_STEP_RE.match(path.name).group(1)), path))
    return sorted(found)


def _choose_run_dir(checkpoint_dir: Path, resume: str) -> Path:
    """The folder this run writes to: `checkpoint_dir` unless resume="never" finds it in use.

    With "never" and a non-empty `checkpoint_dir`, the run goes to the first of
    `<checkpoint_dir>-1`, `<checkpoint_dir>-2`, ... that does not exist or is empty, so
    checkpoints of earlier runs are never read, replaced or deleted.
    """
    if resume != "never" or not _is_nonempty_dir(checkpoint_dir):
        return checkpoint_dir
    n = 1
    while _is_nonempty_dir(checkpoint_dir.with_name(f"{checkpoint_dir.name}-{n}")):
        n += 1
    return checkpoint_dir.with_name(f"{checkpoint_dir.name}-{n}")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` and the folders themselves to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the folder that holds the entry is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete_crash_safe(path: Path) -> None:
    """Remove a folder so that a crash half way never leaves a half-deleted `step_N`.

    The folder is first renamed to a trash name (atomic), then removed; a trash folder left
    by a crash is removed when the next run starts.
    """
    trash = path.with_name(_TRASH_PREFIX + path.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


class CheckpointManager:
    """Finds the checkpoint to resume from, writes new ones atomically and applies retention.

    Used by the driver only; workers write into the folder that `begin` returns, which must
    be on a file system every node sees.

    Attributes:
        run_dir: the folder this run saves `step_N` checkpoints in (see `CheckpointingConfig`).
        resume_path: the checkpoint to resume from, or None to start from scratch.
    """

    def __init__(self, config: CheckpointingConfig) -> None:
        """Check the config, pick the run folder and the resume checkpoint, clean stale folders.

        Raises:
            ValueError: keep_top_k below 1, save_period below 1, or a resume path that is not a
                complete checkpoint (or that would mix histories with later checkpoints).
        """
        self.config = config
        if config["keep_top_k"] is not None and config["keep_top_k"] < 1:
            raise ValueError(
                f"checkpointing.keep_top_k must be None (keep all) or >= 1, got {config['keep_top_k']}"
            )
        if config["save_period"] < 1:
            raise ValueError(f"checkpointing.save_period must be >= 1, got {config['save_period']}")
        checkpoint_dir = Path(config["checkpoint_dir"])
        self.run_dir = _choose_run_dir(checkpoint_dir, config["resume"])
        self.resume_path: Path | None = None
        if not config["enabled"]:
            return
        self._clean_stale_folders()
        if config["resume"] == "auto":
            checkpoints = list_checkpoints(self.run_dir)
            self.resume_path = checkpoints[-1][1] if checkpoints else None
        elif config["resume"] != "never":
            self.resume_path = self._check_resume_path(Path(config["resume"]))

    def _check_resume_path(self, path: Path) -> Path:
        """Validate an explicit resume path and make sure it does not fork the run folder."""
        if not path.exists():
            raise ValueError(f"checkpointing.resume: {path} does not exist")
        if not is_complete_checkpoint(path):
            raise ValueError(
                f"checkpointing.resume: {path} is not a complete checkpoint (expected a step_N "
                f"folder holding {TRAINING_INFO_FILE}); use 'auto', 'never' or such a folder"
            )
        step = int(_STEP_RE.match(path.name).group(1))
        later = [p.name for s, p in list_checkpoints(self.run_dir) if s > step]
        if later:
            # Saving new steps next to later ones would let retention and "auto" mix two runs.
            raise ValueError(
                f"checkpointing.resume: {path} is at step {step} but checkpointing.checkpoint_dir "
                f"{self.run_dir} already holds later checkpoints {later}; set "
                "checkpointing.checkpoint_dir to another folder for the resumed run"
            )
        return path

    @property
    def enabled(self) -> bool:
        return self.config["enabled"]

    def _clean_stale_folders(self) -> None:
        """Remove work-in-progress and trash folders that a killed process left behind."""
        if not self.run_dir.is_dir():
            return
        for path in self.run_dir.iterdir():
            if path.is_dir() and path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(path)

    def load_training_info(self, path: Path) -> dict[str, Any]:
        """Read the training_info.json of a checkpoint (the save state and metrics).

        Raises:
            ValueError: `path` holds no training_info.json.
        """
        info_file = Path(path) / TRAINING_INFO_FILE
        if not info_file.is_file():
            raise ValueError(f"{path} is not a complete checkpoint: {info_file} is missing")
        with open(info_file) as f:
            return json.load(f)

    def begin(self, step: int) -> Path:
        """Create the empty temporary folder that the checkpoint of `step` is written into.

        Returns:
            `run_dir/tmp_step_<step>`: a name never taken for a checkpoint, so a process killed
            while writing leaves nothing that a resume would read.
        """
        assert self.enabled, "begin() called with checkpointing.enabled=False"
        tmp = self.run_dir / f"{_TMP_PREFIX}step_{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finalize(self, tmp: Path, step: int, training_info: dict[str, Any]) -> Path:
        """Seal a checkpoint: write training_info.json, sync, rename to `step_N`, apply retention.

        Args:
            tmp: the folder returned by `begin(step)`, fully written.
            step: the training step of the checkpoint.
            training_info: JSON-serialisable flat dict (save state and metrics). A checkpoint
                whose `metric_name` is missing (e.g. saved before the first validation), None
                or NaN ranks last; a missing one is reported with the keys that are there.

        Returns:
            The path of the complete checkpoint, `run_dir/step_<step>`.
        """
        assert tmp == self.run_dir / f"{_TMP_PREFIX}step_{step}", f"{tmp} is not from begin({step})"
        metric_name = self.config["metric_name"]
        if metric_name is not None and metric_name not in training_info:
            _log.warning(
                "checkpointing.metric_name %r is not in the training info of step %d (keys: %s); "
                "this checkpoint ranks last for retention",
                metric_name,
                step,
                ", ".join(sorted(training_info)),
            )
        with open(tmp / TRAINING_INFO_FILE, "w") as f:
            json.dump(training_info, f, indent=2)
        _fsync_tree(tmp)
        final = self.run_dir / f"step_{step}"
        if final.exists():
            # Saving a step again (e.g. the end of a run that resumed at that step) replaces it.
            _delete_crash_safe(final)
        os.rename(tmp, final)
        _fsync_dir(self.run_dir)
        self._apply_retention()
        return final

    def _apply_retention(self) -> None:
        """Delete the checkpoints that are neither the latest nor among the top-k."""
        for path in self.checkpoints_to_delete():
            _delete_crash_safe(path)

    def checkpoints_to_delete(self) -> list[Path]:
        """The complete checkpoints that retention removes now (none when keep_top_k is None).

        The latest checkpoint is always kept. With `metric_name`, the `keep_top_k` best by
        that metric are kept too (ties go to the newer step; a missing value ranks last);
        without it, the latest `keep_top_k` by step.
        """
        keep_top_k = self.config["keep_top_k"]
        checkpoints = list_checkpoints(self.run_dir)
        if keep_top_k is None or not checkpoints:
            return []
        metric_name = self.config["metric_name"]
        if metric_name is None:
            ranked = [path for _, path in reversed(checkpoints)]
        else:
            ranked = sorted(
                (path for _, path in reversed(checkpoints)),
                key=lambda p: self._rank_key(self.load_training_info(p).get(metric_name)),
            )
        keep = set(ranked[:keep_top_k]) | {checkpoints[-1][1]}
        return [path for _, path in checkpoints if path not in keep]

    def _rank_key(self, value: float | None) -> tuple[bool, float]:
        """Sort key, best first: (missing, value oriented so that smaller is better)."""
        if value is None or value != value:  # None, or NaN (the only value unequal to itself)
            return (True, 0.0)
        return (False, -value if self.config["higher_is_better"] else value)


def save_rng_state(directory: Path) -> None:
    """Save this process's Python, NumPy, torch CPU and (if present) CUDA RNG states.

    Writes `directory/rng_state.pt`; every value is a tensor, list or number, so it loads
    with `torch.load(weights_only=True)`.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, Path(directory) / RNG_STATE_FILE)


def load_rng_state(directory: Path) -> None:
    """Restore the RNG states written by `save_rng_state`.

    Raises:
        ValueError: no rng_state.pt in `directory`, or it holds CUDA states for a different
            number of devices than this process sees.
    """
    path = Path(directory) / RNG_STATE_FILE
    if not path.is_file():
        raise ValueError(f"RNG state file {path} is missing")
    state = torch.load(path, weights_only=True)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state["torch_cuda"]
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"{path} holds RNG states for {len(cuda_states)} CUDA devices, "
                f"this process sees {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(cuda_states)


def save_dataloader_state(directory: Path, state_dict: dict[str, Any]) -> None:
    """Save a StatefulDataLoader `state_dict()` to `directory/dataloader_state.pt`.

    The state holds only dicts, lists, numbers, strings and tensors (the sampler's generator
    state), so it is written with torch.save and read back with `weights_only=True`.
    """
    torch.save(state_dict, Path(directory) / DATALOADER_STATE_FILE)


def load_dataloader_state(directory: Path) -> dict[str, Any]:
    """Read the state written by `save_dataloader_state`, ready for `load_state_dict`.

    Raises:
        ValueError: no dataloader_state.pt in `directory`.
    """
    path = Path(directory) / DATALOADER_STATE_FILE
    if not path.is_file():
        raise ValueError(f"dataloader state file {path} is missing")
    return torch.load(path, weights_only=True)
