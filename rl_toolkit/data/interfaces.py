"""The data section of the config, the task spec, and what a preference dataset exposes."""

from typing import Any, Literal, NotRequired, Protocol, TypedDict

import datasets

# A prompt or response: plain text, or chat messages [{"role": ..., "content": ...}, ...].
Text = str | list[dict[str, Any]]


class TaskDataSpec(TypedDict):
    """What a dataset tells the recipe about its task.

    task_name: a short name for the data set (used in logs).
    """

    task_name: str


class DataConfig(TypedDict):
    """The `data` section of the config. configs/dpo.yaml sets every key; see docs/guides/dpo.md.

    dataset_name: a built-in dataset ("DPODataset", "BinaryPreferenceDataset", "HelpSteer3") or
        the dotted path of a user class ("my_pkg.module.MyDataset") built as `cls(data_config)`.
    overlong_policy: what to do with a pair longer than policy.max_total_sequence_length:
        "drop" it, or "truncate_prompt" from the left (pairs whose response alone does not fit
        are dropped).
    pad_to_multiple_of: round the padded length T of every batch up to a multiple of this.
    shuffle: shuffle the training data each epoch (seeded by dpo.seed).
    num_workers: dataloader worker processes (0: load in the main process).
    tokenize_num_proc: processes that tokenise each split up front (1: in this process; small
        splits are always tokenised in this process).

    Keys only some datasets use (set them to null where unused):
    train_data_path, val_data_path: local .jsonl / .json / .parquet files, or (for
        BinaryPreferenceDataset) a HF hub dataset name.
    train_split, val_split: the split of a hub dataset (BinaryPreferenceDataset with a hub name),
        e.g. "train" or "train[:95%]".
    prompt_key, chosen_key, rejected_key: the column names of BinaryPreferenceDataset;
        prompt_key null means the prompt is implicit (shared leading messages of chosen and
        rejected conversations).
    """

    dataset_name: str
    overlong_policy: Literal["drop", "truncate_prompt"]
    pad_to_multiple_of: int
    shuffle: bool
    num_workers: int
    tokenize_num_proc: int
    train_data_path: NotRequired[str | None]
    val_data_path: NotRequired[str | None]
    train_split: NotRequired[str | None]
    val_split: NotRequired[str | None]
    prompt_key: NotRequired[str | None]
    chosen_key: NotRequired[str | None]
    rejected_key: NotRequired[str | None]


class PreferenceDataset(Protocol):
    """What every preference dataset (built-in or user class) exposes.

    formatted_ds: {"train": datasets.Dataset, "validation": datasets.Dataset}, each row with
        `prompt`, `chosen_response` and `rejected_response` (each a Text).
    task_spec: the dataset's TaskDataSpec.
    """

    formatted_ds: dict[str, datasets.Dataset]
    task_spec: TaskDataSpec


def require_key(data_config: DataConfig, key: str) -> Any:
    """The value of `data.<key>`, which the configured dataset needs to be set (not null).

    Raises:
        ValueError: if the key is missing or null.
    """
    if key not in data_config or data_config[key] is None:
        raise ValueError(
            f"data.{key} must be set for data.dataset_name={data_config['dataset_name']!r}"
        )
    return data_config[key]
