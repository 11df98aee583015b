"""BatchedDataDict: a dict of per-row values that move through the runtime together.

Every value is a tensor or a list whose dimension 0 is the batch (one entry per row). Rows come
in groups of `group_size` consecutive rows that must never be separated: preference batches use
`group_size == 2` with chosen and rejected responses interleaved `[c0, r0, c1, r1, ...]`, so a
shard or micro-batch always holds whole pairs. Every method returns a new BatchedDataDict with
the same `group_size`.

The class is generic in a TypedDict that names its keys, for readers and type checkers:
`BatchedDataDict[PreferenceBatch]` (rl_toolkit/data/collate.py) is the preference batch.
"""

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F

KeysT = TypeVar("KeysT")  # a TypedDict of the keys, their dtypes and shapes


class BatchedDataDict(dict, Generic[KeysT]):
    """A dict of tensors and lists that share the batch dimension 0.

    Args:
        *args, **kwargs: as for `dict`; the values are tensors `[N, ...]` or lists of length N.
        group_size: number of consecutive rows that form one group (2 for preference pairs).
    """

    def __init__(self, *args: Any, group_size: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if group_size < 1:
            raise ValueError(f"BatchedDataDict: group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    @property
    def size(self) -> int:
        """Number of rows (0 for an empty dict); all values must have the same length."""
        lengths = {key: len(value) for key, value in self.items()}
        if not lengths:
            return 0
        assert len(set(lengths.values())) == 1, f"values disagree on the batch size: {lengths}"
        return next(iter(lengths.values()))

    def _new(self, data: dict[str, Any]) -> "BatchedDataDict":
        return BatchedDataDict(data, group_size=self.group_size)

    def _check_group_aligned(self, what: str, num_rows: int) -> None:
        if num_rows % self.group_size != 0:
            raise ValueError(
                f"BatchedDataDict: {what} must be a multiple of group_size={self.group_size} "
                f"so that groups (e.g. chosen/rejected pairs) stay whole, got {num_rows}"
            )

    def slice(self, start: int, end: int) -> "BatchedDataDict":
        """Rows `start:end` (both multiples of group_size).

        Args:
            start: first row, inclusive.
            end: last row, exclusive.

        Returns:
            A BatchedDataDict of `end - start` rows; tensors are views of this one's.
        """
        self._check_group_aligned("slice start", start)
        self._check_group_aligned("slice end", end)
        return self._new({key: value[start:end] for key, value in self.items()})

    def select_indices(self, indices: Sequence[int] | torch.Tensor) -> "BatchedDataDict":
        """Rows at `indices`, in that order.

        The caller keeps groups whole (e.g. for pairs, indices `2i, 2i + 1` together); only the
        count is checked here.

        Args:
            indices: row indices, a sequence of ints or a 1-D integer tensor `[M]`.

        Returns:
            A BatchedDataDict of M rows (tensors are copies).
        """
        index_list = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        self._check_group_aligned("the number of selected indices", len(index_list))
        selected: dict[str, Any] = {}
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                selected[key] = value[torch.tensor(index_list, dtype=torch.long)]
            else:
                selected[key] = [value[i] for i in index_list]
        return self._new(selected)

    def _split_balanced(self, num_shards: int) -> list["BatchedDataDict"]:
        # Whole groups per shard: the first `extra` shards get one group more than the others.
        num_groups = self.size // self.group_size
        base, extra = divmod(num_groups, num_shards)
        shards, start = [], 0
        for shard_idx in range(num_shards):
            end = start + (base + (1 if shard_idx < extra else 0)) * self.group_size
            shards.append(self.slice(start, end))
            start = end
        return shards

    def shard_by_batch_size(
        self, num_shards: int, batch_size: int | None = None
    ) -> list["BatchedDataDict"]:
        """Split into `num_shards` contiguous shards that never split a group.

        Without `batch_size` the rows are split into balanced contiguous shards (sizes differ by
        at most one group). With `batch_size` the rows are first cut into consecutive chunks of
        `batch_size` rows (e.g. global batches), each chunk is split that way, and shard i is the
        concatenation of the i-th pieces of all chunks, in chunk order. So when `batch_size` is a
        multiple of `num_shards * group_size`, every shard holds `batch_size // num_shards` rows
        of each chunk.

        Args:
            num_shards: number of shards (e.g. the data-parallel world size).
            batch_size: rows per chunk; must divide the number of rows and be a multiple of
                group_size.

        Returns:
            `num_shards` BatchedDataDicts, shard i for worker i (some may be empty when there
            are fewer groups than shards).
        """
        if num_shards < 1:
            raise ValueError(f"BatchedDataDict: num_shards must be >= 1, got {num_shards}")
        self._check_group_aligned("the number of rows", self.size)
        if batch_size is None:
            return self._split_balanced(num_shards)
        self._check_group_aligned("batch_size", batch_size)
        if batch_size < 1 or self.size % batch_size != 0:
            raise ValueError(
                f"BatchedDataDict: batch_size={batch_size} must be positive and divide the "
                f"number of rows ({self.size})"
            )
        if self.size == 0:
            return self._split_balanced(num_shards)
        chunks = [
            self.slice(start, start + batch_size) for start in range(0, self.size, batch_size)
        ]
        pieces = [chunk._split_balanced(num_shards) for chunk in chunks]  # [chunk][shard]
        return [
            BatchedDataDict.from_batches([chunk_pieces[shard] for chunk_pieces in pieces])
            for shard in range(num_shards)
        ]

    @classmethod
    def from_batches(
        cls,
        batches: list["BatchedDataDict"],
        pad_value_dict: dict[str, int | float] | None = None,
    ) -> "BatchedDataDict":
        """Concatenate batches along dim 0.

        Tensors whose dim 1 (sequence) differs between batches are first right-padded to the
        longest with `pad_value_dict[key]` (0 for keys not in it), e.g. the pad token for
        `input_ids`.

        Args:
            batches: BatchedDataDicts with the same keys and the same group_size.
            pad_value_dict: padding value per key.

        Returns:
            One BatchedDataDict with the rows of all batches in order.
        """
        if not batches:
            raise ValueError("BatchedDataDict.from_batches: got an empty list of batches")
        group_size, keys = batches[0].group_size, list(batches[0].keys())
        for batch_idx, batch in enumerate(batches):
            if batch.group_size != group_size or set(batch.keys()) != set(keys):
                raise ValueError(
                    f"BatchedDataDict.from_batches: batch {batch_idx} has group_size="
                    f"{batch.group_size} and keys {sorted(batch.keys())}; expected group_size="
                    f"{group_size} and keys {sorted(keys)} like batch 0"
                )
        pad_values = pad_value_dict or {}
        merged: dict[str, Any] = {}
        for key in keys:
            values = [batch[key] for batch in batches]
            if isinstance(values[0], torch.Tensor):
                merged[key] = _cat_padded(values, pad_values.get(key, 0))
            else:
                merged[key] = [item for value in values for item in value]
        return cls(merged, group_size=group_size)

    def to(self, device: torch.device | str) -> "BatchedDataDict":
        """Copy with every tensor moved to `device` (lists are shared, not copied)."""
        return self._new(
            {
                key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in self.items()
            }
        )


def _cat_padded(tensors: list[torch.Tensor], pad_value: int | float) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 of each tensor to the longest first."""
    if tensors[0].dim() >= 2:
        max_len = max(tensor.shape[1] for tensor in tensors)
        tensors = [_pad_dim1(tensor, max_len, pad_value) for tensor in tensors]
    return torch.cat(tensors, dim=0)


def _pad_dim1(tensor: torch.Tensor, length: int, pad_value: int | float) -> torch.Tensor:
    num_missing = length - tensor.shape[1]
    if num_missing == 0:
        return tensor
    # F.pad lists (left, right) pairs from the last dimension backwards; dim 1 is the
    # (dim - 2)-th pair, so every later dimension gets (0, 0).
    pad = [0, 0] * (tensor.dim() - 2) + [0, num_missing]
    return F.pad(tensor, pad, value=pad_value)
