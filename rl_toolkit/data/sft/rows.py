"""SFT rows: the three formats, read from local files or the hub and checked row by row.

`data.format` says how a row is read; the column names are configurable. Each row becomes a row
of the formatted split with fixed column names:

    chat               {"messages": [{"role": str, "content": str}, ...]}
    prompt_completion  {"prompt": Text, "completion": Text}   (Text: a string or messages)
    text               {"text": str}

A malformed row stops the run with a DataError (a ConfigError) naming the file and the row.
"""

from typing import Any

import datasets

from rl_toolkit.config_schema import SFTDataConfig
from rl_toolkit.data.interfaces import TaskDataSpec
from rl_toolkit.data.rows import DataError, check_text, read_source_records, rows_to_dataset

# The columns of the formatted split, per data.format, in the order the tokenizers take them.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def _value(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing key {key!r}; the row has keys {sorted(record)}")
    return record[key]


def check_conversation(value: Any, key: str, where: str) -> list[dict[str, str]]:
    """Check a chat row's messages and keep their role and content.

    A conversation is a non-empty list of messages with string `role` and `content`; it has at
    least one assistant message (the tokens to learn), and it opens with another role, so that
    every assistant turn has a prompt to answer.

    Raises:
        DataError: naming `where` (file and row), `key` and what is wrong.
    """
    if not isinstance(value, list):
        raise DataError(
            f"{where}: {key!r} must be a list of chat messages, got {type(value).__name__}"
        )
    check_text(value, key, where, is_response=False)
    roles = [message["role"] for message in value]
    if "assistant" not in roles:
        raise DataError(f"{where}: {key!r} has no assistant message, so nothing to learn")
    if roles[0] == "assistant":
        raise DataError(
            f"{where}: {key!r} opens with an assistant message; a conversation must open with "
            "a system or user message"
        )
    # Other keys (name, tool_calls, ...) are dropped: Arrow would give every row all of them.
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _chat_row(record: dict[str, Any], data_config: SFTDataConfig, where: str) -> dict[str, Any]:
    key = data_config["messages_key"]
    return {"messages": check_conversation(_value(record, key, where), key, where)}


def _prompt_completion_row(
    record: dict[str, Any], data_config: SFTDataConfig, where: str
) -> dict[str, Any]:
    prompt_key, completion_key = data_config["prompt_key"], data_config["completion_key"]
    prompt, completion = _value(record, prompt_key, where), _value(record, completion_key, where)
    return {
        "prompt": check_text(prompt, prompt_key, where, is_response=False),
        "completion": check_text(completion, completion_key, where, is_response=True),
    }


def _text_row(record: dict[str, Any], data_config: SFTDataConfig, where: str) -> dict[str, Any]:
    key = data_config["text_key"]
    text = _value(record, key, where)
    if not isinstance(text, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(text).__name__}")
    return {"text": check_text(text, key, where, is_response=True)}


_ROW_EXTRACTORS = {
    "chat": _chat_row,
    "prompt_completion": _prompt_completion_row,
    "text": _text_row,
}


def extract_sft_row(record: Any, data_config: SFTDataConfig, where: str) -> dict[str, Any]:
    """Turn one raw record into a checked row of the formatted split (see the module docstring).

    Args:
        record: the raw row (a dict).
        data_config: the `data` section: format and the column names.
        where: "file, row N", used in error messages.

    Raises:
        DataError: a missing key, a wrong type, or an empty completion or text.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return _ROW_EXTRACTORS[data_config["format"]](record, data_config, where)


def load_sft_rows(
    records: list[tuple[int, Any]], source: str, *, split: str, data_config: SFTDataConfig
) -> datasets.Dataset:
    """Check raw `(row_number, record)` tuples and build the formatted split.

    Args:
        records: raw rows with their 1-based row numbers.
        source: names the file (or hub split) in error messages.
        split: "train" or "validation", recorded as the dataset's split.
        data_config: the `data` section.

    Returns:
        A datasets.Dataset with the columns FORMAT_COLUMNS[data.format].
    """
    if not records:
        raise DataError(f"{source}: no rows")
    rows = [
        extract_sft_row(record, data_config, f"{source}, row {number}")
        for number, record in records
    ]
    numbers = [number for number, _ in records]
    keys = ("prompt", "completion") if data_config["format"] == "prompt_completion" else ()
    return rows_to_dataset(rows, numbers, source, split, keys=keys)


class SFTDataset:
    """The training and validation rows named by the `data` section of an SFT config.

    Each split is a local .jsonl / .json / .parquet file or a hub dataset (`data.train_split`,
    `data.val_split`), read through `datasets.load_dataset`.

    Attributes:
        formatted_ds: {"train", "validation"}: datasets.Dataset with the columns of
            FORMAT_COLUMNS[data.format].
        task_spec: TaskDataSpec(task_name="sft").
    """

    def __init__(self, data_config: SFTDataConfig) -> None:
        self.formatted_ds = {}
        for name, path_key, split_key in (
            ("train", "train_data_path", "train_split"),
            ("validation", "val_data_path", "val_split"),
        ):
            records, source = read_source_records(data_config[path_key], data_config[split_key])
            self.formatted_ds[name] = load_sft_rows(
                records, source, split=name, data_config=data_config
            )
        self.task_spec = TaskDataSpec(task_name="sft")
