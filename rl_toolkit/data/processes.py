"""Tokenising a split row by row: in this process, or in several processes for a large split.

Shared by the preference pairs (datasets.py) and the SFT sequences (sft/dataset.py). Either way
the rows come back in order and a bad row stops the split with the first bad row's DataError, so
`data.tokenize_num_proc` changes the time it takes and nothing else.
"""

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import datasets

from rl_toolkit.data.rows import DataError

# A split gets at most one process per this many rows, and small ones none but this process:
# starting workers and sending each the tokenizer and its rows costs about 0.3 s with a tiny
# tokenizer (more with a large one), as much as a few hundred short rows take to tokenise.
MIN_ROWS_PER_PROCESS = 256

# tokenize_row(row, index, **kwargs) -> a dict of the columns of `features` (but `error`)
RowTokenizer = Callable[..., dict[str, Any]]


def tokenize_rows(
    rows: datasets.Dataset,
    tokenize_row: RowTokenizer,
    *,
    columns: list[str],
    features: datasets.Features,
    empty: dict[str, Any],
    num_proc: int,
    kwargs: dict[str, Any],
) -> Iterable[dict[str, Any]]:
    """`tokenize_row(row, index, **kwargs)` of every row, in row order.

    Args:
        rows: the formatted split.
        tokenize_row: a module-level function (worker processes import it by name); it raises
            DataError for a bad row.
        columns: the columns of `rows` that tokenize_row reads.
        features: the columns tokenize_row returns, plus a string column `error`; fixed, so
            that a shard of empty lists cannot make Arrow infer another type.
        empty: a result of tokenize_row that holds no tokens (stands in for a bad row).
        num_proc: data.tokenize_num_proc; splits under MIN_ROWS_PER_PROCESS rows per process
            use fewer processes, down to none but this one.
        kwargs: tokenize_row's keyword arguments; `source` names the split in the progress bar.

    Returns:
        The results in row order: lazily in this process (a bad row stops the loop at once), or
        a list from the worker processes.

    Raises:
        DataError: the first bad row's error, whichever process found it.
    """
    num_processes = min(num_proc, len(rows) // MIN_ROWS_PER_PROCESS)
    if num_processes <= 1:
        return (tokenize_row(row, index, **kwargs) for index, row in enumerate(rows))
    return _tokenize_in_processes(
        rows.select_columns(columns),
        num_processes,
        {"tokenize_row": tokenize_row, "empty": empty, "row_kwargs": kwargs},
        columns=columns,
        features=features,
    )


def _tokenize_or_error(
    row: dict[str, Any],
    index: int,
    *,
    tokenize_row: RowTokenizer,
    empty: dict[str, Any],
    row_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """`tokenize_row` for Dataset.map: a bad row's error becomes its `error` column.

    The parent then raises the first bad row's message, as the in-process loop does, instead of
    whichever worker fails first with an exception wrapped by the process pool.
    """
    try:
        return {**tokenize_row(row, index, **row_kwargs), "error": ""}
    except DataError as error:
        return {**empty, "error": str(error)}


def _tokenize_in_processes(
    rows: datasets.Dataset,
    num_proc: int,
    kwargs: dict[str, Any],
    *,
    columns: list[str],
    features: datasets.Features,
) -> list[dict[str, Any]]:
    """`_tokenize_or_error(row, index, **kwargs)` of every row, in order, by `num_proc` processes."""
    tokenized = rows.map(
        _tokenize_or_error,
        with_indices=True,  # the global row index: each worker's shard knows its offset
        fn_kwargs=kwargs,
        num_proc=num_proc,
        remove_columns=columns,
        features=features,
        # Nothing is read from or written to the datasets cache (~/.cache or next to the data):
        # the result stays in memory, and a fresh fingerprint skips hashing the tokenizer.
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=uuid.uuid4().hex,
        desc=f"Tokenising {kwargs['row_kwargs']['source']}",
    )
    first_error = next((error for error in tokenized["error"] if error), None)
    if first_error is not None:
        raise DataError(first_error)
    return tokenized.remove_columns("error").to_list()
