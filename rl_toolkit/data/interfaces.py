"""The task spec and what a preference dataset exposes."""

from typing import Any, Protocol, TypedDict

import datasets

from rl_toolkit.config_schema import DataConfig
from rl_toolkit.utils.config import ConfigError

# A prompt or response: plain text, or chat messages [{"role": ..., "content": ...}, ...].
Text = str | list[dict[str, Any]]


class TaskDataSpec(TypedDict):
    """What a dataset tells the recipe about its task.

    task_name: a short name for the data set (used in logs).
    """

    task_name: str


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
        ConfigError: if the key is missing or null.
    """
    if key not in data_config or data_config[key] is None:
        raise ConfigError(
            f"data.{key} must be set for data.dataset_name={data_config['dataset_name']!r}"
        )
    return data_config[key]
