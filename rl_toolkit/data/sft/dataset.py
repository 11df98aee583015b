"""The tokenised SFT split the loader reads, with the length policy applied and counted."""

import logging
from typing import Any, Literal

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from rl_toolkit.config_schema import SFTDataConfig
from rl_toolkit.data.interfaces import TaskDataSpec
from rl_toolkit.data.processes import tokenize_rows
from rl_toolkit.data.rows import DataError, first_rows
from rl_toolkit.data.sft.rows import FORMAT_COLUMNS
from rl_toolkit.data.sft.tokenization import fit_sequence, tokenize_sft_row

logger = logging.getLogger(__name__)

# A dropped sequence (or, in a worker, a bad row) keeps no tokens.
_NO_TOKENS = {"input_ids": [], "token_mask": [], "truncated": False, "dropped": True}

# The columns Dataset.map writes (processes.tokenize_rows).
_TOKENIZED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int64")),
        "token_mask": datasets.List(datasets.Value("bool")),
        "truncated": datasets.Value("bool"),
        "dropped": datasets.Value("bool"),
        "error": datasets.Value("string"),
    }
)


def _tokenize_row(
    row: dict[str, Any],
    index: int,
    *,
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    max_total_sequence_length: int,
    overlong_policy: Literal["drop", "truncate"],
    source: str,
) -> dict[str, Any]:
    """Tokenise one formatted row and fit it to the length policy (used in and out of workers).

    Returns:
        {"input_ids", "token_mask", "truncated", "dropped"}; the lists are empty when the
        sequence is dropped for its length.
    """
    where = f"{source}, row {index + 1}"
    ids, mask = tokenize_sft_row(tokenizer, row, data_format, where)
    if not any(mask):
        raise DataError(f"{where}: no token to learn (the loss mask is empty)")
    fitted = fit_sequence(
        ids,
        mask,
        max_total_sequence_length=max_total_sequence_length,
        overlong_policy=overlong_policy,
    )
    if fitted is None:
        return dict(_NO_TOKENS)
    return {
        "input_ids": fitted[0],
        "token_mask": fitted[1],
        "truncated": len(fitted[0]) < len(ids),
        "dropped": False,
    }


class SFTSequenceDataset(torch.utils.data.Dataset):
    """One split of SFT sequences, tokenised up front, for sft_collate_fn.

    Item i is a dict: `sample_id` (int, the row's index in the formatted split, stable across
    runs), `input_ids` (int64 tensor `[n]`) and `token_mask` (float32 tensor `[n]`, 1.0 on the
    tokens the loss learns; 0.0 at position 0).

    Args:
        rows: the formatted split (the columns of FORMAT_COLUMNS[data_format]).
        tokenizer: the policy's tokenizer.
        data_format: data.format ("chat", "prompt_completion" or "text").
        max_total_sequence_length: the longest allowed sequence, in tokens.
        overlong_policy: "drop" or "truncate" (see tokenization.fit_sequence).
        source: names the split in logs and errors (e.g. "sft[train]").
        task_spec: the dataset's task spec, kept for the recipe.
        num_proc: processes that tokenise (data.tokenize_num_proc); the items, counts and
            errors do not depend on it (see processes.tokenize_rows).

    Attributes:
        counts: {"num_rows", "num_sequences", "num_dropped" (too long), "num_truncated",
            "num_tokens", "num_loss_tokens"} (tokens of the kept sequences).
        dropped_rows: the 1-based row numbers (within the split) of the dropped sequences.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        data_format: str,
        max_total_sequence_length: int,
        overlong_policy: Literal["drop", "truncate"],
        source: str,
        task_spec: TaskDataSpec | None = None,
        num_proc: int = 1,
    ) -> None:
        self.task_spec = task_spec
        columns = list(FORMAT_COLUMNS[data_format])
        tokenized = tokenize_rows(
            rows,
            _tokenize_row,
            columns=columns,
            features=_TOKENIZED_FEATURES,
            empty=dict(_NO_TOKENS),
            num_proc=num_proc,
            kwargs={
                "tokenizer": tokenizer,
                "data_format": data_format,
                "max_total_sequence_length": max_total_sequence_length,
                "overlong_policy": overlong_policy,
                "source": source,
            },
        )
        self.items: list[dict[str, Any]] = []
        self.dropped_rows: list[int] = []
        num_truncated = 0
        for index, sequence in enumerate(tokenized):
            if sequence["dropped"]:
                self.dropped_rows.append(index + 1)
                continue
            num_truncated += sequence["truncated"]
            self.items.append(
                {
                    "sample_id": index,
                    "input_ids": torch.tensor(sequence["input_ids"], dtype=torch.int64),
                    "token_mask": torch.tensor(sequence["token_mask"], dtype=torch.float32),
                }
            )
        self.counts = {
            "num_rows": len(rows),
            "num_sequences": len(self.items),
            "num_dropped": len(self.dropped_rows),
            "num_truncated": num_truncated,
            "num_tokens": sum(len(item["input_ids"]) for item in self.items),
            "num_loss_tokens": int(sum(item["token_mask"].sum() for item in self.items)),
        }
        self._log_counts(source, max_total_sequence_length, overlong_policy)
        if not self.items:
            raise DataError(
                f"{source}: no sequence fits in {max_total_sequence_length} tokens; raise "
                "policy.max_total_sequence_length or use data.overlong_policy=truncate"
            )

    def _log_counts(self, source: str, max_length: int, overlong_policy: str) -> None:
        """One line: sequences and tokens kept, dropped and truncated with the first rows."""
        counts = self.counts
        log = logger.warning if counts["num_dropped"] or counts["num_truncated"] else logger.info
        log(
            "%s: %d sequences from %d rows, %d tokens of which %d are learned; dropped %d "
            "longer than %d tokens%s; %d truncated (data.overlong_policy=%s)",
            source,
            counts["num_sequences"],
            counts["num_rows"],
            counts["num_tokens"],
            counts["num_loss_tokens"],
            counts["num_dropped"],
            max_length,
            first_rows(self.dropped_rows),
            counts["num_truncated"],
            overlong_policy,
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def tokenize_sft_dataset(
    rows: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    task_spec: TaskDataSpec,
    data_config: SFTDataConfig,
    *,
    max_total_sequence_length: int,
) -> SFTSequenceDataset:
    """Tokenise one formatted split (e.g. `dataset.formatted_ds["train"]`) for the loader.

    Args:
        rows: the formatted split.
        tokenizer: the policy's tokenizer.
        task_spec: the dataset's task spec; its name (and the split's name) label logs/errors.
        data_config: the `data` section (format, overlong_policy, tokenize_num_proc).
        max_total_sequence_length: policy.max_total_sequence_length.

    Returns:
        The tokenised SFTSequenceDataset.
    """
    source = task_spec["task_name"] + (f"[{rows.split}]" if rows.split else "")
    path_key = {"train": "train_data_path", "validation": "val_data_path"}.get(str(rows.split))
    if path_key is not None:
        source += f" ({data_config[path_key]})"  # rows are numbered from 1 within the split
    return SFTSequenceDataset(
        rows,
        tokenizer,
        data_format=data_config["format"],
        max_total_sequence_length=max_total_sequence_length,
        overlong_policy=data_config["overlong_policy"],
        source=source,
        task_spec=task_spec,
        num_proc=data_config["tokenize_num_proc"],
    )
