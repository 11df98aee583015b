"""BinaryPreferenceDataset: TRL-layout preference data (prompt / chosen / rejected columns).

Reads local JSON-lines or parquet files, or a HF hub dataset. Column names are configurable;
with no prompt column the chosen and rejected conversations carry the prompt as their shared
leading messages (TRL's "implicit prompt").
"""

from rl_toolkit.data.interfaces import TaskDataSpec
from rl_toolkit.data.rows import load_pairs_from_records, read_source_records


class BinaryPreferenceDataset:
    """Preference pairs in the TRL layout, re-keyed to prompt / chosen_response / rejected_response.

    Args:
        train_data_path, val_data_path: local files or hub dataset names.
        prompt_key: the prompt column, or None for an implicit prompt.
        chosen_key, rejected_key: the response columns.
        train_split, val_split: hub splits (None for local files).
    """

    def __init__(
        self,
        train_data_path: str,
        val_data_path: str,
        *,
        prompt_key: str | None,
        chosen_key: str,
        rejected_key: str,
        train_split: str | None,
        val_split: str | None,
    ) -> None:
        self.formatted_ds = {}
        for name, path, split in (
            ("train", train_data_path, train_split),
            ("validation", val_data_path, val_split),
        ):
            records, source = read_source_records(path, split)
            self.formatted_ds[name] = load_pairs_from_records(
                records,
                source,
                split=name,
                prompt_key=prompt_key,
                chosen_key=chosen_key,
                rejected_key=rejected_key,
            )
        self.task_spec = TaskDataSpec(task_name="binary_preference")
