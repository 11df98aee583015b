"""Checkpoints that survive a crash: written under a temporary name, renamed when complete.

A run folder holds one `step_N` folder per complete checkpoint. The driver asks the manager
for a temporary folder (`begin`, which puts the manager's marker file in it), everyone writes
into it (weights and optimizer shards by the policy workers, dataloader and RNG state and
`config.yaml` by the driver), and `finalize` writes `training_info.json` and `manifest.json`
(size and sha256 of every file), syncs everything to disk and renames the folder to `step_N`
in one atomic step. A folder is a checkpoint only if its name is exactly `step_N` and it holds
`training_info.json` or `manifest.json`; it is resumed from only once `verify_checkpoint` has
checked every file against the manifest and opened every pickle with a loader that runs no
code. A `tmp_step_N` left by a killed process and a `trash_step_N` whose deletion was cut
short are never read, and are removed at start when they hold the marker.
See docs/checkpointing.md for the layout and the resume modes.
"""

import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl_toolkit.config_schema import CheckpointingConfig
from rl_toolkit.utils.config import ConfigError
from rl_toolkit.utils.safe_load import (
    DCP_METADATA_FILE,
    CheckpointError,
    check_dcp_folder,
    load_weights_only,
)

_log = logging.getLogger(__name__)

TRAINING_INFO_FILE = "training_info.json"
MANIFEST_FILE = "manifest.json"
# Written by begin() into every folder the manager creates; it stays in the checkpoint, so a
# trash folder (a renamed checkpoint) holds it too. Only folders holding it are ever deleted.
MARKER_FILE = ".rl_toolkit_checkpoint"
RNG_STATE_FILE = "rng_state.pt"
DATALOADER_STATE_FILE = "dataloader_state.pt"

_STEP_RE = re.compile(r"^step_(\d+)$")
# Names of the manager's folders that are never checkpoints: work and deletions in progress.
_STALE_RE = re.compile(r"^(tmp|trash)_step_\d+$")
_TMP_PREFIX = "tmp_"
_TRASH_PREFIX = "trash_"
# A checkpoint that failed verification is renamed so that it is never picked again.
_DAMAGED_PREFIX = "damaged_"
_MANIFEST_VERSION = 1
# sha256 runs at about 1 GiB/s per core (docs/checkpointing.md) and hashlib releases the GIL:
# hash files in parallel threads (DCP writes one file per worker).
_HASH_THREADS = min(8, os.cpu_count() or 1)


def is_complete_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint that `finalize` sealed: a `step_N` folder holding
    training_info.json or manifest.json (whether it is intact is `verify_checkpoint`'s call)."""
    return bool(_STEP_RE.match(path.name)) and (
        (path / TRAINING_INFO_FILE).is_file() or (path / MANIFEST_FILE).is_file()
    )


def _step_of(checkpoint: Path) -> int:
    match = _STEP_RE.match(checkpoint.name)
    assert match is not None, f"{checkpoint} is not a step_N folder (is_complete_checkpoint)"
    return int(match.group(1))


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
            found.append((_step_of(path), path))
    return sorted(found)


def write_manifest(folder: Path) -> None:
    """Record the relative path, size and sha256 of every file of `folder` in its manifest.json."""
    names = sorted(_relative_files(folder) - {MANIFEST_FILE})
    sizes = [(folder / name).stat().st_size for name in names]
    digests = _sha256_files([folder / name for name in names])
    files = {
        name: {"size": size, "sha256": digest}
        for name, size, digest in zip(names, sizes, digests, strict=True)
    }
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump({"version": _MANIFEST_VERSION, "files": files}, f, indent=1)


def verify_manifest(folder: Path) -> None:
    """Check that `folder` holds exactly the files of its manifest.json, byte for byte.

    Sizes are compared first (cheap, and what a truncated copy gives away), then sha256.

    Raises:
        CheckpointError: the manifest is unreadable, or a file is missing, unlisted, of the
            wrong size or with the wrong sha256 (one line naming the first such file).
    """
    listed = _read_manifest(folder)
    present = _relative_files(folder) - {MANIFEST_FILE}
    missing, unlisted = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise CheckpointError(f"{folder / missing[0]}: listed in {MANIFEST_FILE} but missing")
    if unlisted:
        raise CheckpointError(f"{folder / unlisted[0]}: not listed in {MANIFEST_FILE}")
    names = sorted(listed)
    for name in names:
        size = (folder / name).stat().st_size
        if size != listed[name]["size"]:
            raise CheckpointError(
                f"{folder / name}: {size} bytes, {MANIFEST_FILE} says {listed[name]['size']} "
                "(truncated or changed after it was saved)"
            )
    digests = _sha256_files([folder / name for name in names])
    for name, digest in zip(names, digests, strict=True):
        if digest != listed[name]["sha256"]:
            raise CheckpointError(
                f"{folder / name}: sha256 differs from {MANIFEST_FILE} (the file changed after "
                "it was saved)"
            )


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The `files` of a manifest.json: relative path -> {"size": int, "sha256": str}."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (every checkpoint holding {MARKER_FILE} has one)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable as JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("version") != _MANIFEST_VERSION
        or not all(_is_manifest_entry(entry) for entry in files.values())
    ):
        raise CheckpointError(
            f"{path}: not a version {_MANIFEST_VERSION} manifest "
            '({"version": 1, "files": {path: {"size": int, "sha256": str}}})'
        )
    return files


def _is_manifest_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    )


def verify_checkpoint(path: Path) -> None:
    """Make sure a checkpoint can be resumed from before any byte of it is loaded.

    Checks every file against manifest.json, that training_info.json is a JSON object, and
    opens every pickle the way it will be loaded, which runs no code: DCP folders (metadata
    and non-tensor entries) with `check_dcp_folder`, `*.pt` files with `load_weights_only`.
    A checkpoint written before manifests existed (no manifest, no marker) is accepted with a
    warning: its files are still opened safely, but damage inside them cannot be seen.

    Raises:
        CheckpointError: the first problem found, in one line naming the file.
    """
    if (path / MANIFEST_FILE).is_file() or (path / MARKER_FILE).is_file():
        verify_manifest(path)
    else:
        _log.warning(
            "%s has no %s (it was saved by an rl_toolkit older than manifests): damage inside "
            "its files cannot be detected; resuming from it anyway",
            path,
            MANIFEST_FILE,
        )
    read_training_info(path)
    for name in sorted(_relative_files(path)):
        if Path(name).name == DCP_METADATA_FILE:
            check_dcp_folder((path / name).parent)
        elif name.endswith(".pt"):
            load_weights_only(path / name)


def read_training_info(path: Path) -> dict[str, Any]:
    """The training_info.json of a checkpoint (the save state and metrics).

    Raises:
        CheckpointError: the file is missing or is not a JSON object, naming it.
    """
    info_file = Path(path) / TRAINING_INFO_FILE
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{info_file}: not readable as JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{info_file}: expected a JSON object, got {type(info).__name__}")
    return info


def _relative_files(folder: Path) -> set[str]:
    """Every file under `folder`, as a path relative to it with forward slashes."""
    found = set()
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            found.add((Path(dirpath) / name).relative_to(folder).as_posix())
    return found


def _sha256_files(paths: list[Path]) -> list[str]:
    """sha256 hex digests of `paths`, hashed in parallel threads."""

    def digest(path: Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        return list(pool.map(digest, paths))


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


def _remove_own(path: Path) -> None:
    """Remove a folder of the manager's (it holds the marker); refuse anyone else's.

    Raises:
        CheckpointError: `path` does not hold the marker file.
    """
    if not (path / MARKER_FILE).is_file():
        raise CheckpointError(
            f"{path}: named like a checkpointer folder but without its marker file "
            f"{MARKER_FILE} (left by an rl_toolkit older than markers, or not the "
            "checkpointer's); delete or move it"
        )
    shutil.rmtree(path)


def _delete_crash_safe(path: Path) -> None:
    """Remove a checkpoint so that a crash half way never leaves a half-deleted `step_N`.

    The folder is first renamed to a trash name (atomic), then removed; a trash folder left
    by a crash is removed when the next run starts.
    """
    # A checkpoint saved before markers existed gets one, so that its trash folder is ours.
    (path / MARKER_FILE).touch()
    trash = path.with_name(_TRASH_PREFIX + path.name)
    if trash.exists():
        _remove_own(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `damaged_step_N` (or `damaged_step_N-2`, ...): never
    picked, never counted by retention, never deleted, and there to look into."""
    aside = path.with_name(_DAMAGED_PREFIX + path.name)
    n = 2
    while aside.exists():
        aside = path.with_name(f"{_DAMAGED_PREFIX}{path.name}-{n}")
        n += 1
    os.rename(path, aside)
    return aside


class CheckpointManager:
    """Finds the checkpoint to resume from, writes new ones atomically and applies retention.

    Used by the driver only; workers write into the folder that `begin` returns, which must
    be on a file system every node sees.

    Attributes:
        run_dir: the folder this run saves `step_N` checkpoints in (see `CheckpointingConfig`).
        resume_path: the checkpoint to resume from, or None to start from scratch. Found and
            verified (`verify_checkpoint`) on first use, since that reads every byte of it.
    """

    def __init__(self, config: CheckpointingConfig) -> None:
        """Check the config, pick the run folder, check a resume path, clean stale folders.

        Raises:
            ValueError: keep_top_k below 1 or save_period below 1.
            ConfigError: a resume path that is not a complete checkpoint (or that would mix
                histories with later checkpoints), or a folder named like the manager's
                temporary or trash folders that does not hold its marker file.
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
        if not config["enabled"]:
            return
        self._clean_stale_folders()
        if config["resume"] not in ("auto", "never"):
            self._check_resume_path(Path(config["resume"]))

    def _check_resume_path(self, path: Path) -> None:
        """Check that an explicit resume path is a checkpoint that does not fork the run folder."""
        if not path.exists():
            raise ConfigError(f"checkpointing.resume: {path} does not exist")
        if not is_complete_checkpoint(path):
            raise ConfigError(
                f"checkpointing.resume: {path} is not a complete checkpoint (expected a step_N "
                f"folder holding {TRAINING_INFO_FILE}); use 'auto', 'never' or such a folder"
            )
        step = _step_of(path)
        later = [p.name for s, p in list_checkpoints(self.run_dir) if s > step]
        if later:
            # Saving new steps next to later ones would let retention and "auto" mix two runs.
            raise ConfigError(
                f"checkpointing.resume: {path} is at step {step} but checkpointing.checkpoint_dir "
                f"{self.run_dir} already holds later checkpoints {later}; set "
                "checkpointing.checkpoint_dir to another folder for the resumed run"
            )

    @functools.cached_property
    def resume_path(self) -> Path | None:
        """The verified checkpoint to resume from; None to start from scratch.

        With resume="auto", the newest checkpoint of `run_dir` that verifies: each newer one
        that does not is renamed to `damaged_step_N` with a warning saying what was wrong.

        Raises:
            CheckpointError: an explicit resume path that does not verify.
        """
        resume = self.config["resume"]
        if not self.enabled or resume == "never":
            return None
        if resume != "auto":
            try:
                verify_checkpoint(Path(resume))
            except CheckpointError as e:
                raise CheckpointError(f"checkpointing.resume: {e}") from None
            return Path(resume)
        for _, path in reversed(list_checkpoints(self.run_dir)):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                aside = _set_aside(path)
                _log.warning("Not resuming from %s: %s; renamed it %s", path, e, aside.name)
                continue
            return path
        return None

    @property
    def enabled(self) -> bool:
        return self.config["enabled"]

    def _clean_stale_folders(self) -> None:
        """Remove the temporary and trash folders that a killed process left behind.

        Only folders named exactly `tmp_step_<N>` or `trash_step_<N>` and holding the marker
        file are the manager's; any other folder is left alone.
        """
        if not self.run_dir.is_dir():
            return
        for path in sorted(self.run_dir.iterdir()):
            if path.is_dir() and _STALE_RE.match(path.name):
                _remove_own(path)

    def load_training_info(self, path: Path) -> dict[str, Any]:
        """Read the training_info.json of a checkpoint (the save state and metrics).

        Raises:
            CheckpointError: `path` holds no training_info.json, or not a JSON object.
        """
        return read_training_info(path)

    def begin(self, step: int) -> Path:
        """Create the temporary folder that the checkpoint of `step` is written into.

        Returns:
            `run_dir/tmp_step_<step>`, holding only the marker file: a name never taken for a
            checkpoint, so a process killed while writing leaves nothing that a resume would
            read.
        """
        assert self.enabled, "begin() called with checkpointing.enabled=False"
        tmp = self.run_dir / f"{_TMP_PREFIX}step_{step}"
        if tmp.exists():
            _remove_own(tmp)
        tmp.mkdir(parents=True)
        (tmp / MARKER_FILE).write_text("A folder of rl_toolkit's CheckpointManager.\n")
        return tmp

    def finalize(self, tmp: Path, step: int, training_info: dict[str, Any]) -> Path:
        """Seal a checkpoint: write training_info.json and the manifest, sync, rename to `step_N`,
        apply retention.

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
        write_manifest(tmp)
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
        that metric are kept too (ties go to the newer step; a missing value, or an unreadable
        training_info.json, ranks last); without it, the latest `keep_top_k` by step.
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
                key=lambda p: self._rank_key(self._metric(p, metric_name)),
            )
        keep = set(ranked[:keep_top_k]) | {checkpoints[-1][1]}
        return [path for _, path in checkpoints if path not in keep]

    def _metric(self, path: Path, metric_name: str) -> float | None:
        try:
            return read_training_info(path).get(metric_name)
        except CheckpointError as e:
            _log.warning("%s; %s ranks last for retention", e, path.name)
            return None

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
    # legacy=True is the default; numpy's stub types the call without it as returning a dict.
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple), "the global RandomState is an MT19937: a legacy tuple"
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
    state = load_weights_only(path)
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
    return load_weights_only(path)
