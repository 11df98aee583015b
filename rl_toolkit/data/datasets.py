"""Picking a preference dataset by name, and the tokenised pair dataset the loader reads.

`load_preference_dataset(data_config)` returns an object with `formatted_ds` and `task_spec`.
`PreferencePairDataset` tokenises one split once, up front (so its length and the counts of
dropped / truncated pairs are known before training starts), and applies the length policy.
"""

import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from rl_toolkit.config_schema import DataConfig
from rl_toolkit.data.hf_datasets import BinaryPreferenceDataset, DPODataset, HelpSteer3Dataset
from rl_toolkit.data.interfaces import PreferenceDataset, TaskDataSpec, require_key
from rl_toolkit.data.processes import tokenize_rows
from rl_toolkit.data.rows import (
    ROW_KEYS,
    PreferenceDataError,
    first_rows,
    load_pairs_from_records,
)
from rl_toolkit.data.tokenization import OVERLONG_POLICIES, fit_prompt, tokenize_pair
from rl_toolkit.utils.config import ConfigError

logger = logging.getLogger(__name__)


def _require_present(data_config: DataConfig, key: str) -> Any:
    """`data.<key>`, which may be null but must be written in the config."""
    if key not in data_config:
        raise ConfigError(
            f"data.{key} must be set (null allowed) for "
            f"data.dataset_name={data_config['dataset_name']!r}"
        )
    return data_config[key]


def _build_dpo_dataset(data_config: DataConfig) -> DPODataset:
    return DPODataset(
        require_key(data_config, "train_data_path"), require_key(data_config, "val_data_path")
    )


def _build_binary_preference_dataset(data_config: DataConfig) -> BinaryPreferenceDataset:
    return BinaryPreferenceDataset(
        require_key(data_config, "train_data_path"),
        require_key(data_config, "val_data_path"),
        prompt_key=_require_present(data_config, "prompt_key"),
        chosen_key=require_key(data_config, "chosen_key"),
        rejected_key=require_key(data_config, "rejected_key"),
        train_split=_require_present(data_config, "train_split"),
        val_split=_require_present(data_config, "val_split"),
    )


def _build_helpsteer3(data_config: DataConfig) -> HelpSteer3Dataset:
    return HelpSteer3Dataset()


DATASET_BUILDERS: dict[str, Callable[[DataConfig], PreferenceDataset]] = {
    "DPODataset": _build_dpo_dataset,
    "BinaryPreferenceDataset": _build_binary_preference_dataset,
    "HelpSteer3": _build_helpsteer3,
}


def _import_dataset_class(dotted_path: str) -> Callable[[DataConfig], PreferenceDataset]:
    module_name, _, class_name = dotted_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"data.dataset_name={dotted_path!r}: cannot import it as module.Class ({error})"
        ) from None


def _check_user_dataset(dataset: Any, name: str) -> None:
    """A user class must expose formatted_ds (train, validation) with valid rows, and task_spec."""
    formatted = getattr(dataset, "formatted_ds", None)
    if not isinstance(formatted, dict) or not {"train", "validation"} <= set(formatted):
        raise ConfigError(
            f"{name}: formatted_ds must be a dict with 'train' and 'validation' datasets"
        )
    if not hasattr(dataset, "task_spec"):
        raise ConfigError(f"{name}: the dataset has no task_spec")
    for split in ("train", "validation"):
        rows = formatted[split]
        if not isinstance(rows, datasets.Dataset):
            raise ConfigError(f"{name}: formatted_ds[{split!r}] must be a datasets.Dataset")
        missing = set(ROW_KEYS) - set(rows.column_names)
        if missing:
            raise ConfigError(f"{name}: formatted_ds[{split!r}] lacks columns {sorted(missing)}")
        records = [(index + 1, row) for index, row in enumerate(rows)]
        load_pairs_from_records(
            records,
            f"{name}[{split}]",
            split=split,
            prompt_key="prompt",
            chosen_key="chosen_response",
            rejected_key="rejected_response",
        )


def load_preference_dataset(data_config: DataConfig) -> PreferenceDataset:
    """Build the dataset named by `data.dataset_name`.

    Args:
        data_config: the `data` config section. dataset_name is a key of DATASET_BUILDERS or
            the dotted path of a class, called as `cls(data_config)`, whose rows are checked.

    Returns:
        An object with `formatted_ds` ({"train", "validation"}) and `task_spec`.
    """
    name = data_config["dataset_name"]
    if name in DATASET_BUILDERS:
        return DATASET_BUILDERS[name](data_config)
    if "." not in name:
        raise ConfigError(
            f"data.dataset_name={name!r} is unknown; expected one of {sorted(DATASET_BUILDERS)} "
            "or the dotted path of a dataset class (my_pkg.module.MyDataset)"
        )
    dataset = _import_dataset_class(name)(data_config)
    _check_user_dataset(dataset, name)
    return dataset


# Why a pair is dropped ("" when it is kept), in the `dropped` column of a tokenised row.
_IDENTICAL, _OVERLONG = "chosen == rejected", "overlong"

# A dropped pair (or, in a worker, a bad row) keeps no tokens; a kept pair's prompt has at least one.
_NO_TOKENS = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "truncated": False}

# The columns Dataset.map writes, fixed so that a shard of dropped pairs (empty lists) cannot
# make Arrow infer another type.
_TOKENIZED_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int64")),
        "chosen_ids": datasets.List(datasets.Value("int64")),
        "rejected_ids": datasets.List(datasets.Value("int64")),
        "truncated": datasets.Value("bool"),
        "dropped": datasets.Value("string"),
        "error": datasets.Value("string"),
    }
)


def _tokenize_row(
    row: dict[str, Any],
    index: int,
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_total_sequence_length: int,
    overlong_policy: Literal["drop", "truncate_prompt"],  # PreferencePairDataset checked it
    source: str,
) -> dict[str, Any]:
    """Tokenise one formatted row and fit it to the length policy (used in and out of workers).

    Returns:
        {"prompt_ids" (the fitted prompt), "chosen_ids", "rejected_ids" (responses with EOS),
        "truncated", "dropped"}; the id lists are empty and "dropped" says why when the pair
        is dropped: its responses are the same tokens (nothing to prefer), or it is too long.
    """
    prompt_ids, chosen_ids, rejected_ids = tokenize_pair(
        tokenizer,
        row["prompt"],
        row["chosen_response"],
        row["rejected_response"],
        f"{source}, row {index + 1}",
    )
    if chosen_ids == rejected_ids:
        return {**_NO_TOKENS, "dropped": _IDENTICAL}
    fitted = fit_prompt(
        prompt_ids,
        max(len(chosen_ids), len(rejected_ids)),
        max_total_sequence_length=max_total_sequence_length,
        overlong_policy=overlong_policy,
        bos_id=tokenizer.bos_token_id,
    )
    if fitted is None:
        return {**_NO_TOKENS, "dropped": _OVERLONG}
    return {
        "prompt_ids": fitted,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "truncated": len(fitted) < len(prompt_ids),
        "dropped": "",
    }


def _build_items(
    tokenized: Iterable[dict[str, Any]],
) -> tuple[list[dict[str, Any]], int, dict[str, list[int]]]:
    """The dataset's items from `_tokenize_row`'s results in row order, the truncated count,
    and the 1-based row numbers of the dropped pairs by reason."""
    items = []
    num_truncated = 0
    dropped_rows: dict[str, list[int]] = {_IDENTICAL: [], _OVERLONG: []}
    for pair_id, pair in enumerate(tokenized):
        if pair["dropped"]:
            dropped_rows[pair["dropped"]].append(pair_id + 1)
            continue
        prompt_ids = pair["prompt_ids"]
        num_truncated += pair["truncated"]
        items.append(
            {
                "pair_id": pair_id,
                "prompt_length": len(prompt_ids),
                "chosen_input_ids": torch.tensor(
                    prompt_ids + pair["chosen_ids"], dtype=torch.int64
                ),
                "rejected_input_ids": torch.tensor(
                    prompt_ids + pair["rejected_ids"], dtype=torch.int64
                ),
            }
        )
    return items, num_truncated, dropped_rows


class PreferencePairDataset(torch.utils.data.Dataset):
    """One split of preference pairs, tokenised up front, for the pair-aware collate.

    Item i is a dict: `pair_id` (int, the row's index in the formatted split, stable across
    runs), `prompt_length` (int, P), `chosen_input_ids` and `rejected_input_ids` (int64
    tensors: the P prompt tokens then the response tokens and EOS).

    Args:
        rows: the formatted split (prompt, chosen_response, rejected_response).
        tokenizer: the policy's tokenizer.
        max_total_sequence_length: the longest allowed prompt + response, in tokens.
        overlong_policy: "drop" or "truncate_prompt" (see tokenization.fit_prompt).
        source: names the split in logs and errors (e.g. "train").
        task_spec: the dataset's task spec, kept for the recipe (`setup` returns it).
        num_proc: processes that tokenise (data.tokenize_num_proc); the items, counts and
            errors do not depend on it (see processes.tokenize_rows).

    Attributes:
        counts: {"num_rows", "num_pairs", "num_dropped" (= "num_identical" + "num_overlong"),
            "num_truncated"}. A pair is dropped when its two responses are the same tokens
            (nothing to prefer) or when it does not fit the length policy.
        dropped_rows: {reason: 1-based row numbers (within the split) of the dropped pairs}.
        task_spec: as given.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_total_sequence_length: int,
        overlong_policy: str,
        source: str,
        task_spec: TaskDataSpec | None = None,
        num_proc: int = 1,
    ) -> None:
        self.task_spec = task_spec
        if overlong_policy not in OVERLONG_POLICIES:
            raise ConfigError(
                f"data.overlong_policy={overlong_policy!r}; expected one of {OVERLONG_POLICIES}"
            )
        if num_proc < 1:
            raise ConfigError(f"data.tokenize_num_proc={num_proc}; expected an integer >= 1")
        kwargs = {
            "tokenizer": tokenizer,
            "max_total_sequence_length": max_total_sequence_length,
            "overlong_policy": overlong_policy,
            "source": source,
        }
        tokenized = tokenize_rows(
            rows,
            _tokenize_row,
            columns=list(ROW_KEYS),
            features=_TOKENIZED_FEATURES,
            empty={**_NO_TOKENS, "dropped": ""},
            num_proc=num_proc,
            kwargs=kwargs,
        )
        self.items, num_truncated, self.dropped_rows = _build_items(tokenized)
        self.counts = {
            "num_rows": len(rows),
            "num_pairs": len(self.items),
            "num_dropped": len(rows) - len(self.items),
            "num_identical": len(self.dropped_rows[_IDENTICAL]),
            "num_overlong": len(self.dropped_rows[_OVERLONG]),
            "num_truncated": num_truncated,
        }
        self._log_counts(source, max_total_sequence_length, overlong_policy)
        if not self.items:
            raise PreferenceDataError(
                f"{source}: no pair fits in {max_total_sequence_length} tokens; raise "
                "policy.max_total_sequence_length or use data.overlong_policy=truncate_prompt"
            )

    def _log_counts(self, source: str, max_length: int, overlong_policy: str) -> None:
        """One line: pairs kept, and each drop policy's count with its first row numbers."""
        counts = self.counts
        log = logger.warning if counts["num_dropped"] or counts["num_truncated"] else logger.info
        log(
            "%s: %d pairs from %d rows; dropped %d with chosen == rejected%s and %d longer than "
            "%d tokens%s; %d prompts truncated (data.overlong_policy=%s)",
            source,
            counts["num_pairs"],
            counts["num_rows"],
            counts["num_identical"],
            first_rows(self.dropped_rows[_IDENTICAL]),
            counts["num_overlong"],
            max_length,
            first_rows(self.dropped_rows[_OVERLONG]),
            counts["num_truncated"],
            overlong_policy,
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def tokenize_preference_dataset(
    rows: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    task_spec: TaskDataSpec,
    data_config: DataConfig,
    *,
    max_total_sequence_length: int,
) -> PreferencePairDataset:
    """Tokenise one formatted split (e.g. `dataset.formatted_ds["train"]`) for the loader.

    Args:
        rows: the formatted split (prompt, chosen_response, rejected_response).
        tokenizer: the policy's tokenizer.
        task_spec: the dataset's task spec; its name (and the split's name) label logs/errors.
        data_config: the `data` section (overlong_policy, tokenize_num_proc).
        max_total_sequence_length: policy.max_total_sequence_length.

    Returns:
        The tokenised PreferencePairDataset.
    """
    source = task_spec["task_name"] + (f"[{rows.split}]" if rows.split else "")
    path_key = {"train": "train_data_path", "validation": "val_data_path"}.get(str(rows.split))
    if path_key is not None and data_config.get(path_key) is not None:
        source += f" ({data_config[path_key]})"  # rows are numbered from 1 within the split
    return PreferencePairDataset(
        rows,
        tokenizer,
        max_total_sequence_length=max_total_sequence_length,
        overlong_policy=data_config["overlong_policy"],
        source=source,
        task_spec=task_spec,
        num_proc=data_config["tokenize_num_proc"],
    )
