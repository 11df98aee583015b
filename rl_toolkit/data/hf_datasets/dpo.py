"""DPODataset: preference pairs already in this toolkit's row format, in local files."""

import datasets

from rl_toolkit.data.interfaces import TaskDataSpec
from rl_toolkit.data.rows import load_pairs_from_records, read_records


def load_formatted_file(path: str, split: str) -> datasets.Dataset:
    """Read and check a file of rows with `prompt`, `chosen_response`, `rejected_response`.

    Args:
        path: a .jsonl / .json (one JSON object per line) or .parquet file.
        split: "train" or "validation".

    Returns:
        The checked rows as a datasets.Dataset.
    """
    return load_pairs_from_records(
        read_records(path),
        path,
        split=split,
        prompt_key="prompt",
        chosen_key="chosen_response",
        rejected_key="rejected_response",
    )


class DPODataset:
    """Train and validation files whose rows already have the formatted keys.

    Each line of the JSON-lines file is `{"prompt": ..., "chosen_response": ...,
    "rejected_response": ...}`; values are strings or chat message lists. The split into
    train and validation is done offline.

    Args:
        train_data_path: the training file.
        val_data_path: the validation file.
    """

    def __init__(self, train_data_path: str, val_data_path: str) -> None:
        self.formatted_ds = {
            "train": load_formatted_file(train_data_path, "train"),
            "validation": load_formatted_file(val_data_path, "validation"),
        }
        self.task_spec = TaskDataSpec(task_name="dpo")
