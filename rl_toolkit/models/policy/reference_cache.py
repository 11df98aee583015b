"""Reference log-probs computed once per pair and reused, e.g. in every epoch after the first.

The reference policy does not change during plain DPO, so the reference log-probs of a pair are
the same every time the pair comes back. ``ReferenceLogprobCache`` keeps them on the driver,
keyed by the pair's id and the exact tokens and response mask of the row (so a train and a
validation pair with the same index, or a pair re-tokenised differently, never share an entry),
and only the response positions are stored (the reference scores nothing else). The owner must
``clear()`` it whenever the reference changes (TR-DPO sync): ``Policy`` does.

Memory: 4 bytes per response token of every distinct pair seen, on the driver, up to
``max_bytes``; once full, new pairs are computed every time and not stored (evicting would
thrash when each epoch walks the data in a new order larger than the cache).
"""

import hashlib
from collections.abc import Callable

import torch

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict

# data -> {"reference_logprobs": [M, T]} for the M rows of data
ComputeFn = Callable[[BatchedDataDict], BatchedDataDict]


class ReferenceLogprobCache:
    """Per-row reference log-probs of preference pairs, reused until ``clear()``.

    Args:
        max_bytes: the most memory the stored log-probs may take (> 0).
    """

    def __init__(self, max_bytes: int) -> None:
        assert max_bytes > 0, "a cache of 0 bytes: build none"
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._rows: dict[tuple[int, bytes], torch.Tensor] = {}  # key -> [num response tokens]

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget everything (call when the reference weights change)."""
        self._rows.clear()
        self.num_bytes = 0

    def _store(self, key: tuple[int, bytes], values: torch.Tensor) -> None:
        size = values.numel() * values.element_size()
        if self.num_bytes + size <= self.max_bytes:
            self._rows[key] = values
            self.num_bytes += size

    def get_or_compute(self, data: BatchedDataDict, compute: ComputeFn) -> torch.Tensor:
        """Reference log-probs of every row, computing only the groups not seen before.

        Args:
            data: a preference batch with ``pair_ids`` ``[N]`` (rows with ``pair_ids < 0``, i.e.
                padding rows, are never cached), ``input_ids``, ``input_lengths`` and
                ``token_mask`` ``[N, T]``.
            compute: computes the reference log-probs of a sub-batch of whole groups.

        Returns:
            ``[N, T]`` float32 reference log-probs, 0.0 outside ``token_mask``.
        """
        keys = [self._key(data, row) for row in range(data.size)]
        missing_groups = sorted(
            {row // data.group_size for row, key in enumerate(keys) if key not in self._rows}
        )
        response = data["token_mask"] > 0  # (N, T)
        logprobs = torch.zeros(data["input_ids"].shape)  # (N, T)
        if missing_groups:
            rows = torch.tensor(
                [g * data.group_size + i for g in missing_groups for i in range(data.group_size)]
            )
            computed = compute(data.select_indices(rows))["reference_logprobs"]  # (M, T)
            logprobs[rows] = computed
            for row in rows.tolist():
                if keys[row] is not None:
                    self._store(keys[row], logprobs[row][response[row]].clone())
        for row, key in enumerate(keys):
            if key in self._rows:
                logprobs[row][response[row]] = self._rows[key]
        return logprobs

    @staticmethod
    def _key(data: BatchedDataDict, row: int) -> tuple[int, bytes] | None:
        pair_id = int(data["pair_ids"][row])
        if pair_id < 0:
            return None
        length = int(data["input_lengths"][row])
        digest = hashlib.blake2b(digest_size=16)
        digest.update(data["input_ids"][row, :length].numpy().tobytes())
        digest.update(data["token_mask"][row, :length].numpy().tobytes())
        return pair_id, digest.digest()
