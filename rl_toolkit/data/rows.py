"""Reading data rows from files or the hub and checking them, with errors that name file and row.

A preference row becomes `{"prompt": Text, "chosen_response": Text, "rejected_response": Text}`
where Text is a string or a list of chat messages `[{"role": str, "content": str}, ...]`. The
file readers and the message checks are shared with the SFT rows (rl_toolkit/data/sft/).
"""

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from rl_toolkit.data.interfaces import Text
from rl_toolkit.utils.config import ConfigError

JSON_LINES_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ROW_KEYS = ("prompt", "chosen_response", "rejected_response")


class DataError(ConfigError):
    """A data file or row is malformed; the message names the source and the row."""


# Its first name, from when all data was preference pairs; DPO code and users still catch it.
PreferenceDataError = DataError

# How many row numbers a log line names (e.g. of dropped rows), per reason.
NUM_ROWS_LOGGED = 5


def first_rows(row_numbers: list[int]) -> str:
    """ " (rows 3, 8, ...)" for a log line: where to look for the first few of these rows."""
    if not row_numbers:
        return ""
    shown = ", ".join(str(number) for number in row_numbers[:NUM_ROWS_LOGGED])
    return f" (rows {shown}{', ...' if len(row_numbers) > NUM_ROWS_LOGGED else ''})"


def is_local_file(path: str) -> bool:
    """Whether `path` names a local data file (by its suffix) rather than a hub dataset."""
    return Path(path).suffix in JSON_LINES_SUFFIXES + PARQUET_SUFFIXES or Path(path).exists()


def read_source_records(path: str, split: str | None) -> tuple[list[tuple[int, Any]], str]:
    """Raw `(row_number, record)` tuples from a local file or a hub dataset split.

    Args:
        path: a local .jsonl / .json / .parquet file, or a hub dataset name.
        split: the hub split (e.g. "train", "test[:10%]"); must be set for a hub dataset.

    Returns:
        (records, source) where source names the file or "name[split]" for error messages.
    """
    if is_local_file(path):
        return read_records(path), path
    if split is None:
        raise ConfigError(
            f"{path!r} is not a local file, so it is read as a hub dataset, which needs "
            "data.train_split / data.val_split"
        )
    hub_rows = datasets.load_dataset(path, split=split)
    return [(index + 1, row) for index, row in enumerate(hub_rows)], f"{path}[{split}]"


def read_records(path: str) -> list[tuple[int, Any]]:
    """Read a JSON-lines (.jsonl, .json) or parquet file into `(row_number, record)` tuples.

    Row numbers are 1-based: the line number for JSON lines (blank lines are skipped but
    counted), the row index + 1 for parquet.

    Raises:
        PreferenceDataError: missing file, unknown suffix, malformed JSON, or no rows.
    """
    file = Path(path)
    if not file.is_file():
        raise PreferenceDataError(f"{path}: no such data file")
    if file.suffix in JSON_LINES_SUFFIXES:
        records = _read_json_lines(file, path)
    elif file.suffix in PARQUET_SUFFIXES:
        try:
            rows = pq.read_table(file).to_pylist()
        except (pa.ArrowException, OSError) as error:
            raise PreferenceDataError(f"{path}: not a readable parquet file ({error})") from None
        records = [(index + 1, row) for index, row in enumerate(rows)]
    else:
        raise PreferenceDataError(
            f"{path}: unknown data file type {file.suffix!r}; expected one of "
            f"{JSON_LINES_SUFFIXES + PARQUET_SUFFIXES}"
        )
    if not records:
        raise PreferenceDataError(f"{path}: the file holds no rows")
    return records


def _read_json_lines(file: Path, path: str) -> list[tuple[int, Any]]:
    """`(line_number, record)` of every non-blank line; bytes are decoded line by line, so that
    a byte that is not UTF-8 is reported with its line."""
    records = []
    with file.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise PreferenceDataError(
                    f"{path}, row {line_number}: byte {raw[error.start]:#04x} at column "
                    f"{error.start + 1} is not UTF-8; save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise PreferenceDataError(
                    f"{path}, row {line_number}: malformed JSON ({error.msg} at column "
                    f"{error.colno}); expected one JSON object per line"
                ) from None
    return records


def _check_messages(value: list, key: str, where: str) -> None:
    """Each message is a dict with string `role` and `content`."""
    for index, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise PreferenceDataError(
                f"{where}: {key!r} message {index} must be a dict with string 'role' and "
                f"'content', got {message!r}"
            )


def check_text(value: Any, key: str, where: str, *, is_response: bool) -> Text:
    """Check that `value` is a string or a non-empty list of chat messages.

    A response must hold some non-whitespace text.

    Raises:
        PreferenceDataError: naming `where` (file and row) and `key`.
    """
    if isinstance(value, list):
        if not value:
            raise PreferenceDataError(f"{where}: {key!r} is an empty message list")
        _check_messages(value, key, where)
        text = "".join(message["content"] for message in value)
    elif isinstance(value, str):
        text = value
    else:
        raise PreferenceDataError(
            f"{where}: {key!r} must be a string or a list of chat messages, "
            f"got {type(value).__name__}"
        )
    if is_response and not text.strip():
        raise PreferenceDataError(f"{where}: {key!r} is an empty response")
    return value


def split_implicit_prompt(chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    """Split two conversations into (prompt, chosen_response, rejected_response) messages.

    The prompt is the longest run of leading messages the two conversations share (TRL's
    "implicit prompt" layout).

    Raises:
        PreferenceDataError: if either is not a message list, or they share no leading message,
            or one is a prefix of the other (an empty response).
    """
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise PreferenceDataError(
            f"{where}: without a prompt key (data.prompt_key: null), chosen and rejected must be "
            f"conversations (lists of chat messages), got {type(chosen).__name__} and "
            f"{type(rejected).__name__}"
        )
    num_common = 0
    for chosen_message, rejected_message in zip(chosen, rejected, strict=False):
        if chosen_message != rejected_message:
            break
        num_common += 1
    if num_common == 0:
        raise PreferenceDataError(
            f"{where}: chosen and rejected share no leading message, so there is no prompt"
        )
    if num_common in (len(chosen), len(rejected)):
        raise PreferenceDataError(
            f"{where}: after the {num_common} shared leading messages a response is empty"
        )
    return chosen[:num_common], chosen[num_common:], rejected[num_common:]


def extract_pair(
    record: Any,
    *,
    prompt_key: str | None,
    chosen_key: str,
    rejected_key: str,
    where: str,
) -> dict[str, Text]:
    """Turn one raw record into a checked preference row.

    Args:
        record: the raw row (a dict).
        prompt_key: column of the prompt, or None for an implicit prompt.
        chosen_key, rejected_key: columns of the chosen and rejected responses.
        where: "file, row N", used in error messages.

    Returns:
        {"prompt", "chosen_response", "rejected_response"}.

    Raises:
        PreferenceDataError: a missing key, a wrong type, or an empty response.
    """
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = [key for key in (prompt_key, chosen_key, rejected_key) if key is not None]
    for key in keys:
        if key not in record or record[key] is None:
            raise PreferenceDataError(
                f"{where}: missing key {key!r}; the row has keys {sorted(record)}"
            )
    chosen, rejected = record[chosen_key], record[rejected_key]
    prompt: Text
    if prompt_key is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
    else:
        prompt = check_text(record[prompt_key], prompt_key, where, is_response=False)
    return {
        "prompt": prompt,
        "chosen_response": check_text(chosen, chosen_key, where, is_response=True),
        "rejected_response": check_text(rejected, rejected_key, where, is_response=True),
    }


def rows_to_dataset(
    rows: list[dict[str, Text]],
    row_numbers: list[int],
    source: str,
    split: str,
    keys: tuple[str, ...] = ROW_KEYS,
) -> datasets.Dataset:
    """Build a datasets.Dataset from checked rows, after checking each column has one kind.

    Arrow columns hold a single type, so a column may not mix strings and message lists.

    Args:
        rows: the checked rows.
        row_numbers: their 1-based row numbers in the source.
        source: names the file (or hub split) in error messages.
        split: "train" or "validation", recorded as the dataset's split.
        keys: the columns that may hold either kind (the preference columns by default).

    Raises:
        PreferenceDataError: naming the first row whose kind differs from row 1's.
    """
    assert rows and len(rows) == len(row_numbers)
    for key in keys:
        first_is_text = isinstance(rows[0][key], str)
        for row, number in zip(rows, row_numbers, strict=True):
            if isinstance(row[key], str) != first_is_text:
                kinds = ("a string", "a message list")
                raise PreferenceDataError(
                    f"{source}, row {number}: {key!r} is {kinds[first_is_text]} but the first "
                    f"row's is {kinds[not first_is_text]}; a column must use one kind"
                )
    return datasets.Dataset.from_list(rows, split=split)


def load_pairs_from_records(
    records: list[tuple[int, Any]],
    source: str,
    *,
    split: str,
    prompt_key: str | None,
    chosen_key: str,
    rejected_key: str,
) -> datasets.Dataset:
    """Check raw `(row_number, record)` tuples and build the formatted dataset.

    Args:
        records: raw rows with their 1-based row numbers.
        source: names the file (or hub split) in error messages.
        split: "train" or "validation", recorded as the dataset's split.
        prompt_key, chosen_key, rejected_key: as for extract_pair.

    Returns:
        A datasets.Dataset with columns prompt, chosen_response, rejected_response.
    """
    if not records:
        raise PreferenceDataError(f"{source}: no rows")
    rows = [
        extract_pair(
            record,
            prompt_key=prompt_key,
            chosen_key=chosen_key,
            rejected_key=rejected_key,
            where=f"{source}, row {number}",
        )
        for number, record in records
    ]
    return rows_to_dataset(rows, [number for number, _ in records], source, split)
