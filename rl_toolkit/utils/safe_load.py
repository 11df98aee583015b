"""Read checkpoint files without ever running code from them.

Two kinds of file in a checkpoint are pickles, and a pickle can name any function to call
while it is read:

- torch.save files (`*.pt`: RNG, dataloader and scheduler state) are read with
  `torch.load(weights_only=True)`: PyTorch's unpickler that builds only tensors, numbers,
  strings and containers.
- torch.distributed.checkpoint (DCP) folders. Their `.metadata` is a plain pickle of DCP's
  metadata dataclasses, and their non-tensor entries (e.g. the optimizer's param_groups) are
  torch.save blobs that DCP reads with `weights_only=False`. `SafeFileSystemReader` reads
  `.metadata` with an unpickler that builds only DCP's metadata classes, `SafeLoadPlanner`
  reads the blobs with `weights_only=True`, and `load_dcp` uses both. (DCP reads tensor entries
  with `weights_only=True` itself.)

A file that asks for anything else, or that is not a pickle at all, fails with a
`CheckpointError` naming the file before anything in it is built.
"""

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import ReadItem

from rl_toolkit.utils.config import ConfigError

DCP_METADATA_FILE = ".metadata"

# What a DCP `.metadata` pickle may name (torch 2.13 writes exactly these); torch dtypes too.
_DCP_METADATA_GLOBALS = frozenset(
    [
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "StorageMeta",
                "MetadataIndex",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a dict lookup of torch.strided and the like
        ("pathlib", "PosixPath"),  # the checkpoint_id the folder was saved under
        ("pathlib._local", "PosixPath"),  # the same class on Python >= 3.13
    ]
)


class CheckpointError(ConfigError):
    """A checkpoint file that is missing, damaged or unsafe; the message names the file."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def read_dcp_metadata(path: Path) -> Metadata:
    """Unpickle a DCP `.metadata` file, building nothing but DCP's metadata classes.

    Raises:
        CheckpointError: the file is missing, not a pickle, or names any other class or
            function (one line, naming the file).
    """
    try:
        with open(path, "rb") as f:
            metadata = _DCPMetadataUnpickler(f).load()
    except Exception as e:  # any failure to parse means the file cannot be used
        raise CheckpointError(f"{path}: not a DCP metadata file ({_one_line(e)})") from None
    if not _is_well_formed(metadata):
        raise CheckpointError(
            f"{path}: not a DCP metadata file (its fields are not what DCP writes)"
        )
    return metadata


def _is_well_formed(metadata: Any) -> bool:
    """Whether the fields that loading indexes have the types DCP writes."""
    return (
        isinstance(metadata, Metadata)
        and isinstance(metadata.state_dict_metadata, dict)
        and isinstance(metadata.storage_data, dict)
        and all(
            isinstance(index, MetadataIndex)
            and isinstance(info, _StorageInfo)
            and isinstance(info.relative_path, str)
            for index, info in metadata.storage_data.items()
        )
    )


def check_dcp_folder(folder: Path) -> None:
    """Open a DCP folder the way `load_dcp` will, without loading its tensors.

    Reads `.metadata` with `read_dcp_metadata` and every non-tensor entry with
    `weights_only=True`; tensor entries are left to DCP, which reads them with
    `weights_only=True` itself.

    Raises:
        CheckpointError: the metadata or an entry is not plain data (one line, naming it).
    """
    metadata = read_dcp_metadata(folder / DCP_METADATA_FILE)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        path = folder / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except Exception as e:  # any failure to parse means the entry cannot be used
            raise CheckpointError(
                f"{path}: entry {index.fqn!r} cannot be loaded as plain data ({_one_line(e)})"
            ) from None


def load_weights_only(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)`: tensors, numbers, strings and containers only.

    Raises:
        CheckpointError: the file is missing, damaged, or asks to build anything else (one
            line, naming the file).
    """
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # any failure to parse means the file cannot be used
        raise CheckpointError(f"{path}: cannot be loaded as plain data ({_one_line(e)})") from None


def _one_line(error: BaseException) -> str:
    """What was wrong, in one line, from a possibly long multi-paragraph error."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", str(error)) if p.strip()]
    if not paragraphs:
        return type(error).__name__
    # torch.load's weights_only error says what it refused in its second paragraph.
    if paragraphs[0].startswith("Weights only load failed") and len(paragraphs) > 1:
        return paragraphs[1]
    return paragraphs[0]


class SafeFileSystemReader(FileSystemReader):
    """A DCP `FileSystemReader` whose `.metadata` is read by `read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # FileSystemReader.read_metadata with pickle.load replaced; the rest is as there.
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """A DCP `DefaultLoadPlanner` that reads non-tensor entries with `weights_only=True`.

    Args:
        checkpoint_id: the DCP folder, named in errors.
    """

    def __init__(self, checkpoint_id: str | os.PathLike) -> None:
        super().__init__()
        self.checkpoint_id = checkpoint_id

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as e:  # any failure to parse means the entry cannot be used
            raise CheckpointError(
                f"{self.checkpoint_id}: entry {fqn!r} cannot be loaded as plain data "
                f"({_one_line(e)})"
            ) from None
        # DefaultLoadPlanner.load_bytes, with the weights_only load above.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load_dcp(state_dict: dict[str, Any], checkpoint_id: str | os.PathLike) -> None:
    """`dcp.load(state_dict, checkpoint_id=...)` that never runs code from the checkpoint.

    Raises:
        CheckpointError: `.metadata` or a non-tensor entry is not plain data (naming it), or
            DCP fails to load the folder (e.g. a truncated shard, or tensors of other shapes).
    """
    # DCP reports a failed read_metadata as warnings with tracebacks and a generic "metadata
    # is None"; reading it here first gives the one-line error.
    read_dcp_metadata(Path(checkpoint_id) / DCP_METADATA_FILE)
    try:
        dcp.load(
            state_dict,
            storage_reader=SafeFileSystemReader(checkpoint_id),
            planner=SafeLoadPlanner(checkpoint_id),
        )
    except CheckpointException as e:
        # DCP gathers every rank's exception into one multi-line BaseException: raise one line.
        errors = [error for error, _ in e.failures.values()]
        ours = [error for error in errors if isinstance(error, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise CheckpointError(f"{checkpoint_id}: cannot be loaded ({_one_line(errors[0])})") from e
