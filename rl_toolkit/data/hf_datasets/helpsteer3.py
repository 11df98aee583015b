"""HelpSteer3 (nvidia/HelpSteer3, "preference" subset) as preference pairs."""

import logging
from typing import Any

import datasets

from rl_toolkit.data.interfaces import TaskDataSpec
from rl_toolkit.data.rows import load_pairs_from_records

logger = logging.getLogger(__name__)

HUB_NAME = "nvidia/HelpSteer3"
HUB_SUBSET = "preference"


def format_helpsteer3(row: dict[str, Any]) -> dict[str, Any] | None:
    """Turn a HelpSteer3 preference row into a preference pair, or None for a tie.

    `overall_preference` runs from -3 (response1 much better) to 3 (response2 much better);
    0 means neither is preferred, which gives no pair.

    Args:
        row: a row with `context` (chat messages), `response1`, `response2` and
            `overall_preference`.

    Returns:
        {"prompt", "chosen_response", "rejected_response"}, or None when the preference is 0.
    """
    preference = row["overall_preference"]
    if preference == 0:
        return None
    first_wins = preference < 0
    return {
        "prompt": row["context"],
        "chosen_response": row["response1"] if first_wins else row["response2"],
        "rejected_response": row["response2"] if first_wins else row["response1"],
    }


def format_helpsteer3_split(
    rows: datasets.Dataset, source: str, split: str
) -> tuple[datasets.Dataset, int]:
    """Format and check a HelpSteer3 split; ties are dropped.

    Returns:
        (formatted rows, number of ties dropped).
    """
    records = []
    for index, row in enumerate(rows):
        pair = format_helpsteer3(row)
        if pair is not None:
            records.append((index + 1, pair))
    num_ties = len(rows) - len(records)
    if num_ties:
        logger.warning(
            "%s: dropped %d of %d rows with a tie (overall_preference == 0)",
            source,
            num_ties,
            len(rows),
        )
    formatted = load_pairs_from_records(
        records,
        source,
        split=split,
        prompt_key="prompt",
        chosen_key="chosen_response",
        rejected_key="rejected_response",
    )
    return formatted, num_ties


class HelpSteer3Dataset:
    """HelpSteer3's preference subset: its train and validation splits.

    Attributes:
        formatted_ds: {"train", "validation"} preference rows.
        task_spec: TaskDataSpec(task_name="HelpSteer3").
        num_ties: {"train": int, "validation": int}, rows dropped for a tied preference.
    """

    def __init__(self) -> None:
        hub = datasets.load_dataset(HUB_NAME, HUB_SUBSET)
        self.formatted_ds = {}
        self.num_ties = {}
        for name in ("train", "validation"):
            source = f"{HUB_NAME}/{HUB_SUBSET}[{name}]"
            self.formatted_ds[name], self.num_ties[name] = format_helpsteer3_split(
                hub[name], source, name
            )
        self.task_spec = TaskDataSpec(task_name="HelpSteer3")
