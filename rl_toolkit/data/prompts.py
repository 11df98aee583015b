"""Prompt data for RL: rows of a prompt (a string, or chat messages) and metadata columns, read
from local files or the hub, checked row by row and tokenised up front.

`data.format` says how a row's prompt is read; the column names are configurable. Each row
becomes a row of the formatted split with fixed column names:

    prompt     the string of data.prompt_key
    chat       the messages of data.messages_key (role and content kept), ending with a turn
               that is not the assistant's
    metadata   the columns of data.metadata_keys, as one JSON object (an Arrow column holds one
               type; a JSON string keeps each row's values as they were: 42, "42", [1, 2], null)

A prompt longer than the prompt budget (the tokens left for it next to the generated ones) is
dropped and counted, with its row number in the log. A malformed row stops the run with a
DataError (a ConfigError) naming the file and the row.
"""

import json
import logging
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from rl_toolkit.config_schema import PromptDataConfig
from rl_toolkit.data.interfaces import TaskDataSpec, Text
from rl_toolkit.data.processes import tokenize_rows
from rl_toolkit.data.rows import (
    DataError,
    check_text,
    first_rows,
    read_source_records,
    rows_to_dataset,
)
from rl_toolkit.data.tokenization import tokenize_prompt

logger = logging.getLogger(__name__)


def _value(record: dict[str, Any], key: str, where: str, what: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing {what} {key!r}; the row has keys {sorted(record)}")
    return record[key]


def check_prompt_messages(value: Any, key: str, where: str) -> list[dict[str, str]]:
    """Check a chat prompt and keep each message's role and content.

    A chat prompt is a non-empty list of messages with string `role` and `content` whose last
    message is not the assistant's: generation writes the assistant's next turn.

    Raises:
        DataError: naming `where` (file and row), `key` and what is wrong.
    """
    if not isinstance(value, list):
        raise DataError(
            f"{where}: {key!r} must be a list of chat messages, got {type(value).__name__}"
        )
    check_text(value, key, where, is_response=False)
    if value[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: {key!r} ends with an assistant message; a prompt ends with the turn the "
            "assistant answers (user, system or tool)"
        )
    # Other keys (name, tool_calls, ...) are dropped: Arrow would give every row all of them.
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _metadata_json(record: dict[str, Any], keys: list[str], where: str) -> str:
    metadata = {
        key: _value(record, key, where, "metadata column (data.metadata_keys)") for key in keys
    }
    try:
        return json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"{where}: a metadata column (data.metadata_keys) holds a value that JSON cannot "
            f"carry ({error})"
        ) from None


def extract_prompt_row(record: Any, data_config: PromptDataConfig, where: str) -> dict[str, Any]:
    """Turn one raw record into a checked row of the formatted split (see the module docstring).

    Args:
        record: the raw row (a dict).
        data_config: the `data` section: format, the column names, metadata_keys.
        where: "file, row N", used in error messages.

    Returns:
        {"prompt": a string or messages, "metadata": the metadata columns as a JSON object}.

    Raises:
        DataError: a missing key, a wrong type, or a chat prompt ending with the assistant.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt: Text
    if data_config["format"] == "chat":
        key = data_config["messages_key"]
        prompt = check_prompt_messages(_value(record, key, where, "key"), key, where)
    else:
        key = data_config["prompt_key"]
        prompt = _value(record, key, where, "key")
        if not isinstance(prompt, str):
            raise DataError(
                f"{where}: {key!r} must be a string (data.format=prompt; use data.format=chat "
                f"for messages), got {type(prompt).__name__}"
            )
    return {
        "prompt": prompt,
        "metadata": _metadata_json(record, data_config["metadata_keys"], where),
    }


def load_prompt_rows(
    records: list[tuple[int, Any]], source: str, *, split: str, data_config: PromptDataConfig
) -> datasets.Dataset:
    """Check raw `(row_number, record)` tuples and build the formatted split.

    Args:
        records: raw rows with their 1-based row numbers.
        source: names the file (or hub split) in error messages.
        split: "train" or "validation", recorded as the dataset's split.
        data_config: the `data` section.

    Returns:
        A datasets.Dataset with the columns `prompt` and `metadata` (a JSON object per row).
    """
    if not records:
        raise DataError(f"{source}: no rows")
    rows = [
        extract_prompt_row(record, data_config, f"{source}, row {number}")
        for number, record in records
    ]
    return rows_to_dataset(rows, [number for number, _ in records], source, split, keys=())


class PromptDataset:
    """The training and validation prompts named by the `data` section of an RL config.

    Each split is a local .jsonl / .json / .parquet file or a hub dataset (`data.train_split`,
    `data.val_split`), read through `datasets.load_dataset`.

    Attributes:
        formatted_ds: {"train", "validation"}: datasets.Dataset with the columns `prompt` and
            `metadata` (module docstring).
        task_spec: TaskDataSpec(task_name="prompts").
    """

    def __init__(self, data_config: PromptDataConfig) -> None:
        self.formatted_ds = {}
        for name, path_key, split_key in (
            ("train", "train_data_path", "train_split"),
            ("validation", "val_data_path", "val_split"),
        ):
            records, source = read_source_records(data_config[path_key], data_config[split_key])
            self.formatted_ds[name] = load_prompt_rows(
                records, source, split=name, data_config=data_config
            )
        self.task_spec = TaskDataSpec(task_name="prompts")


# A dropped prompt (or, in a worker, a bad row) keeps no tokens.
_NO_TOKENS = {"input_ids": [], "dropped": True}

# The columns Dataset.map writes (processes.tokenize_rows).
_TOKENIZED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int64")),
        "dropped": datasets.Value("bool"),
        "error": datasets.Value("string"),
    }
)


def _tokenize_row(
    row: dict[str, Any],
    index: int,
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    source: str,
) -> dict[str, Any]:
    """Tokenise one formatted row's prompt; an overlong prompt keeps no tokens (dropped)."""
    ids = tokenize_prompt(tokenizer, row["prompt"], f"{source}, row {index + 1}")
    if len(ids) > max_prompt_length:
        return dict(_NO_TOKENS)
    return {"input_ids": ids, "dropped": False}


class TokenizedPromptDataset(torch.utils.data.Dataset):
    """One split of prompts, tokenised up front, for prompt_collate_fn.

    Item i is a dict: `prompt_id` (int, the row's index in the formatted split, stable across
    runs), `input_ids` (int64 tensor `[n]`: the prompt through the chat template with the
    generation prompt, or as plain text), `prompt` (the string or messages as read) and
    `metadata` (a dict of the data.metadata_keys columns).

    Args:
        rows: the formatted split (prompt, metadata).
        tokenizer: the policy's tokenizer.
        data_format: data.format ("prompt" or "chat": chat needs a chat template).
        max_prompt_length: the longest prompt kept, in tokens; longer ones are dropped.
        source: names the split in logs and errors (e.g. "prompts[train]").
        task_spec: the dataset's task spec, kept for the recipe.
        num_proc: processes that tokenise (data.tokenize_num_proc); the items, counts and
            errors do not depend on it (see processes.tokenize_rows).

    Attributes:
        counts: {"num_rows", "num_prompts", "num_dropped" (too long), "num_tokens"} (tokens
            of the kept prompts).
        dropped_rows: the 1-based row numbers (within the split) of the dropped prompts.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        data_format: str,
        max_prompt_length: int,
        source: str,
        task_spec: TaskDataSpec | None = None,
        num_proc: int = 1,
    ) -> None:
        assert max_prompt_length >= 1, f"a prompt budget of {max_prompt_length} tokens"
        if data_format == "chat" and tokenizer.chat_template is None:
            raise DataError(
                f"{source}: chat prompts need a chat template, but the tokenizer has none; set "
                "policy.tokenizer.chat_template, or use data.format=prompt"
            )
        self.task_spec = task_spec
        tokenized = tokenize_rows(
            rows,
            _tokenize_row,
            columns=["prompt"],
            features=_TOKENIZED_FEATURES,
            empty=dict(_NO_TOKENS),
            num_proc=num_proc,
            kwargs={
                "tokenizer": tokenizer,
                "max_prompt_length": max_prompt_length,
                "source": source,
            },
        )
        prompts, metadata = rows["prompt"], rows["metadata"]
        self.items: list[dict[str, Any]] = []
        self.dropped_rows: list[int] = []
        for index, prompt in enumerate(tokenized):
            if prompt["dropped"]:
                self.dropped_rows.append(index + 1)
                continue
            self.items.append(
                {
                    "prompt_id": index,
                    "input_ids": torch.tensor(prompt["input_ids"], dtype=torch.int64),
                    "prompt": prompts[index],
                    "metadata": json.loads(metadata[index]),
                }
            )
        self.counts = {
            "num_rows": len(rows),
            "num_prompts": len(self.items),
            "num_dropped": len(self.dropped_rows),
            "num_tokens": sum(len(item["input_ids"]) for item in self.items),
        }
        self._log_counts(source, max_prompt_length)
        if not self.items:
            raise DataError(
                f"{source}: no prompt fits in the prompt budget of {max_prompt_length} tokens; "
                "raise policy.max_total_sequence_length or generate fewer tokens"
            )

    def _log_counts(self, source: str, max_prompt_length: int) -> None:
        """One line: prompts and tokens kept, and the dropped ones with their first rows."""
        counts = self.counts
        log = logger.warning if counts["num_dropped"] else logger.info
        log(
            "%s: %d prompts from %d rows, %d tokens; dropped %d longer than %d tokens%s",
            source,
            counts["num_prompts"],
            counts["num_rows"],
            counts["num_tokens"],
            counts["num_dropped"],
            max_prompt_length,
            first_rows(self.dropped_rows),
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def tokenize_prompt_dataset(
    rows: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    task_spec: TaskDataSpec,
    data_config: PromptDataConfig,
    *,
    max_prompt_length: int,
) -> TokenizedPromptDataset:
    """Tokenise one formatted split (e.g. `dataset.formatted_ds["train"]`) for the loader.

    Args:
        rows: the formatted split.
        tokenizer: the policy's tokenizer.
        task_spec: the dataset's task spec; its name (and the split's name) label logs/errors.
        data_config: the `data` section (format, tokenize_num_proc).
        max_prompt_length: the prompt budget: policy.max_total_sequence_length minus the most
            tokens generated per prompt, so that every prompt + completion fits.

    Returns:
        The tokenised TokenizedPromptDataset.
    """
    source = task_spec["task_name"] + (f"[{rows.split}]" if rows.split else "")
    path_key = {"train": "train_data_path", "validation": "val_data_path"}.get(str(rows.split))
    if path_key is not None:
        source += f" ({data_config[path_key]})"  # rows are numbered from 1 within the split
    return TokenizedPromptDataset(
        rows,
        tokenizer,
        data_format=data_config["format"],
        max_prompt_length=max_prompt_length,
        source=source,
        task_spec=task_spec,
        num_proc=data_config["tokenize_num_proc"],
    )
